"""What importing the Makini client and the simulator loads: the client never the simulator,
the simulator only the signature code of the webhooks (not the journal, not the queue)."""

from __future__ import annotations

from tests.isolation import import_alone


def test_the_client_package_does_not_load_the_simulator() -> None:
    loaded = import_alone("rotator.makini")
    assert "rotator.makini.client" in loaded
    assert not [m for m in loaded if m.startswith("rotator.makini.sim")]


def test_the_simulator_takes_only_the_signature_of_the_webhooks() -> None:
    loaded = import_alone("rotator.makini.sim", refuse=["sqlalchemy"])
    assert "rotator.webhooks.signature" in loaded
    assert "rotator.webhooks.queue" not in loaded and "rotator.journal" not in loaded
