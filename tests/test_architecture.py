"""The architecture, checked: the import-linter contracts in pyproject.toml (layers, no cycle
among siblings, private modules kept private, the consumer client alone), and no module using
another module's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rotator", "backends")


def test_the_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(lint), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout, proc.stdout


def _sources() -> Iterator[tuple[str, str, ast.Module]]:
    """(module, its package, its syntax tree) for every module of ours."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue  # Alembic's scripts: each names its revision in private variables
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                module = parent = ".".join(parts[:-1])
            else:
                module, parent = ".".join(parts), ".".join(parts[:-1])
            yield module, parent, ast.parse(path.read_text(), str(path))


def _absolute(node: ast.ImportFrom, parent: str) -> str:
    if not node.level:
        return node.module or ""
    base = parent.split(".")[: len(parent.split(".")) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _named(node: ast.expr, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_imports_another_modules_private_name() -> None:
    found: list[str] = []
    for module, parent, tree in _sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.module == "__future__":
                continue
            source = _absolute(node, parent)
            for alias in node.names:
                if _is_module(f"{source}.{alias.name}"):
                    continue  # a module: the private_modules contract keeps it in its package
                if _private(alias.name) and source != module:
                    found.append(f"{module}: from {source} import {alias.name}")
    assert found == []


# a private attribute of another object that the standard library or a vendor makes public
_NOT_OURS = {"_replace", "_asdict", "_fields", "_exit", "_getframe", "_mapping"}
# the few sites that may, each for a reason
_ALLOWED = {
    "rotator.crypto: copy._key_path",  # a copy of the same class, made by its own method
    "rotator.crypto: copy._role",
    "rotator.model: other._fingerprint",  # __eq__ of the same class
    "rotator.makini.transport: transport._pool",  # httpx 0.28 takes no network backend
    # typer builds a parameter's pydantic adapter on first use; the CLI sets a lighter one
    # first (tests/e2e/test_cli_params.py holds the two equal)
    "rotator.cli.command: param._runtime_param",
}


def test_no_module_reaches_into_another_objects_private_attributes() -> None:
    """``self._x`` and ``cls._x`` are a class's own business; ``engine._journal`` is not."""
    found: list[str] = []
    for module, _parent, tree in _sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            if node.attr in _NOT_OURS:
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and _named(owner.func, "super"):
                continue
            site = f"{module}: {ast.unparse(node)}"
            if site not in _ALLOWED:
                found.append(f"{site} (line {node.lineno})")
    assert found == []
