"""An off-boarding is notified: a condition that starts when discovery finds a connection gone
at Makini and is over once the credential is purged (after the grace) or enrolled again, sent
to a real signed HTTPS receiver; an off-boarded credential's near expiry is not notified."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from rotator.crypto import generate_key
from rotator.makini.sim import SimServer
from rotator.notify.notifier import Notifier
from rotator.rotation import discovery
from rotator.rotation.runtime import Runtime
from tests.cli import RotatorCli
from tests.clock import FakeClock
from tests.factories import (
    Runtimes,
    config_toml,
    environment,
    environment_table,
    file_backend,
    make_config,
)
from tests.notify.conftest import Receiver
from tests.notify.test_notify import SECRET, conditions, webhook


def _runtime(runtimes: Runtimes, tmp_path: Path, sim: SimServer, sink: dict[str, Any],
             clock: FakeClock, *, exclude: list[str] | None = None,
             grace: str = "1d") -> Runtime:
    os.environ["NOTIFY_TEST_SECRET"] = SECRET
    table = environment(
        sim.url, "test-prod", [], sealing_env="SEAL_prod",
        backends=[{"type": "memory", "name": "one", "namespace": f"{tmp_path}/one"}],
    )
    table["discover"] = {"enabled": True, "offboard_grace": grace,
                         "exclude": {"id": exclude or []}}
    table["notify"] = {"sinks": [sink]}
    config = make_config(tmp_path, f"sqlite:///{tmp_path / 'journal.db'}", {"prod": table})
    return runtimes.open(config, clock=clock)


async def _notify(notifier: Notifier) -> None:
    for _ in range(2):  # a second look sends nothing more
        await notifier.evaluate()
        await notifier.deliver()


async def test_offboarding_is_notified_and_ends_with_the_purge_or_a_return(
    runtimes: Runtimes, tmp_path: Path, sim: SimServer, https_receiver: Receiver,
    test_ca: Any,
) -> None:
    clock = FakeClock()
    sink = webhook(https_receiver, test_ca[1])
    runtime = _runtime(runtimes, tmp_path, sim, sink, clock)
    # the same journal, configured to leave n-back out: discovery there off-boards it too
    narrowed = _runtime(runtimes, tmp_path, sim, sink, clock, exclude=["n-back"])
    sim.add_connection("n-gone", "test-prod", platform="SAP", company="Acme")
    sim.add_connection("n-back", "test-prod")
    await discovery.discover(runtime, "prod")
    notifier = Notifier(runtime)
    try:
        await _notify(notifier)
        assert conditions(https_receiver) == []  # enrolling is no condition
        sim.remove_connection("n-gone")
        await discovery.discover(narrowed, "prod")
        await _notify(notifier)
        assert sorted(conditions(https_receiver)) == [
            ("offboarded", "firing", "sap-n-gone"),
            ("offboarded", "firing", "simulated-n-back"),
        ]
        gone = next(b for b in https_receiver.bodies() if b["credential"] == "sap-n-gone")
        assert gone["severity"] == "warning"
        assert gone["summary"] == (
            "prod/sap-n-gone is off-boarded: its Makini connection is gone")
        assert "connection n-gone (SAP Acme) is no longer listed by Makini" in gone["detail"]
        assert "tokens stay readable until" in gone["detail"]

        # listed again (here: no longer filtered out): enrolled again, the off-boarding is over
        await discovery.discover(runtime, "prod")
        await _notify(notifier)
        assert conditions(https_receiver)[2:] == [
            ("offboarded", "resolved", "simulated-n-back")]
        assert "listed by Makini again" in https_receiver.bodies()[2]["detail"]

        # past the grace
        clock.advance(timedelta(days=40).total_seconds())
        await discovery.discover(runtime, "prod")
        await _notify(notifier)
        sent = conditions(https_receiver)[3:]
        assert ("offboarded", "resolved", "sap-n-gone") in sent
        purged = next(b for b in https_receiver.bodies()[3:]
                      if b["credential"] == "sap-n-gone")
        assert "unreadable everywhere" in purged["detail"]
    finally:
        await notifier.aclose()


async def test_an_offboarded_credential_near_expiry_is_not_notified(
    runtimes: Runtimes, tmp_path: Path, sim: SimServer, https_receiver: Receiver,
    test_ca: Any,
) -> None:
    clock = FakeClock()
    runtime = _runtime(runtimes, tmp_path, sim, webhook(https_receiver, test_ca[1]), clock,
                       grace="90d")
    sim.add_connection("x-gone", "test-prod")
    sim.add_connection("x-kept", "test-prod")
    await discovery.discover(runtime, "prod")
    sim.remove_connection("x-gone")
    await discovery.discover(runtime, "prod")
    clock.advance(timedelta(days=29, hours=12).total_seconds())  # both tokens near expiry
    notifier = Notifier(runtime)
    try:
        for drift in (False, True):  # from the journal alone, and with the backends read
            await notifier.evaluate(drift=drift)
            await notifier.deliver()
    finally:
        await notifier.aclose()
    sent = conditions(https_receiver)
    assert ("near_expiry", "firing", "simulated-x-kept") in sent  # the control
    assert ("offboarded", "firing", "simulated-x-gone") in sent
    assert not any(c == "near_expiry" and who == "simulated-x-gone" for c, _, who in sent)


def test_discover_notifies_an_offboarding_at_once(
    tmp_path: Path, sim: SimServer, https_receiver: Receiver, test_ca: Any
) -> None:
    """``rotator discover`` (a subprocess) sends the notification itself, before it exits."""
    prod = environment_table(
        sim.url, "test-prod", [], sealing_env="DISC_SEAL", secret_env="DISC_SECRET",
        backends=[file_backend("files/prod", "keys/prod-file.key")],
    )
    prod["discover"] = {"enabled": True}
    prod["notify"] = {"sinks": [webhook(https_receiver, test_ca[1])]}
    cli = RotatorCli(tmp_path, config_toml({"url": "sqlite:///journal.db"}, {"prod": prod}), {
        "DISC_SEAL": generate_key(), "DISC_SECRET": "test-prod-secret",
        "NOTIFY_TEST_SECRET": SECRET,
    })
    sim.add_connection("cli-off", "test-prod")
    assert cli("discover", "prod").returncode == 0
    assert conditions(https_receiver) == []
    sim.remove_connection("cli-off")
    out = cli("discover", "prod")
    assert out.returncode == 0, out.stderr
    assert conditions(https_receiver) == [("offboarded", "firing", "simulated-cli-off")]
