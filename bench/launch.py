"""One run of a command as its own process, measured: wall seconds, CPU seconds (user +
system) and peak RSS, and its exit code.

The command is started by a launcher this small (``python -c LAUNCHER``) so that the figure is
the command's own: a child's peak RSS counts the pages of the process it was forked from, and
a benchmark's own process is several times larger.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# Runs argv[1:]; prints its wall seconds, CPU seconds, peak RSS (KB) and exit code.
LAUNCHER = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_utime + usage.ru_stime, usage.ru_maxrss,
      os.waitstatus_to_exitcode(status))
"""


@dataclass(frozen=True)
class Run:
    wall: float
    """Seconds."""
    cpu: float
    """Seconds, user + system, the command and its threads."""
    rss: float
    """Peak resident memory, MB."""
    code: int


def run_once(argv: list[str], env: dict[str, str], cwd: Path) -> Run:
    """One run of ``argv`` (its output thrown away)."""
    out = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return Run(float(out[0]), float(out[1]), int(out[2]) / 1024, int(out[3]))
