"""The notifier in the two modes, as the ``rotator`` command runs them (a subprocess): ``run-due``
delivers at its end, ``serve`` as soon as a drive fails."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

from rotator.crypto import generate_key
from rotator.makini.sim import SimServer
from rotator.webhooks.signature import signature_valid
from tests.cli import RotatorCli
from tests.factories import config_toml, environment_table, file_backend
from tests.notify.conftest import Receiver
from tests.wait import wait_until

SECRET = "modes-signing-secret"


def cli(tmp_path: Path, sim: SimServer, receiver: Receiver, ca: Path) -> RotatorCli:
    prod = environment_table(
        sim.url,
        "test-prod",
        [{"name": "a", "connection_id": "conn-modes-a"}],
        sealing_env="MODES_SEAL",
        secret_env="MODES_SECRET",
        backends=[file_backend("files/prod", "keys/prod-file.key")],
    )
    prod["notify"] = {
        "sinks": [
            {
                "type": "webhook",
                "name": "oncall",
                "url": receiver.url,
                "secret_env": "MODES_NOTIFY_SECRET",
                "ca_file": str(ca),
                "conditions": ["rotation_failed"],
            }
        ]
    }
    text = config_toml({"url": "sqlite:///journal.db"}, {"prod": prod}, scheduler={"tick": "1s"})
    env = {
        "MODES_SEAL": generate_key(),
        "MODES_SECRET": "test-prod-secret",
        "MODES_NOTIFY_SECRET": SECRET,
    }
    return RotatorCli(tmp_path, text, env)


def signed_bodies(receiver: Receiver) -> list[Any]:
    for got in receiver.received:
        assert signature_valid(SECRET.encode(), got.body, got.headers["x-rotator-signature"])
    return receiver.bodies()


def test_run_due_delivers_at_its_end(
    tmp_path: Path, sim: SimServer, https_receiver: Receiver, test_ca: Any
) -> None:
    rotator = cli(tmp_path, sim, https_receiver, test_ca[1])
    sim.set(fail_next=[403])
    failed = rotator("run-due")
    assert failed.returncode == 1, failed.stderr
    [body] = signed_bodies(https_receiver)
    assert (body["condition"], body["state"], body["credential"]) == (
        "rotation_failed",
        "firing",
        "a",
    )

    forced = rotator("rotate", "prod", "a")
    assert forced.returncode == 0, forced.stderr
    done = rotator("run-due")  # the next run sees it rotated, and says so
    assert done.returncode == 0, done.stderr
    states = [(b["condition"], b["state"]) for b in signed_bodies(https_receiver)]
    assert states == [("rotation_failed", "firing"), ("rotation_failed", "resolved")]
    tokens = list(sim.state.tokens)
    assert tokens
    for text in [r.body.decode() for r in https_receiver.received] + rotator.outputs:
        assert not any(token in text for token in tokens)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_delivers_while_it_runs(
    tmp_path: Path, sim: SimServer, https_receiver: Receiver, test_ca: Any
) -> None:
    rotator = cli(tmp_path, sim, https_receiver, test_ca[1])
    sim.set(fail_next=[403])
    proc = rotator.start("serve", "--port", str(_free_port()))
    try:
        wait_until("the notification from serve", https_receiver.count, timeout_s=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    [body] = signed_bodies(https_receiver)
    assert (body["condition"], body["state"]) == ("rotation_failed", "firing")
