"""The command line's habits: ``--version``, shell completion, and help that names what to
type (``ENV``, ``NAME...``, ``N``) instead of Python types (``<list[str]>``, ``<int range>``),
describes every option and shows examples for the main commands."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from rotator.cli.app import app
from rotator.cli.command import Commands, click_app

pytestmark = pytest.mark.e2e

MAIN = ("rotate", "get", "status", "revoke", "audit", "run-due", "serve")
"""The commands whose help shows examples."""


def rotator(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rotator", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command and group of the app, with the words that reach it."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from commands(sub, (*path, name))


ALL = list(commands(typer.main.get_command(app)))


def test_the_walk_reaches_every_command() -> None:
    paths = {" ".join(p) for p, _ in ALL}
    assert {"", "rotate", "get", "keys create", "db upgrade", "unaccounted ack"} <= paths
    assert len(paths) > 25


@pytest.mark.parametrize(
    ("path", "command"), [pytest.param(p, c, id=" ".join(p) or "rotator") for p, c in ALL]
)
def test_help_names_what_to_type_and_describes_every_option(
    path: tuple[str, ...], command: Any
) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], prog_name="rotator", env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "Usage: rotator" in result.output
    # a Python type in angle brackets (<str>, <list[str]>, <int range>; a range reads
    # 1<=x<=10000), or typer's {argument}, is not something a person types
    assert re.search(r"<[^=]", result.output) is None, result.output
    assert "{" not in result.output.split("\n", 1)[0], result.output
    for param in command.params:
        if param.param_type_name == "option" and param.name != "help":
            assert param.help, f"rotator {' '.join(path)}: {param.opts[0]} has no description"
        if param.param_type_name == "argument":
            assert param.metavar and param.metavar.isupper(), (path, param.name)
            assert param.help, f"rotator {' '.join(path)}: {param.metavar} has no description"
    if path and path[0] in MAIN and len(path) == 1:
        examples = result.output.split("Examples:", 1)
        assert len(examples) == 2, f"rotator {path[0]} --help shows no example"
        assert f"rotator {path[0]}" in examples[1]


def help_text(command: Any, path: tuple[str, ...]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = command.main([*path, "--help"], prog_name="rotator", standalone_mode=False)
    assert code == 0
    return out.getvalue()


@pytest.mark.parametrize("path", [pytest.param(p, id=" ".join(p) or "rotator") for p, _ in ALL])
def test_each_command_built_when_it_is_looked_up_is_the_one_typer_builds(
    path: tuple[str, ...],
) -> None:
    # the console script runs click_app(app): the same commands, each made on first use
    assert help_text(click_app(app), path) == help_text(typer.main.get_command(app), path)


def test_a_command_line_builds_the_command_it_names_and_no_other() -> None:
    lazy = click_app(app)
    help_text(lazy, ("get",))
    assert isinstance(lazy.commands, Commands) and lazy.commands.built == {"get"}
    help_text(lazy, ("keys", "create"))
    assert lazy.commands.built == {"get", "keys"}
    assert list(lazy.commands) == list(typer.main.get_command(app).commands)  # help's order


def test_version_prints_the_installed_distributions_version() -> None:
    proc = rotator("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"rotator {version('makini-rotator')}\n"


def test_completion_script_is_generated_and_completes_commands() -> None:
    # typer detects the shell it runs under (shellingham): run it from bash, as a person would
    # (a second command keeps bash from replacing itself with the first)
    script = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m rotator --show-completion; exit $?"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert script.returncode == 0, script.stderr
    assert "_ROTATOR_COMPLETE=complete_bash" in script.stdout
    assert "complete -o default -F _rotator_completion rotator" in script.stdout
    # what the script asks for when a person presses TAB after `rotator sta`
    words = rotator(env={"_ROTATOR_COMPLETE": "complete_bash", "COMP_WORDS": "rotator sta",
                         "COMP_CWORD": "1"})  # fmt: skip
    assert words.returncode == 0, words.stderr
    assert words.stdout.split() == ["status"]
    options = rotator(env={"_ROTATOR_COMPLETE": "complete_bash",
                           "COMP_WORDS": "rotator audit --l", "COMP_CWORD": "2"})  # fmt: skip
    assert options.stdout.split() == ["--limit"]
