"""The image's command lines, read from the rendered manifests and run outside a container with
the project's own `rotator`: the CronJob's `run-due` against the Makini simulator, the
Deployment's `serve` answering its probes and stopping within its grace period, and
`config check` on each overlay's ConfigMap.

The container's environment is reproduced from the manifest: plain values as written, each
secretKeyRef filled as the operator's Secret would be, and the paths the pod mounts
(/etc/rotator, /var/lib/rotator) mapped to temporary folders. The only edits to a ConfigMap's
configuration are the ones no test machine can honour: Makini's URL (the simulator) and the
cloud backends (an encrypted file backend instead)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rotator.crypto import generate_key
from rotator.makini.sim import SimOptions, SimServer
from tests.infra._infra import Render, container

ROTATOR = Path(sys.executable).parent / "rotator"
CLIENTS = {"prod-admin-client": "infra-prod-secret", "dev-admin-client": "infra-dev-secret"}
MOUNTS = ("/etc/rotator", "/var/lib/rotator")

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def makini() -> Iterator[SimServer]:
    with SimServer(SimOptions(clients=CLIENTS)) as server:
        yield server


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }"
    raise TypeError(type(value))


def to_toml(data: dict[str, Any]) -> str:
    """Enough TOML for a configuration: every top-level key as one inline value."""
    return "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in data.items())


class Pod:
    """One workload's container, reproduced on this machine."""

    def __init__(self, render: Render, kind: str, tmp: Path, makini: SimServer | None) -> None:
        self.render = render
        self.obj = render.one(kind)
        pod = (self.obj["spec"]["template"]["spec"] if kind == "Deployment"
               else self.obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])
        self.pod = pod
        self.container = container(pod)
        self.root = tmp
        for mount in MOUNTS:
            self.path(mount).mkdir(parents=True, exist_ok=True)
        self.secrets = {
            "makini-client-secret": CLIENTS[self.env_config()["makini"]["client_id"]],
            "sealing-key": generate_key(),
            # the journal Secret of journal-postgres: this machine's journal is a file
            "url": f"sqlite:///{self.path('/var/lib/rotator')}/journal.db",
        }
        config = tomllib.loads(render.config_toml())
        if makini is not None:
            env = config["environments"][render.env]
            env["makini"]["base_url"] = makini.url
            env["makini"]["retry"] = {"max_attempts": 2, "base_delay_s": 0.01,
                                      "max_delay_s": 0.05, "total_timeout_s": 5}
            env["backends"] = [{
                "type": "file", "name": "local",
                "path": f"{self.path('/var/lib/rotator')}/backends",
                "key": {"file": f"{self.path('/var/lib/rotator')}/file.key", "generate": True},
            }]
        self.config = self.path("/etc/rotator") / "rotator.toml"
        self.config.write_text(to_toml(config))

    def env_config(self) -> dict[str, Any]:
        return dict(tomllib.loads(self.render.config_toml())["environments"][self.render.env])

    def path(self, mounted: str) -> Path:
        return self.root / mounted.strip("/").replace("/", "-")

    def remap(self, value: str) -> str:
        for mount in MOUNTS:
            value = value.replace(mount, str(self.path(mount)))
        return value

    def environ(self) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.root), "LANG": "C.UTF-8",
               "COLUMNS": "200"}
        for entry in self.container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = self.remap(str(entry["value"]))
            else:
                ref = entry["valueFrom"]["secretKeyRef"]
                assert ref["name"] == f"makini-rotator-secrets-{self.render.env}" or ref[
                    "name"] == f"makini-rotator-journal-{self.render.env}", ref
                env[entry["name"]] = self.secrets[ref["key"]]
        assert env["ROTATOR_CONFIG"] == str(self.config)
        return env

    def argv(self) -> list[str]:
        argv = list(self.container.get("command", [])) + list(self.container.get("args", []))
        assert argv[0] == "rotator", "the image's console script"
        return [str(ROTATOR), *argv[1:]]

    def run(self, *argv: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), env=self.environ(), cwd=self.path("/var/lib/rotator"),
            capture_output=True, text=True, timeout=timeout,
        )

    def leaks(self, text: str) -> list[str]:
        return [k for k, v in self.secrets.items() if k != "url" and v in text]


@pytest.mark.parametrize("key", [("prod", "shipped"), ("dev", "cronjob")],
                         ids=["prod-shipped", "dev-cronjob"])
def test_the_cronjob_command_line_rotates_what_is_due(
    renders: dict[tuple[str, str], Render], tmp_path: Path, makini: SimServer,
    key: tuple[str, str],
) -> None:
    pod = Pod(renders[key], "CronJob", tmp_path, makini)
    argv = pod.argv()
    assert argv[1:] == ["run-due"]
    first = pod.run(*argv)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Traceback" not in first.stderr
    status = pod.run(str(ROTATOR), "status", "--json")
    assert status.returncode == 0, status.stderr
    rows = [r for r in json.loads(status.stdout) if r["environment"] == key[0]]
    names = {c["name"] for c in pod.env_config()["credentials"]}
    assert {r["credential"] for r in rows} == names
    assert all(r["current_version"] for r in rows), rows
    again = pod.run(*argv)
    assert again.returncode == 0, again.stdout + again.stderr
    for proc in (first, status, again):
        assert not pod.leaks(proc.stdout + proc.stderr)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_deployment_command_line_answers_its_probes_and_stops_in_time(
    renders: dict[tuple[str, str], Render], tmp_path: Path, makini: SimServer
) -> None:
    pod = Pod(renders[("prod", "shipped")], "Deployment", tmp_path, makini)
    argv = pod.argv()
    assert argv[1] == "serve"
    # listen on loopback and a free port rather than 0.0.0.0:8080 on a shared machine
    port = free_port()
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    probes = {name: pod.container[name]["httpGet"]["path"]
              for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(argv, env=pod.environ(), cwd=pod.path("/var/lib/rotator"),
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        answered: dict[str, int] = {}
        while time.monotonic() < deadline and len(answered) < len(probes):
            assert proc.poll() is None, f"serve exited: {Path(log.name).read_text()}"
            for name, path in probes.items():
                try:
                    status = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code
                except httpx.TransportError:
                    continue
                if status == 200:
                    answered[name] = status
            time.sleep(0.2)
        assert set(answered) == set(probes), f"{answered}: {Path(log.name).read_text()}"
        grace = pod.pod.get("terminationGracePeriodSeconds", 30)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=grace)
        # uvicorn shuts down gracefully, then re-raises the signal it caught: -SIGTERM is a
        # clean stop too; only a stop within the grace period matters to Kubernetes
        assert code in (0, -signal.SIGTERM), f"exit {code}: {Path(log.name).read_text()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert not pod.leaks((tmp_path / "serve.log").read_text())


@pytest.mark.parametrize("env", ["prod", "dev"])
def test_the_config_map_passes_config_check_with_the_pods_environment(
    renders: dict[tuple[str, str], Render], tmp_path: Path, env: str
) -> None:
    """The ConfigMap as shipped (real cloud backends), with the variables the pod gets."""
    pod = Pod(renders[(env, "shipped")], "Deployment", tmp_path, None)
    proc = pod.run(str(ROTATOR), "config", "check", str(pod.config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not pod.leaks(proc.stdout + proc.stderr)
