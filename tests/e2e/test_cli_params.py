"""The CLI's own conversion of command-line values (``rotator.cli.command``) gives what typer's
pydantic adapters give, for every parameter of every command it takes over, and hands typer
everything else. A typer upgrade that changes how values are converted fails here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_origin

import pytest
import typer.main
from typer._click import Context
from typer._click.exceptions import BadParameter
from typer._coercion import build_runtime_param

from rotator.cli.app import app
from rotator.cli.command import plain


def _params() -> list[tuple[str, Any]]:
    found = []

    def walk(command: Any, path: str) -> None:
        for param in command.params:
            found.append((f"{path} {param.name}", param))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "rotator")
    return found


PARAMS = _params()


def _samples(annotation: Any, tmp: Path) -> list[Any]:
    if get_origin(annotation) is list:
        return [["a"], ("prod", "dev"), ()]
    if annotation is str:
        return ["prod", "", " spaced ", "ünïcode"]
    if annotation is bool:
        return [True, False]
    existing = tmp / "exists.toml"
    existing.write_text("")
    return [str(existing), str(tmp / "missing.toml"), str(tmp), existing]


def _outcome(convert: Any, value: Any, param: Any, ctx: Context) -> Any:
    try:
        return ("value", convert._coerce_value(value, param, ctx))
    except BadParameter as exc:
        return ("error", exc.format_message())


def test_every_text_path_and_flag_parameter_is_taken_over() -> None:
    kinds = {str(p.type_descriptor.annotation) for _, p in PARAMS if plain(p.type_descriptor)}
    assert {"<class 'str'>", "<class 'bool'>", "<class 'pathlib.Path'>", "list[str]"} <= kinds
    # numbers keep typer's conversion (their ranges and messages are its own)
    for where, param in PARAMS:
        if param.type_descriptor.annotation in (int, float):
            assert plain(param.type_descriptor) is None, where


@pytest.mark.parametrize(
    "param", [p for _, p in PARAMS if plain(p.type_descriptor)],
    ids=[w for w, p in PARAMS if plain(p.type_descriptor)],
)  # fmt: skip
def test_the_conversion_equals_typers(param: Any, tmp_path: Path) -> None:
    ours, theirs = plain(param.type_descriptor), build_runtime_param(param.type_descriptor)
    ctx = Context(typer.main.get_command(app))
    for value in _samples(param.type_descriptor.annotation, tmp_path):
        assert _outcome(ours, value, param, ctx) == _outcome(theirs, value, param, ctx), value


def test_a_value_it_does_not_know_goes_to_typers_conversion() -> None:
    where, param = next((w, p) for w, p in PARAMS if p.type_descriptor.annotation is bool)
    ours = plain(param.type_descriptor)
    ctx = Context(typer.main.get_command(app))
    assert _outcome(ours, "yes", param, ctx) == ("value", True), where  # text: typer's adapter
    assert _outcome(ours, "maybe", param, ctx)[0] == "error", where
