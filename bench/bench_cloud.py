"""Rotating 1,000 credentials of one environment fanned out to the three cloud backends.

AWS Secrets Manager (moto) is the primary, Vault (a real OpenBao dev server) and Azure Key Vault
(the test suite's HTTPS emulator, real SDK) are replicas; the Makini simulator answers with no
added latency by default. Every server runs in its own process, and so does each measured run,
so that nothing shares a GIL with the rotator.

Two rounds, as ``rotator run-due`` would run them from a CronJob:

1. first tokens: per credential read the primary, issue, seal, stage x3, verify, promote x3;
2. rotation: the same, plus retire (read the old version, make it unreadable x3).

Each round is measured against the same round's **lower bound**: the same backend calls
(``read``; ``stage_pending``, ``promote`` on every backend at once; in round 2 ``read_version`` and
``make_unreadable`` on every backend) for as many other credentials, at the same concurrency and
with as many worker threads as the engine, made directly on the backends: no engine, journal,
sealing or Makini. The goal is a ratio of at most 1.5x. Printed: wall time of the measured section
and of the whole process, ratio, peak RSS of the process, and the machine's load (``uptime``).

    .venv/bin/python -m bench.bench_cloud [--credentials 1000] [--concurrency 32]
        [--latency-ms 0]

The rotation runs the engine in-process (``rotator.service.run_due_once`` on a runtime opened
from a TOML file, which is what ``rotator run-due`` does in one process, and each of its forked
workers does with its share) rather than as ``rotator run-due``: the
Azure credential for the emulator can only be handed over through
``backends.azure.credential_factory``, never through the file or the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.simulator import start_simulator

ROOT = Path(__file__).resolve().parents[1]
"""The repository: each child process runs this module from it (``python -m``)."""

CLIENT, SECRET = "bench-prod", "bench-prod-secret"
ENV = "prod"
REGION = "eu-west-1"
KEYVAULT_TOKEN = "test-token"  # the emulator's default bearer token with every permission


# --- servers, each in its own process ------------------------------------------------------


def serve_moto() -> None:
    """Child process: moto's Secrets Manager; prints its endpoint, serves until stdin closes."""
    from tests.servers.aws_server import MotoServer

    server = MotoServer()
    print(json.dumps({"url": server.start()}), flush=True)
    sys.stdin.read()
    server.stop()


def serve_keyvault(folder: str) -> None:
    """Child process: the Key Vault emulator over HTTPS; prints its URL and CA file."""
    from tests.servers.keyvault_emulator import KeyVaultEmulator

    emulator = KeyVaultEmulator(Path(folder))
    url = emulator.start()
    print(json.dumps({"url": url, "ca": str(emulator.ca_path)}), flush=True)
    sys.stdin.read()
    emulator.stop()


def child_server(args: list[str]) -> tuple[subprocess.Popen[str], dict[str, str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_cloud", *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"server {args} did not start")
    return proc, json.loads(line)


def stop_child(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# --- the configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class Servers:
    sim: str
    moto: str
    vault: str
    keyvault: str
    keyvault_ca: str


def write_config(folder: Path, s: Servers, count: int, concurrency: int) -> Path:
    lines = [
        "[journal]",
        'url = "sqlite:///journal.db"',
        "[scheduler]",
        f"concurrency = {concurrency}",
        "[logging]",
        'level = "warning"',
        f"[environments.{ENV}]",
        'sealing_key = { env = "BENCH_SEAL" }',
        f"[environments.{ENV}.makini]",
        f'base_url = "{s.sim}"',
        f'client_id = "{CLIENT}"',
        'client_secret_env = "BENCH_SECRET"',
        "issue_invalidates_previous = true",
        f"max_concurrency = {concurrency}",
        f"[environments.{ENV}.schedule]",
        'interval = "1s"',
        'grace_period = "0s"',
        f"[[environments.{ENV}.backends]]",
        'type = "aws"',
        'name = "aws"',
        f'region = "{REGION}"',
        f'endpoint_url = "{s.moto}"',
        f"[[environments.{ENV}.backends]]",
        'type = "vault"',
        'name = "vault"',
        f'url = "{s.vault}"',
        f"[[environments.{ENV}.backends]]",
        'type = "azure"',
        'name = "azure"',
        f'vault_url = "{s.keyvault}"',
        f'connection_verify = "{s.keyvault_ca}"',
        "verify_challenge_resource = false",
    ]
    for i in range(count):
        lines += [
            f"[[environments.{ENV}.credentials]]",
            f'name = "c{i:05d}"',
            f'connection_id = "bench-{i:05d}"',
        ]
    path = folder / "rotator.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def worker_env(vault_token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VAULT_"))}
    env.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "VAULT_TOKEN": vault_token,
            "BENCH_SECRET": SECRET,
            "ROTATOR_LOG_LEVEL": "warning",
        }
    )
    return env


# --- the measured runs (each in a fresh process) --------------------------------------------


def _azure_credential() -> None:
    import backends.azure as azure_module
    from tests.servers.keyvault_emulator import TestCredential

    def factory(settings: azure_module.AzureSettings) -> Any:
        return TestCredential(KEYVAULT_TOKEN)

    azure_module.credential_factory = factory


def work_rotate(config_path: Path) -> dict[str, Any]:
    """One ``run-due`` in this process: every credential is due."""
    from rotator import logs
    from rotator.revoke import resume_held
    from rotator.rotation.runtime import Runtime
    from rotator.service import run_due_once
    from rotator.settings import load_config

    logs.configure("warning")
    _azure_credential()
    runtime = Runtime.open(load_config(config_path), resume_revoke=resume_held)

    async def run() -> tuple[float, dict[str, int]]:
        try:
            start = time.perf_counter()
            results = await run_due_once(runtime)
            elapsed = time.perf_counter() - start
        finally:
            await runtime.aclose()
        outcomes: dict[str, int] = {}
        for r in results:
            outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
        return elapsed, outcomes

    elapsed, outcomes = asyncio.run(run())
    return {"seconds": elapsed, "outcomes": outcomes}


def work_bound(config_path: Path, count: int, retire: bool) -> dict[str, Any]:
    """The backend calls of one round alone, for credentials ``b00000``..., at the engine's
    concurrency and with as many worker threads as the engine has."""
    from backends import build
    from backends.base import Backend
    from rotator import logs
    from rotator.model import Secret, Stage, StoredVersion, TokenPair, new_version_id, utcnow
    from rotator.settings import load_config

    logs.configure("warning")
    _azure_credential()
    config = load_config(config_path)
    env = config.environments[ENV]
    built: list[Backend] = [build(b, ENV) for b in env.backend_settings]
    primary = built[0]
    concurrency = config.scheduler.concurrency
    pool = ThreadPoolExecutor(max_workers=max(4, concurrency))

    async def run() -> float:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency)

        async def each(fn: Any) -> None:
            await asyncio.gather(*(loop.run_in_executor(pool, fn, b) for b in built))

        async def one(i: int) -> None:
            name = f"b{i:05d}"
            async with gate:
                old = await loop.run_in_executor(pool, primary.read, name, Stage.CURRENT)
                token = TokenPair(
                    Secret(secrets.token_urlsafe(32)),
                    Secret(secrets.token_urlsafe(32)),
                    utcnow() + timedelta(days=30),
                )
                new = StoredVersion(ENV, name, new_version_id(), token, created_at=utcnow())
                await each(lambda b: b.stage_pending(new))
                await each(lambda b: b.promote(name, new.version_id))
                if retire and old is not None:
                    await loop.run_in_executor(pool, primary.read_version, name, old.version_id)
                    await each(lambda b: b.make_unreadable(name, old.version_id))

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        return time.perf_counter() - start

    try:
        elapsed = asyncio.run(run())
    finally:
        pool.shutdown()
        for b in built:
            b.close()
    return {"seconds": elapsed}


@dataclass(frozen=True)
class Measured:
    seconds: float
    process_seconds: float
    rss_mb: float
    cpu_s: float
    servers_cpu_s: dict[str, float]
    pool_overflows: int
    """urllib3 "Connection pool is full, discarding connection" warnings the run logged"""
    detail: dict[str, Any]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(args: list[str], env: dict[str, str], servers: dict[str, int]) -> Measured:
    before = {name: cpu_seconds(pid) for name, pid in servers.items()}
    start = time.perf_counter()
    proc = subprocess.Popen(
        # from the repository (python -m); the configuration's paths are relative to its folder
        [sys.executable, "-m", "bench.bench_cloud", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(err.decode()[-3000:])
        raise SystemExit(f"{args[:2]} failed with exit code {proc.returncode}")
    detail = json.loads(out.decode().strip().splitlines()[-1])
    used = {name: cpu_seconds(pid) - before[name] for name, pid in servers.items()}
    overflows = err.decode(errors="replace").count("Connection pool is full")
    return Measured(
        detail.pop("seconds"),
        elapsed,
        detail.pop("rss_mb"),
        detail.pop("cpu_s"),
        used,
        overflows,
        detail,
    )


def worker_main(kind: str, config: Path, count: int, retire: bool) -> None:
    result = work_rotate(config) if kind == "rotate" else work_bound(config, count, retire)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["rss_mb"] = usage.ru_maxrss / 1024
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    print(json.dumps(result), flush=True)


# --- the benchmark --------------------------------------------------------------------------


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        one, five, fifteen = os.getloadavg()
        return f"load average: {one:.2f}, {five:.2f}, {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--credentials", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="Makini simulator latency")
    parser.add_argument("--sim-port", type=int, default=18766)
    # internal: the child processes
    parser.add_argument("--serve", choices=["moto", "keyvault"], help=argparse.SUPPRESS)
    parser.add_argument("--serve-dir", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["rotate", "bound"], help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--retire", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve == "moto":
        return serve_moto()
    if args.serve == "keyvault":
        return serve_keyvault(args.serve_dir)
    if args.worker:
        return worker_main(args.worker, args.config, args.credentials, args.retire)

    from rotator.crypto import generate_key
    from tests.servers.openbao_server import OpenBaoServer

    with tempfile.TemporaryDirectory(prefix="bench-cloud-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        moto, moto_info = child_server(["--serve", "moto"])
        keyvault, kv_info = child_server(["--serve", "keyvault", "--serve-dir", tmp])
        bao = OpenBaoServer()
        sim = None
        try:
            bao.start()
            sim = start_simulator(args.sim_port, args.latency_ms, f"{CLIENT}:{SECRET}")
            servers = Servers(
                sim=f"http://127.0.0.1:{args.sim_port}",
                moto=moto_info["url"],
                vault=bao.url,
                keyvault=kv_info["url"],
                keyvault_ca=kv_info["ca"],
            )
            config = write_config(folder, servers, args.credentials, args.concurrency)
            env = {**worker_env(bao.root_token), "BENCH_SEAL": generate_key()}
            print(
                f"{args.credentials} credentials, concurrency {args.concurrency}, "
                f"backends aws (moto, primary) + vault (OpenBao) + azure (Key Vault emulator, "
                f"HTTPS), Makini latency {args.latency_ms:.0f} ms, SQLite journal; servers up "
                f"in {time.perf_counter() - started:.1f} s"
            )
            print(f"  load before: {load()}")
            common = ["--config", str(config), "--credentials", str(args.credentials)]
            bao_proc = bao._proc  # the test helper keeps its process private
            assert bao_proc is not None
            pids = {
                "moto": moto.pid,
                "openbao": bao_proc.pid,
                "keyvault": keyvault.pid,
                "makini-sim": sim.pid,
            }
            # the journal (its schema) is made once, beforehand: not what a run repeats
            subprocess.run(
                [sys.executable, "-m", "rotator", "--config", str(config), "plan", "--json"],
                env=env,
                cwd=folder,
                check=True,
                stdout=subprocess.DEVNULL,
            )
            rounds = []
            for label, retire in (
                ("first tokens (issue, seal, stage x3, verify, promote x3)", False),
                ("rotation (the above + retire: make unreadable x3)", True),
            ):
                extra = ["--retire"] if retire else []
                bound = measure(["--worker", "bound", *common, *extra], env, pids)
                run = measure(["--worker", "rotate", *common], env, pids)
                rounds.append((label, run, bound, load()))
                time.sleep(1.1)  # interval 1s: every credential is due again
            for label, run, bound, when in rounds:
                ratio = run.seconds / bound.seconds
                print(f"  {label}:")
                print(
                    f"    rotation     {run.seconds:7.2f} s  (process {run.process_seconds:6.2f} s)"
                    f"  peak RSS {run.rss_mb:6.1f} MB  {run.detail['outcomes']}"
                )
                print(
                    f"    lower bound  {bound.seconds:7.2f} s  (process "
                    f"{bound.process_seconds:6.2f} s)  peak RSS {bound.rss_mb:6.1f} MB"
                )
                verdict = "ok" if ratio <= 1.5 else "ABOVE the 1.5x goal"
                print(f"    ratio        {ratio:7.2f}x  ({verdict})")
                for what, m in (("rotation", run), ("lower bound", bound)):
                    spent = ", ".join(f"{k} {v:.1f}" for k, v in m.servers_cpu_s.items())
                    print(
                        f"    CPU s during {what}: itself {m.cpu_s:.1f}; {spent}; "
                        f"HTTP pool overflows {m.pool_overflows}"
                    )
                print(f"    load after:  {when}")
        finally:
            if sim is not None:
                sim.terminate()
                sim.wait(timeout=10)
            bao.stop()
            stop_child(keyvault)
            stop_child(moto)


if __name__ == "__main__":
    main()
