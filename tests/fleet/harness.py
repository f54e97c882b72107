"""Real processes for the fleet tests: ``rotator makini-sim`` simulators and ``rotator serve`` /
``rotator run-due`` processes on one configuration, each with its output in a file (a pipe
nobody reads would fill up and stop the process), plus the journal read straight from
PostgreSQL, the way an operator's ``psql`` would."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.wait import wait_until


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proc:
    """One ``python -m rotator ...`` process, its stdout and stderr in files of ``folder``."""

    def __init__(self, name: str, folder: Path, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.out_path = folder / f"{name}.out"
        self.err_path = folder / f"{name}.err"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "rotator", *argv],
                env=env,
                cwd=folder,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            before = len(self.stderr())
            self.popen.send_signal(signal.SIGUSR1)  # where each thread and task waits
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=2)
            self.popen.kill()
            self.popen.wait(timeout=10)
            text = self.stderr()
            log, stacks = text[:before], text[before:]
            tasks = stacks[stacks.find("asyncio:") :] if "asyncio:" in stacks else stacks
            raise AssertionError(
                f"{self.name} did not exit within {timeout_s:.0f} s; its log ends:\n"
                f"{log[-3000:]}\n--- where it waited (SIGUSR1) ---\n{tasks[-6000:]}"
            ) from None

    def stop(self) -> None:
        """Kill it if it still runs (the test's cleanup)."""
        if self.alive():
            self.popen.kill()
            self.popen.wait(timeout=10)

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The structlog JSON records of its stderr (lines that are not JSON are skipped)."""
        records = []
        for line in self.stderr().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


class Simulator:
    """``rotator makini-sim`` in a process of its own (Makini is a remote service)."""

    def __init__(
        self, folder: Path, name: str, client: str, *, invalidates: bool, latency_ms: float
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            "makini-sim",
            "--port",
            str(self.port),
            "--latency-ms",
            str(latency_ms),
            "--client",
            client,
            "--issue-invalidates" if invalidates else "--issue-keeps-old",
        ]
        self.proc = Proc(f"sim-{name}", folder, argv, dict(os.environ))
        self.http = httpx.Client(base_url=self.url, timeout=10)

        def up() -> bool:
            assert self.proc.alive(), self.proc.stderr()
            try:
                return self.http.get("/_sim/options").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(f"the simulator {name}", up, 30)

    def tokens(self, **filters: str) -> list[dict[str, Any]]:
        """Token views (fingerprints, never values)."""
        response = self.http.get("/_sim/tokens", params=filters)
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()
        return result

    def token(self, fp: str) -> dict[str, Any] | None:
        response = self.http.get(f"/_sim/tokens/{fp}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def asked(self) -> set[str]:
        """The connections whose token request Makini is answering right now."""
        response = self.http.get("/_sim/inflight")
        response.raise_for_status()
        return {
            str(r["connection_id"])
            for r in response.json()
            if r["route"] == "POST /api/system/connections/{id}/token"
        }

    def close(self) -> None:
        self.http.close()
        self.proc.stop()


class Db:
    """The journal's tables read with plain SQL on an autocommit connection."""

    def __init__(self, sqlalchemy_url: str) -> None:
        self.conn = psycopg.connect(
            sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
        )

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """The rows, or none while the schema is not there yet (replicas still migrating)."""
        try:
            return list(self.conn.execute(sql, params).fetchall())
        except psycopg.errors.UndefinedTable:
            return []

    def close(self) -> None:
        self.conn.close()
