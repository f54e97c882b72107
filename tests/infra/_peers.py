"""The real monitoring peers the tests run: Prometheus, promtool and the Pushgateway, from the
Debian packages infra/peers.mk installs. A missing binary fails the test and names the step."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.wait import wait_until

PEERS_STEP = (
    "`make test` installs it (infra/peers.mk: apt-get install prometheus "
    "prometheus-pushgateway prometheus-alertmanager chromium chromium-driver)"
)


def binary(name: str) -> str:
    """The path of ``name``; its absence fails the test with the step that installs it."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {PEERS_STEP}")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def running(
    argv: list[str],
    ready_url: str,
    log: Path,
    what: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[None]:
    """``argv`` in the background until the block ends, once ``ready_url`` answers 200; its
    output goes to ``log`` (shown if it never gets ready)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        try:
            wait_until(
                f"{what} to answer {ready_url}",
                lambda: proc.poll() is not None or _ready(ready_url),
                timeout_s=30,
            )
        except AssertionError:
            raise AssertionError(f"{what} did not start:\n{log.read_text()[-3000:]}") from None
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def pushgateway(folder: Path) -> Iterator[str]:
    """A Pushgateway on 127.0.0.1; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        binary("prometheus-pushgateway"),
        f"--web.listen-address=127.0.0.1:{port}",
        "--persistence.file=",  # Debian's default persists to /var/lib/prometheus: memory only
    ]
    with running(argv, f"{url}/-/ready", folder / "pushgateway.log", "the Pushgateway"):
        yield url


@contextlib.contextmanager
def prometheus(folder: Path, config: str) -> Iterator[str]:
    """A Prometheus on 127.0.0.1 with ``config`` (YAML text); yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (folder / "prometheus.yml").write_text(config)
    argv = [
        binary("prometheus"),
        f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with running(argv, f"{url}/-/ready", folder / "prometheus.log", "Prometheus"):
        yield url
