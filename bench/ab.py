"""A/B: one benchmark on an older commit and on this checkout, interleaved, in one run.

    .venv/bin/python -m bench.ab --before REV [--rounds 3] -- bench_rotation.py [ARGS...]

The older commit is checked out as a git worktree (``.ab/<rev>``, reused across runs); each round
runs the benchmark script of that worktree on its code, then this checkout's script on this
code (alternating which goes first), with this checkout's virtual environment: the worktree's
modules come first on ``PYTHONPATH``. ``--same-script`` runs this checkout's script on both
codes instead (when the benchmark itself changed, and its script runs on the older code too):
it is copied into the worktree's ``bench/``, so that a script that finds the repository from its
own path finds the older one.
Each run's output is printed whole, labelled; compare the figures round by round (machine load
moves both alike within a round).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worktree(rev: str) -> Path:
    sha = subprocess.run(
        ["git", "rev-parse", "--short=12", rev],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    path = ROOT / ".ab" / sha
    if not (path / "rotator").is_dir():
        path.parent.mkdir(exist_ok=True)
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--force", str(path), sha],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    return path


def command(tree: Path, script: Path, copied: bool) -> list[str]:
    """How ``tree`` runs its benchmark ``script``: as a module of the package ``bench`` (run from
    the tree's root), or as a file in a commit from before ``bench`` was a package. A script
    copied from this checkout is this checkout's kind."""
    if copied or (tree / "bench" / "__init__.py").exists():
        return [sys.executable, "-m", f"bench.{script.stem}"]
    return [sys.executable, str(script)]


def run(label: str, tree: Path, argv: list[str], args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.monotonic()
    proc = subprocess.run(
        [*argv, *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    took = time.monotonic() - started
    print(
        f"--- {label} ({tree.name if tree != ROOT else 'this checkout'}), {took:.0f} s", flush=True
    )
    print(proc.stdout.rstrip(), flush=True)
    if proc.returncode != 0:
        print(f"[exit {proc.returncode}] {proc.stderr[-2000:]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the older commit (A)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--same-script", action="store_true", help="run this checkout's script on both codes"
    )
    parser.add_argument("script", help="a script of bench/, e.g. bench_rotation.py")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    before = worktree(options.before)
    args = [a for a in options.args if a != "--"]
    for n in range(options.rounds):
        pair = [("A", before), ("B", ROOT)]
        if n % 2:
            pair.reverse()
        for label, tree in pair:
            script = tree / "bench" / options.script
            copied = options.same_script and tree != ROOT
            if copied:
                shutil.copy2(ROOT / "bench" / options.script, script)
            run(f"round {n + 1} {label}", tree, command(tree, script, copied), args)


if __name__ == "__main__":
    main()
