"""The classes typer builds the ``rotator`` commands from: usage and help shown as click shows
them, and arguments converted without pydantic where they are plain text, paths or flags.

typer (0.2x) converts every command-line value through a pydantic ``TypeAdapter`` built for
the parameter when the command runs: importing pydantic and building the adapters costs about
0.15 s, more than everything else ``rotator keygen`` does, and ``rotator get`` is what other
teams' scripts call in a loop. Every value of this CLI is a ``str``, a ``list[str]``, a
``Path``, a flag (already a ``bool`` when it reaches the conversion) or a number. The first four
are converted here as typer's adapters convert them (``tests/cli/test_command.py`` compares the
two on every parameter of the app); anything else (numbers with their ranges, a bool given as
text) goes to typer's own conversion, built only then.

:func:`click_app` is the app as typer builds it, but each command built when it is looked up:
typer builds all thirty first, a tenth of what ``rotator get`` costs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, get_args, get_origin

import typer
from typer import main as typer_main
from typer._click import Command as ClickCommand
from typer._coercion import RuntimeParam, TypeDescriptor, build_runtime_param
from typer._param_types import coerce_cli_path, lenient_issubclass
from typer.core import TyperCommand, TyperGroup


@dataclass(frozen=True)
class _Plain(RuntimeParam):
    """Conversion of a ``str``, ``list[str]``, ``Path`` or flag value without pydantic;
    anything it does not recognise goes to typer's conversion for the same parameter."""

    descriptor: TypeDescriptor

    def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
        annotation: Any = self.annotation
        if get_origin(annotation) is list:
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return list(value)
        elif annotation is str:
            if isinstance(value, str):
                return value
        elif annotation is bool:
            if isinstance(value, bool):
                return value
        elif isinstance(value, (str, Path)):  # a Path annotation (see plain())
            return coerce_cli_path(
                Path(value), self.parameter_info, path_type=Path, param=param, ctx=ctx
            )
        return build_runtime_param(self.descriptor).coerce(value, param, ctx)


def plain(descriptor: TypeDescriptor) -> RuntimeParam | None:
    """The conversion of a parameter this module takes over, or None for typer's."""
    annotation: Any = descriptor.annotation
    info = descriptor.parameter_info
    if info.parser is not None or descriptor.file_annotation is not None:
        return None
    text = annotation is str or (get_origin(annotation) is list and get_args(annotation) == (str,))
    path = lenient_issubclass(annotation, Path) and info.path_type is None
    if not (text or path or annotation is bool):
        return None
    return _Plain(parameter_info=info, annotation=annotation, descriptor=descriptor)


def _take_over(params: list[Any]) -> None:
    for param in params:
        if getattr(param, "_runtime_param", ...) is None:  # typer builds it on first use
            param._runtime_param = plain(param.type_descriptor)


class Group(TyperGroup):
    """typer's group, its own options (``--config``...) converted as ``_Plain`` does."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        _take_over(self.get_params(ctx))
        return super().parse_args(ctx, args)


class Command(TyperCommand):
    """typer's command, with arguments shown as click shows them: ``rotator rotate [OPTIONS]
    ENV NAME...`` and ``ENV  The environment.`` (typer writes ``{ENV} {NAME}...`` and adds the
    Python type, ``ENV <str>``), and values converted as ``_Plain`` does."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        _take_over(self.get_params(ctx))
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(_usage(param))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append((_usage(param), record[1]))
            elif param.param_type_name == "option":
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _usage(param: Any) -> str:
    name = str(param.metavar or param.name.upper())
    if param.nargs != 1:
        name += "..."
    return name if param.required else f"[{name}]"


def click_app(app: typer.Typer) -> TyperGroup:
    """``typer.main.get_command(app)``, each command and command group built from its
    function when it is first looked up (a command line names one; help lists them all)."""
    shell = copy.copy(app)
    shell.registered_commands, shell.registered_groups = [], []
    group = typer_main.get_command(shell)
    assert isinstance(group, TyperGroup), "the app has a callback: typer makes it a group"
    short, markup = app.pretty_exceptions_short, app.rich_markup_mode
    makers: dict[str, Callable[[], ClickCommand]] = {}
    for info in app.registered_commands:
        assert info.callback, "every command has its function"
        makers[info.name or typer_main.get_command_name(info.callback.__name__)] = partial(
            typer_main.get_command_from_info,
            info,
            pretty_exceptions_short=short,
            rich_markup_mode=markup,
        )
    for sub in app.registered_groups:
        assert sub.name, "every command group is added with its name"
        makers[sub.name] = partial(
            typer_main.get_group_from_info,
            sub,
            pretty_exceptions_short=short,
            rich_markup_mode=markup,
            suggest_commands=app.suggest_commands,
        )
    group.commands = Commands(makers)
    return group


class Commands(MutableMapping[str, ClickCommand]):
    """A group's commands by name, each made when it is first read."""

    def __init__(self, makers: dict[str, Callable[[], ClickCommand]]) -> None:
        self._makers = makers
        self._made: dict[str, ClickCommand] = {}

    def __getitem__(self, name: str) -> ClickCommand:
        if name not in self._made:
            self._made[name] = self._makers[name]()
        return self._made[name]

    def __setitem__(self, name: str, command: ClickCommand) -> None:
        self._made[name] = command
        self._makers.setdefault(name, lambda: command)

    def __delitem__(self, name: str) -> None:
        del self._makers[name]
        self._made.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)

    @property
    def built(self) -> frozenset[str]:
        """The names of the commands made so far."""
        return frozenset(self._made)
