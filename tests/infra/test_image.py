"""The container image, checked statically (no Docker engine here): hadolint, the spec's
requirements read off the Dockerfile, the build context that .dockerignore leaves, and a wheel
built from exactly that context."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.infra._infra import DOCKERFILE, ROOT, dockerignored, find_tool, run

DOCKERIGNORE = ROOT / ".dockerignore"
UID = 10001


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(ins)
    return found


def final_stage() -> list[tuple[str, str]]:
    return stages()[-1]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not the exec form: {args}"
    return [str(v) for v in value]


def test_hadolint_finds_nothing() -> None:
    hadolint = find_tool("hadolint")
    proc = run([hadolint, "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)])
    findings = json.loads(proc.stdout or "[]")
    assert findings == [] and proc.returncode == 0, json.dumps(findings, indent=1) + proc.stderr


def test_every_hadolint_or_checkov_exception_says_why() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.search(r"hadolint ignore=|checkov:skip=", line):
            reason = line.split(":", 2)[-1] if "checkov" in line else lines[i - 1]
            assert len(reason.strip("# ").strip()) > 15, f"line {i + 1}: exception without reason"


def test_multi_stage_on_slim_python_311() -> None:
    found = stages()
    assert len(found) >= 2, "build and runtime stages"
    for stage in found:
        image = stage[0][1].split()[0]
        slim_311 = r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?"
        assert re.fullmatch(slim_311, image), image
        assert re.search(r"\bAS\s+\w+", stage[0][1], re.I), f"unnamed stage: {stage[0][1]}"


def test_final_stage_runs_as_the_non_root_user_the_manifests_expect() -> None:
    users = [args for word, args in final_stage() if word == "USER"]
    assert users, "no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid == str(UID) and gid in ("", str(UID)), "numeric uid:gid (runAsNonRoot checks it)"


def test_final_stage_has_no_build_tools_installers_or_caches() -> None:
    text = "\n".join(f"{w} {a}" for w, a in final_stage())
    for banned in ("apt-get install", "apk add", "gcc", "build-essential", "pip install",
                   "curl", "wget", "--mount=type=cache"):
        assert banned not in text, f"final stage has {banned!r}"
    copies = [a for w, a in final_stage() if w in ("COPY", "ADD")]
    assert all(a.startswith("--from=") for a in copies), f"final stage copies sources: {copies}"
    assert "pip uninstall" in text, "the base image's pip stays in the final stage"
    # the build stage writes no pip cache and no bytecode at run time
    build = "\n".join(f"{w} {a}" for w, a in stages()[0])
    assert "PIP_NO_CACHE_DIR=1" in build or "--no-cache-dir" in build
    assert "PYTHONDONTWRITEBYTECODE=1" in text, "a read-only root filesystem: no .pyc writes"


def test_extras_are_a_build_argument_naming_the_distributions_extras() -> None:
    build = stages()[0]
    assert any(w == "ARG" and a.split("=")[0] == "EXTRAS" for w, a in build)
    install = next(a for w, a in build if w == "RUN" and "pip" in a and "install" in a)
    assert "${EXTRAS}" in install
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    header = DOCKERFILE.read_text().split("FROM", 1)[0]
    documented = re.search(r"EXTRAS=([\w,]+)", header)
    assert documented, "the header shows an EXTRAS example"
    for extra in documented.group(1).split(","):
        assert extra in extras, f"EXTRAS example names {extra!r}, which pyproject.toml lacks"
    for needed in ("aws", "vault", "azure", "postgres"):
        assert needed in extras


def test_entrypoint_is_the_console_script_and_serves_on_the_exposed_port() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    stage = final_stage()
    entry = exec_form(next(a for w, a in stage if w == "ENTRYPOINT"))
    assert entry == ["rotator"] and "rotator" in scripts
    cmd = exec_form(next(a for w, a in stage if w == "CMD"))
    assert cmd[0] == "serve"
    port = cmd[cmd.index("--port") + 1]
    assert [a for w, a in stage if w == "EXPOSE"] == [port]
    env = " ".join(a for w, a in stage if w == "ENV")
    assert f"127.0.0.1:{port}/healthz" in env, "the HEALTHCHECK's default URL is serve's port"


def test_healthcheck_uses_python_urllib_on_healthz() -> None:
    check = next(a for w, a in final_stage() if w == "HEALTHCHECK")
    assert "--interval" in check and "--timeout" in check
    argv = exec_form(check[check.index("CMD") + 3 :].strip())
    assert argv[:2] == ["python", "-c"] and "urllib.request" in argv[2]
    compile(argv[2], "<healthcheck>", "exec")
    env = " ".join(a for w, a in final_stage() if w == "ENV")
    assert "/healthz" in env


def test_oci_labels() -> None:
    labels = " ".join(a for w, a in final_stage() if w == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_writable_paths_are_only_the_journal_folder_and_tmp() -> None:
    text = "\n".join(a for w, a in final_stage() if w == "RUN")
    owned = re.findall(r"install -d -o (\d+)[^\n&]*?(/\S+)", text)
    assert owned == [(str(UID), "/var/lib/rotator")], owned
    env = " ".join(a for w, a in final_stage() if w == "ENV")
    assert "ROTATOR_CONFIG=/etc/rotator/rotator.toml" in env


@functools.cache
def context_files() -> list[str]:
    """The files `docker build` sends from the repository root, after .dockerignore."""
    rules = DOCKERIGNORE.read_text().splitlines()
    files = []
    for folder, dirs, names in os.walk(ROOT):
        rel_dir = Path(folder).relative_to(ROOT).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        # a folder left out whole (and not re-included by a later "!" rule) is not walked
        dirs[:] = [d for d in dirs if not (d in (".git",) or d.startswith(".venv"))]
        for name in names:
            rel = rel_dir + name
            if not dockerignored(rel, rules):
                files.append(rel)
    return sorted(files)


def test_dockerignore_keeps_the_context_to_what_the_build_copies() -> None:
    files = context_files()
    copied = []
    for word, args in stages()[0]:
        if word == "COPY" and not args.startswith("--from"):
            copied += shlex.split(args)[:-1]
    for src in copied:
        assert any(f == src.rstrip("/") or f.startswith(src.rstrip("/") + "/") for f in files), (
            f"COPY {src}: missing from the repository or left out by .dockerignore"
        )
    for f in files:
        assert f.split("/")[0] in {"pyproject.toml", "README.md", "rotator", "backends"}, f
        assert not re.search(r"\.(db|key|pyc)$|__pycache__|\.env$", f), f


def test_the_build_context_builds_the_distribution(tmp_path: Path) -> None:
    """What the build stage's `pip install .` does first, on exactly the files Docker sends."""
    ctx = tmp_path / "ctx"
    for rel in context_files():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, ctx / rel)
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    if isinstance(readme, str):
        assert (ctx / readme).is_file(), (
            f"pyproject.toml names {readme}, which the image build copies: add it to the repository"
        )
    proc = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps",
         "--disable-pip-version-check", "--quiet", "-w", str(tmp_path / "dist"), str(ctx)],
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheel = next((tmp_path / "dist").glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        text = zf.read(entry_points).decode()
    assert any(n.startswith("rotator/") for n in names)
    assert any(n.startswith("backends/") for n in names)
    assert re.search(r"^rotator = rotator\.cli:main$", text, re.M), text
    # the journal's migrations travel with the code: a container migrates its journal at start
    from rotator.journal import migrate

    scripts = {n for n in names if n.startswith("rotator/journal/migrations/")}
    assert "rotator/journal/migrations/env.py" in scripts
    for revision in migrate.REVISIONS:
        prefix = f"rotator/journal/migrations/versions/{revision}_"
        assert any(n.startswith(prefix) for n in scripts)


@pytest.mark.parametrize("dockerfile_text", ["FROM python:latest\nRUN curl x\n"])
def test_hadolint_does_bite(tmp_path: Path, dockerfile_text: str) -> None:
    """Guards the guard: a bad Dockerfile makes hadolint report, so silence above means clean."""
    hadolint = find_tool("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text(dockerfile_text)
    proc = run([hadolint, "--format", "json", str(bad)])
    findings: list[dict[str, Any]] = json.loads(proc.stdout or "[]")
    assert proc.returncode != 0 and {f["code"] for f in findings} >= {"DL3007"}
