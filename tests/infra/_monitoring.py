"""A ``rotator`` (subprocesses: ``run-due``, ``serve``) against the simulator, with metrics
configured, and reading what a Pushgateway or ``/metrics`` holds."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from rotator.crypto import generate_key
from tests.cli import RotatorCli
from tests.factories import SHORT_RETRY, config_toml, credentials, environment_table, file_backend
from tests.infra._peers import free_port, running

Samples = list[tuple[str, dict[str, str], float]]


class Monitored(RotatorCli):
    """One environment, ``prod``, two file backends, a credential per name; ``metrics`` is the
    ``[metrics]`` table."""

    def __init__(
        self,
        folder: Path,
        sim: Any,
        metrics: dict[str, Any],
        *,
        names: tuple[str, ...] = ("alpha", "beta"),
        journal: str = "sqlite:///journal.db",
        schedule: dict[str, Any] | None = None,
    ) -> None:
        prod = environment_table(
            sim.url,
            "test-prod",
            credentials(*names),
            sealing_env="MON_PROD_SEAL",
            secret_env="MON_PROD_SECRET",
            backends=[
                file_backend("files/one", "keys/one.key", "primary"),
                file_backend("files/two", "keys/two.key", "replica"),
            ],
            retry=SHORT_RETRY,
            schedule=schedule or {"interval": "1h", "grace_period": "0s"},
        )
        text = config_toml(journal, {"prod": prod}, metrics=metrics)
        super().__init__(
            folder, text, {"MON_PROD_SEAL": generate_key(), "MON_PROD_SECRET": "test-prod-secret"}
        )

    def token(self, name: str) -> str:
        proc = self("get", "prod", name)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    @contextlib.contextmanager
    def serving(self) -> Iterator[str]:
        """``rotator serve`` on a free port until the block ends; yields its URL."""
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [
            sys.executable,
            "-m",
            "rotator",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        log = self.dir / "serve.log"
        with running(argv, f"{url}/healthz", log, "rotator serve", self.env, self.dir):
            yield url


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition."""
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def scrape(url: str) -> tuple[str, Samples]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return text, samples(text)


def value(found: Samples, name: str, **labels: str) -> float | None:
    """The one sample ``name`` whose labels include ``labels`` (None if there is none)."""
    hits = [v for n, lab, v in found if n == name and labels.items() <= lab.items()]
    assert len(hits) <= 1, (name, labels, hits)
    return hits[0] if hits else None


def run(cli: RotatorCli, *args: str) -> subprocess.CompletedProcess[str]:
    proc = cli(*args)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc
