"""Peak memory of a process together with the workers it forks.

One process's peak RSS says too little once ``run-due`` forks: each worker's RSS counts the
pages it shares with the parent again. The sum of the processes' PSS (each shared page split
among its sharers) is what they hold together, the figure a container's memory limit meets.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):  # gone meanwhile
                todo += [int(c) for c in task.read_text().split()]
    return found


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass  # gone meanwhile
    return 0


class TreeMemory(threading.Thread):
    """Samples the summed PSS of ``pid`` and its descendants every ``interval`` seconds until
    :meth:`stop`; ``peak_mb`` is the largest sum seen, ``processes`` the most processes."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_mb = 0.0
        self.processes = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            pids = _tree(self.pid)
            self.processes = max(self.processes, len(pids))
            self.peak_mb = max(self.peak_mb, sum(_pss_kb(p) for p in pids) / 1024)

    def stop(self) -> TreeMemory:
        self._done.set()
        self.join()
        return self
