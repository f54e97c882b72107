"""`sync` repairs a backend that drifted from the journal; `probe` checks each backend's access."""

from __future__ import annotations

from pathlib import Path

from rotator.makini.sim import SimServer
from rotator.model import Stage
from rotator.rotation.repair import probe, sync
from tests.core.conftest import Factory, current


async def test_sync_repairs_drift_and_reports(
    make_runtime: Factory, sim: SimServer, tmp_path: Path
) -> None:
    runtime = make_runtime(
        [{"name": "a", "connection_id": "conn-a"}, {"name": "b", "connection_id": "conn-b"}]
    )
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    await runtime.engine.rotate("prod", "b", reason="t", actor="t")
    [primary, replica] = runtime.environments["prod"].backends
    truth = primary.read("a", Stage.CURRENT)
    assert truth is not None
    replica.delete("a")  # drift: the replica lost credential a entirely
    dry = await sync(runtime, "prod", dry_run=True, actor="t")
    assert {(c.credential, c.backend, c.action) for c in dry if c.action != "in-sync"} == {
        ("a", replica.name, "would-copy+promote")
    }
    assert replica.read("a", Stage.CURRENT) is None  # the dry run changed nothing
    changes = await sync(runtime, "prod", actor="t")
    repaired = [c for c in changes if c.action == "copied+promoted"]
    assert [(c.credential, c.backend) for c in repaired] == [("a", replica.name)]
    assert {v.version_id for v in current(runtime) if v} == {truth.version_id}
    again = await sync(runtime, "prod", actor="t")
    assert {c.action for c in again} == {"in-sync"}
    assert runtime.journal.audit_entries(action="backend.synced")


async def test_sync_never_repairs_back_to_a_version_replaced_after_its_list_was_read(
    make_runtime: Factory, sim: SimServer, monkeypatch: object
) -> None:
    # sync lists the journal's current versions, then takes each credential's lease: a
    # rotation that promoted a newer version in between must not be "repaired" back to the
    # older one (the decision is made again under the lease)
    runtime = make_runtime()
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    listed = runtime.journal.states("prod")  # sync's list, read now...
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")  # ...then a rotation
    newer = runtime.journal.state("prod", "a")
    assert newer is not None
    runtime.journal.states = lambda environment=None: listed  # type: ignore[method-assign]
    changes = await sync(runtime, "prod", actor="t")
    assert {c.action for c in changes} == {"in-sync"}
    assert {v.version_id for v in current(runtime) if v} == {newer.current_version_id}


async def test_probe_checks_every_backend(make_runtime: Factory) -> None:
    runtime = make_runtime()
    results = await probe(runtime)
    assert len(results) == 2 and all(r.ok for r in results)
    assert set(results[0].steps) == {
        "reach",
        "write",
        "read",
        "promote",
        "make unreadable",
        "delete",
    }
    for backend in runtime.environments["prod"].backends:
        assert "rotator-probe" not in backend.credentials()


async def test_sync_dry_run_says_what_sync_then_does_even_where_it_fails(
    make_runtime: Factory, sim: SimServer
) -> None:
    runtime = make_runtime()
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    for backend in runtime.environments["prod"].backends:
        backend.delete("a")  # no backend holds the journal's current version any more
    dry = await sync(runtime, "prod", dry_run=True, actor="t")
    done = await sync(runtime, "prod", actor="t")
    assert [(c.backend, c.action) for c in dry] == [(c.backend, c.action) for c in done]
    assert {c.action for c in dry} == {"failed"}
    assert all("rotate this credential" in c.detail for c in dry)
