"""Recovery after a replica is killed (SIGKILL) in the middle of a rotation wave.

Two ``rotator serve`` replicas on a PostgreSQL journal (a fresh database per trial) rotate
``--credentials`` credentials of one environment whose Makini kills a connection's old token
when it issues a new one (``issue_invalidates_previous = true``: the case where a dead holder
hurts, since the backends serve the killed old token until the rotation is promoted). The
simulator runs in a process of its own with ``--latency-ms`` per call; two file backends.

Each trial: both replicas start on the empty database and give every credential its first token;
the next wave comes on schedule (``interval``, no jitter). Once a quarter of that wave is
promoted and replica A holds at least one credential between issue and promotion (its old token
dead at Makini, the new one not yet served), A is killed with SIGKILL. From then on every
credential whose lease A held is read through replica B's API (a reader key) every 50 ms, and
its token looked up at the simulator. Measured from the kill, per credential A held:

* **served**: until B's API serves a token that Makini accepts, for the credentials that were
  served a dead token at the kill (A had issued and not promoted): how long readers were handed
  a dead token. The last of them is when every credential serves an active token again (the
  others were never without one: their old token was still alive, or B serves theirs);
* **done**: until the rotation A was driving is finished by B (taken over once A's lease
  expired, resumed from its last journaled step, promoted and retired).

Printed per trial and over every credential of every trial (p50, max), beside the configured
``journal.lock_ttl`` and ``scheduler.tick``, which bound it: a lease is renewed every third of
lock_ttl, so it expires at most lock_ttl after the kill, and B looks on its next tick.

    .venv/bin/python -m bench.bench_recovery [--credentials 300] [--latency-ms 20] \
        [--trials 5] [--lock-ttl 15] [--tick 10] [--interval 20] [--concurrency 32]

Needs the PostgreSQL server on 127.0.0.1:5432 (``ROTATOR_BENCH_PG`` to use another: an admin
URL whose user may create databases).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import psycopg

from bench.simulator import simulator
from rotator.crypto import generate_key
from rotator.journal import Journal
from rotator.keys import create_key
from rotator.model import fingerprint

CLIENT, SECRET = "bench-prod", "bench-prod-secret"
PG_ADMIN = os.environ.get("ROTATOR_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float, every_s: float) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


@contextlib.contextmanager
def database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one trial (SQLAlchemy URL)."""
    name = f"rotator_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def write_config(folder: Path, journal: str, url: str, args: argparse.Namespace, run: str) -> Path:
    lines = [
        "[journal]",
        f'url = "{journal}"',
        f'lock_ttl = "{args.lock_ttl}s"',
        "[scheduler]",
        f'tick = "{args.tick}s"',
        f"concurrency = {args.concurrency}",
        "[environments.prod]",
        'sealing_key = { env = "BENCH_RECOVERY_SEAL" }',
        "[environments.prod.makini]",
        f'base_url = "{url}"',
        f'client_id = "{CLIENT}"',
        'client_secret_env = "BENCH_RECOVERY_SECRET"',
        "issue_invalidates_previous = true",
        f"max_concurrency = {args.concurrency}",
        "[environments.prod.schedule]",
        f'interval = "{args.interval}s"',
        'jitter = "0s"',
        'grace_period = "0s"',
    ]
    for which in ("a", "b"):
        lines += [
            "[[environments.prod.backends]]",
            'type = "file"',
            f'name = "{which}"',
            f'path = "files-{which}"',
            f'key = {{ env = "BENCH_RECOVERY_FILE_{which.upper()}" }}',
        ]
    for i in range(args.credentials):
        lines += [
            "[[environments.prod.credentials]]",
            f'name = "c{i:04d}"',
            f'connection_id = "{run}-{i:04d}"',
        ]
    path = folder / "rotator.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Replica:
    name: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_replica(name: str, folder: Path, env: dict[str, str]) -> Replica:
    port = free_port()
    with (folder / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rotator", "--log-level", "warning", "serve", "--port",
             str(port)],
            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    return Replica(name, port, proc)


def healthy(replica: Replica) -> None:
    def answers() -> bool:
        if replica.proc.poll() is not None:
            raise SystemExit(f"replica {replica.name} died at start")
        try:
            return httpx.get(f"{replica.base}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(f"replica {replica.name}", answers, 60, 0.05)


@dataclass
class Trial:
    held: int = 0
    """Leases the killed replica held."""
    served: dict[str, float] = field(default_factory=dict)
    """Seconds from the kill until a token Makini accepts is served, for the credentials that
    were served a dead one at the kill."""
    done: dict[str, float] = field(default_factory=dict)
    """Seconds from the kill until the killed replica's rotation is finished by the other."""
    left: int = 0
    """Leases of the killed replica still in the journal once the wave is over (expired, on
    credentials nobody needs to drive until their next rotation is due)."""


def one_trial(args: argparse.Namespace, url: str, trial: int) -> Trial:
    run = f"rec{trial}-{uuid.uuid4().hex[:6]}"  # fresh connections at the simulator
    result = Trial()
    with database() as journal_url, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = write_config(folder, journal_url, url, args, run)
        env = {
            **os.environ,
            "ROTATOR_CONFIG": str(config),
            "BENCH_RECOVERY_SEAL": generate_key(),
            "BENCH_RECOVERY_FILE_A": generate_key(),
            "BENCH_RECOVERY_FILE_B": generate_key(),
            "BENCH_RECOVERY_SECRET": SECRET,
        }
        env.pop("ROTATOR_FAULT_KILL_AFTER", None)
        victim = start_replica("a", folder, env)
        other = start_replica("b", folder, env)
        sim = httpx.Client(base_url=url, timeout=10)
        db = psycopg.connect(journal_url.replace("+psycopg", ""), autocommit=True)
        try:
            healthy(victim)
            healthy(other)
            opened = Journal(journal_url)
            try:
                key = create_key(opened, "prod", "bench-recovery")[1]
            finally:
                opened.close()

            def promoted(count: int) -> int:
                [(n,)] = db.execute(
                    "SELECT count(*) FROM (SELECT credential FROM rotations WHERE step = 'done' "
                    "GROUP BY credential HAVING count(*) >= %s) AS r", (count,)
                ).fetchall()
                return int(n)

            wait_for("the first tokens", lambda: promoted(1) == args.credentials, 120, 0.2)
            owner = f"{socket.gethostname()[:60]}:{victim.proc.pid}:%"
            dead_window = """
                SELECT r.credential, r.id FROM locks l JOIN rotations r
                  ON l.name = r.environment || '/' || r.credential
                WHERE l.owner LIKE %s AND r.step IN ('issued', 'staged', 'verified')
                  AND r.finished_at IS NULL
            """

            def mid_wave() -> bool:
                second = promoted(2)
                if second >= args.credentials * 3 // 4:
                    raise SystemExit("the wave ended before the kill: raise --credentials")
                if second < args.credentials // 4:
                    return False
                return bool(db.execute(dead_window, (owner,)).fetchall())

            wait_for("the middle of the second wave", mid_wave, args.interval + 120, 0.01)
            victim.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            victim.proc.wait(timeout=10)
            held = {
                str(name).split("/", 1)[1]: None
                for (name,) in db.execute(
                    "SELECT name FROM locks WHERE owner LIKE %s", (owner,)
                ).fetchall()
            }
            open_rows: dict[str, str] = dict(
                db.execute(
                    "SELECT credential, id FROM rotations WHERE step <> 'done' "
                    "AND finished_at IS NULL"
                ).fetchall()
            )
            result.held = len(held)
            pending = {c: open_rows[c] for c in held if c in open_rows}
            dead: set[str] | None = None
            with httpx.Client(base_url=other.base, timeout=5) as api:

                def served_status(cred: str) -> str | None:
                    r = api.get(f"/v1/tokens/prod/{cred}",
                                headers={"Authorization": f"Bearer {key}"})
                    if r.status_code != 200:
                        return None
                    fp = fingerprint(r.json()["token"])
                    view = sim.get(f"/_sim/tokens/{fp}").json()
                    return str(view.get("status"))

                def recovered() -> bool:
                    nonlocal dead
                    now = time.monotonic() - killed
                    states = {c: served_status(c) for c in held if c not in result.served}
                    if dead is None:  # the first look after the kill
                        dead = {c for c, s in states.items() if s != "active"}
                    for cred, status in states.items():
                        if cred in dead and status == "active":
                            result.served[cred] = now
                    for cred, row in pending.items():
                        if cred not in result.done:
                            [(step,)] = db.execute(
                                "SELECT step FROM rotations WHERE id = %s", (row,)
                            ).fetchall()
                            if step == "done":
                                result.done[cred] = now
                    return set(result.served) >= dead and set(result.done) == set(pending)

                wait_for("recovery", recovered, args.lock_ttl + args.tick + 120, 0.05)
            wait_for("the end of the wave", lambda: promoted(2) == args.credentials, 120, 0.2)
            result.left = len(
                db.execute("SELECT name FROM locks WHERE owner LIKE %s", (owner,)).fetchall()
            )
        finally:
            for replica in (victim, other):
                if replica.proc.poll() is None:
                    replica.proc.send_signal(signal.SIGTERM)
                    try:
                        replica.proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        replica.proc.kill()
            db.close()
            sim.close()
    return result


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--credentials", type=int, default=300)
    parser.add_argument("--latency-ms", type=float, default=20)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--lock-ttl", type=int, default=15, help="journal.lock_ttl (s)")
    parser.add_argument("--tick", type=int, default=10, help="scheduler.tick (s)")
    parser.add_argument("--interval", type=int, default=20, help="the schedule's interval (s)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    print(
        f"bench_recovery: 2 replicas on PostgreSQL, {args.credentials} credentials, Makini "
        f"{args.latency_ms:g} ms per call (kills old tokens at issue), concurrency "
        f"{args.concurrency}; journal.lock_ttl {args.lock_ttl} s, scheduler.tick {args.tick} s"
    )
    trials: list[Trial] = []
    with simulator(free_port(), args.latency_ms, f"{CLIENT}:{SECRET}") as url:
        for i in range(args.trials):
            t = one_trial(args, url, i)
            trials.append(t)
            print(
                f"  trial {i + 1}: killed replica held {t.held} leases; "
                f"{len(t.served)} served a dead token: back to an active one after "
                f"p50 {p50(list(t.served.values())):.1f} s, max "
                f"{max(t.served.values(), default=float('nan')):.1f} s; its {len(t.done)} "
                f"rotations finished by the other after p50 {p50(list(t.done.values())):.1f} s, "
                f"max {max(t.done.values(), default=float('nan')):.1f} s; "
                f"{t.left} of its leases left in the journal after the wave",
                flush=True,
            )
    served = [s for t in trials for s in t.served.values()]
    done = [s for t in trials for s in t.done.values()]
    worst = [max(t.served.values()) for t in trials if t.served]
    print(
        f"every credential serves an active token again after (per trial, the last one): "
        f"p50 {p50(worst):.1f} s, max {max(worst, default=float('nan')):.1f} s "
        f"over {len(worst)} trials"
    )
    print(
        f"per credential served a dead token ({len(served)}): p50 {p50(served):.1f} s, "
        f"max {max(served, default=float('nan')):.1f} s; per interrupted rotation "
        f"({len(done)}) finished: p50 {p50(done):.1f} s, max {max(done, default=float('nan')):.1f}"
        f" s  (lock_ttl {args.lock_ttl} s, tick {args.tick} s)"
    )
    if args.json:
        print(json.dumps({
            "lock_ttl_s": args.lock_ttl, "tick_s": args.tick, "credentials": args.credentials,
            "latency_ms": args.latency_ms, "trials": args.trials,
            "all_served_s": worst, "served_s": served, "done_s": done,
        }))


if __name__ == "__main__":
    main()
