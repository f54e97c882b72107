"""``rotator run-due`` over several processes.

A process runs Python on one core at a time (the GIL), and a large ``run-due`` is bound by
that, not by Makini: on 1,000 credentials one process keeps about one core busy while the
other waits. So ``run-due`` plans in one process as usual, and when there is enough to do
(``scheduler.processes``), forks workers that each rotate a share of what is due with a share
of the concurrency limits, and gathers their results as one run.

Each credential is in exactly one share; the journal's leases would keep two processes off one
credential anyway, and every step a worker takes is journalled as in one process, so a worker
that dies leaves work the next run resumes. The parent forks only once it is single-threaded
(the planning runtime is closed), and the workers share its loaded modules copy-on-write.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal

import structlog

from rotator import signals
from rotator.errors import RotatorError
from rotator.rotation.work import Outcome, RotationResult, Work
from rotator.settings import Config

log = structlog.get_logger("rotator.workers")

Rotate = Callable[[Config, Sequence[Work], Callable[[RotationResult], None]], None]

PER_PROCESS = 200
"""Fewest rotations worth a worker of their own: below that, forking and opening a runtime
(journal, backends, a Makini admin token) costs more than a second core gives back."""
AUTO_MAX = 4
"""Most workers ``auto`` forks. A pod without a CPU limit sees every CPU of its node, and 64
workers would take about 1.3 GB where the CronJob allows 384 MiB; past a few workers the
journal's one writer at a time and Makini's limits bound a run anyway."""
_KILL_AFTER_DRAIN_S = 5.0
"""How long past its drain a worker told to stop may take before it is killed."""



def usable_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may run on: its affinity, capped by a cgroup v2 CPU quota (a
    container's CPU limit), rounded up."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = cpus or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 CPU limit here
    return count


def process_count(setting: int | Literal["auto"], due: int, limit: int) -> int:
    """How many processes rotate ``due`` credentials: ``auto`` one per usable CPU (at most
    :data:`AUTO_MAX`), each with at least :data:`PER_PROCESS` rotations; a number that many,
    each with at least one. Never more than ``limit`` (the smallest concurrency limit: each
    worker needs at least one of it)."""
    if not sys.platform.startswith("linux"):
        return 1  # fork is safe only on Linux (macOS's system libraries may crash after it)
    if setting == "auto":
        return max(1, min(usable_cpus(), AUTO_MAX, due // PER_PROCESS, limit))
    return max(1, min(setting, due, limit))


def smallest_limit(config: Config) -> int:
    """The smallest of the concurrency limits a worker gets a share of."""
    return min(
        [config.scheduler.concurrency]
        + [env.makini.max_concurrency for env in config.environments.values()]
    )


def share_of(config: Config, processes: int, index: int) -> Config:
    """The configuration worker ``index`` of ``processes`` runs with: its share of every
    concurrency limit. The shares add up to the limits configured, so the workers together
    never have more in flight (nor Makini more at once) than one process would."""

    def part(limit: int) -> int:
        return limit // processes + (1 if index < limit % processes else 0)

    environments = {
        name: env.model_copy(
            update={
                "makini": env.makini.model_copy(
                    update={"max_concurrency": part(env.makini.max_concurrency)}
                )
            }
        )
        for name, env in config.environments.items()
    }
    scheduler = config.scheduler.model_copy(
        update={"concurrency": part(config.scheduler.concurrency)}
    )
    return config.model_copy(update={"scheduler": scheduler, "environments": environments})


class Shares:
    """Workers rotating their shares of ``work``; :meth:`gather` collects their results.

    SIGTERM or Ctrl-C to the parent is passed on to every worker as SIGTERM: each drains as a
    single process would (no new work, what is in flight finishes or parks, leases given back)
    and reports, and the parent gathers the reports as usual. Leaving the context early (an
    error) stops the workers still running; their journal resumes the rest.
    """

    def __init__(self, config: Config, work: Sequence[Work], processes: int, rotate: Rotate):
        self.work = list(work)
        self._configs = [share_of(config, processes, i) for i in range(processes)]
        self._shares = [self.work[i::processes] for i in range(processes)]
        self._rotate = rotate
        self._workers: list[tuple[BaseProcess, Connection, list[Work]]] = []
        self._previous: dict[int, Any] = {}
        self._drain_s = config.scheduler.drain.total_seconds()

    def __enter__(self) -> Shares:
        """Fork the workers. ``rotate(config, share, report)`` is what each runs: it calls
        ``report`` with every result as it comes and exits the process on an error of its own."""
        context = multiprocessing.get_context("fork")
        sys.stdout.flush()
        sys.stderr.flush()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._pass_on)
        try:
            for config, share in zip(self._configs, self._shares, strict=True):
                receive, send = context.Pipe(duplex=False)
                proc = context.Process(
                    target=_worker,
                    args=(config, share, send, self._rotate),
                    name="rotator-worker",
                    daemon=True,
                )
                proc.start()
                send.close()  # the worker holds the other end: its exit closes the pipe
                self._workers.append((proc, receive, share))
        except OSError as exc:  # the system refused a process (a pids limit, memory)
            self.__exit__(None, None, None)
            raise RotatorError(
                f"cannot start run-due's worker processes: {exc.strerror or exc}",
                where="scheduler.processes",
                hint="allow the container more processes or memory, or set "
                "scheduler.processes = 1 to rotate in one process",
            ) from exc
        except BaseException:
            self.__exit__(None, None, None)
            raise
        log.info("run_due.processes", processes=len(self._shares), due=len(self.work))
        return self

    def gather(self, progress: Callable[[RotationResult], None] | None) -> list[RotationResult]:
        """Every item's result, in the order of ``work``. A worker that stopped before it
        reported all its share has the rest reported as failed."""
        results: dict[tuple[str, str], RotationResult] = {}
        pipes = [conn for _, conn, _ in self._workers]
        while pipes:
            for conn in wait(pipes):
                assert isinstance(conn, Connection)
                try:
                    result: RotationResult = conn.recv()
                except EOFError:  # the worker is done (or died)
                    pipes.remove(conn)
                    continue
                results[(result.environment, result.credential)] = result
                if progress is not None:
                    progress(result)
        for proc, _, share in self._workers:
            proc.join()
            missing = [w for w in share if (w.environment, w.credential) not in results]
            if missing:
                _report_lost(proc, missing, results)
        return [results[(w.environment, w.credential)] for w in self.work]

    def __exit__(self, *exc: object) -> None:
        stopped = 0
        for proc, _conn, _share in self._workers:
            if proc.is_alive():
                proc.terminate()  # a worker drains on it (or parks its share if not started)
                stopped += 1
        deadline = time.monotonic() + self._drain_s + _KILL_AFTER_DRAIN_S
        for proc, conn, _share in self._workers:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():  # stuck before it could drain: its journal resumes the rest
                proc.kill()
                proc.join()
            conn.close()
        if stopped:
            log.warning(
                "run_due.stopped",
                workers=stopped,
                detail="stopped mid-run; the journal keeps their rotations, the next run "
                "resumes them",
            )
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _pass_on(self, signum: int, _frame: object) -> None:
        log.info("run_due.stopping", signal=signal.Signals(signum).name, workers=len(self._workers))
        for proc, _conn, _share in self._workers:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)


def _report_lost(
    proc: BaseProcess,
    missing: list[Work],
    results: dict[tuple[str, str], RotationResult],
) -> None:
    code = proc.exitcode
    how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    error = f"its worker process stopped ({how}) before it reported; `rotator run-due` resumes"
    log.error("run_due.worker_lost", pid=proc.pid, exit=how, unreported=len(missing))
    for w in missing:
        results[(w.environment, w.credential)] = RotationResult(
            w.environment, w.credential, Outcome.FAILED, error=error
        )


def _worker(config: Config, share: list[Work], send: Connection, rotate: Rotate) -> None:
    # the parent answers Ctrl-C (the terminal sends it to the whole group) and passes it on
    # as SIGTERM, which the worker's run drains on (rotator.service.Stopper); one that comes
    # while the worker is still opening its runtime is kept for the Stopper, not fatal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signals.hold(signal.SIGTERM)
    try:
        rotate(config, share, send.send)
    finally:
        send.close()
