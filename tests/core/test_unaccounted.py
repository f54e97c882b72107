"""The ledger of tokens Makini may have issued that nobody holds: when an entry closes.

An entry must never close while its token may still be live (that would hide it), and must
close once it surely is dead (else ``rotator status`` exits 3 for nothing, for ever)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from rotator.journal import Journal
from rotator.makini.client import Issued
from rotator.makini.sim import SimServer
from rotator.model import utcnow
from rotator.rotation import unaccounted
from tests.core.conftest import Factory, current

REVOKE_PATH = "/api/system/tokens/revoke"

LIFETIME = timedelta(days=30)
LATE = timedelta(seconds=10)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(f"sqlite:///{tmp_path / 'journal.db'}")
    yield j
    j.close()


def _record(journal: Journal, cred: str = "a") -> int:
    lost = unaccounted.Lost(
        environment="prod",
        credential=cred,
        connection_id=f"conn-{cred}",
        rotation_id=None,
        asked_at=utcnow() - timedelta(minutes=5),
        cause="the answer was lost",
    )
    return journal.transaction("test", lambda c: unaccounted.record(journal, c, lost, actor="t"))


def _after_issue(
    journal: Journal, *, invalidates: bool, asked_at: datetime | None = None
) -> None:
    when = asked_at or utcnow()
    journal.transaction(
        "test",
        lambda c: unaccounted.after_issue(
            journal, c, "prod", "a", asked_at=when, lifetime=LIFETIME, late=LATE,
            invalidates=invalidates, actor="rotator",
        ),
    )


def _open_count(journal: Journal, cred: str = "a") -> int:
    state = journal.state("prod", cred)
    assert state is not None
    return state.unaccounted


def test_the_latest_expiry_counts_from_when_the_answer_was_known_lost(journal: Journal) -> None:
    entry = _record(journal)
    _after_issue(journal, invalidates=False)
    [row] = unaccounted.entries(journal)
    # asked 5 minutes before it was recorded: a token issued late in that request lives
    # until recorded_at + lifetime at the latest (plus a request timeout), not asked_at's
    assert row.id == entry and row.live_until == row.recorded_at + LATE + LIFETIME
    assert unaccounted.expire(journal, row.live_until - timedelta(seconds=1)) == 0
    assert _open_count(journal) == 1

    assert unaccounted.expire(journal, row.live_until + timedelta(seconds=1)) == 1

    [row] = unaccounted.entries(journal, include_closed=True)
    assert row.status == unaccounted.RESOLVED and row.resolution == unaccounted.EXPIRED
    assert _open_count(journal) == 0
    [audited] = journal.audit_entries(action="token.unaccounted_resolved")
    assert audited.as_dict()["detail"]["unaccounted_id"] == entry


def test_an_issue_kills_only_the_tokens_asked_for_before_it(journal: Journal) -> None:
    first = _record(journal)
    between = utcnow()
    second = _record(journal)

    _after_issue(journal, invalidates=True, asked_at=between)

    status = {r.id: r.status for r in unaccounted.entries(journal, include_closed=True)}
    assert status == {first: unaccounted.RESOLVED, second: unaccounted.OPEN}
    assert _open_count(journal) == 1


def test_a_disconnect_resolves_every_entry_of_its_credential_only(journal: Journal) -> None:
    mine = [_record(journal), _record(journal)]
    other = _record(journal, "b")

    journal.transaction(
        "test",
        lambda c: unaccounted.resolve_all(journal, c, "prod", "a", "disconnected", "t"),
    )

    status = {r.id: r.status for r in unaccounted.entries(journal, include_closed=True)}
    assert status == {**dict.fromkeys(mine, unaccounted.RESOLVED), other: unaccounted.OPEN}
    assert (_open_count(journal), _open_count(journal, "b")) == (0, 1)


@pytest.mark.parametrize("revoke_path", [True, False], ids=["revoke-path", "no-revoke-path"])
async def test_a_token_that_arrives_after_the_lease_was_lost(
    make_runtime: Factory, sim: SimServer, monkeypatch: pytest.MonkeyPatch, revoke_path: bool
) -> None:
    """The worker was paused while Makini issued its token, and another took its lease over:
    the journal refuses to record the token. It is revoked where Makini allows, and reported
    by its fingerprint either way, never dropped."""
    sim.set(issue_invalidates_previous=False, revoke_endpoint=revoke_path)
    makini: dict[str, object] = {"issue_invalidates_previous": False}
    if revoke_path:
        makini["revoke_path"] = REVOKE_PATH
    runtime = make_runtime(makini=makini)
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    [held, _] = current(runtime)
    assert held is not None
    rt = runtime.environments["prod"]
    real_issue = rt.makini.issue_token

    async def issue_while_the_lease_is_taken(connection_id: str) -> Issued:
        issued = await real_issue(connection_id)
        runtime.journal.steal("prod/a", "another-worker")
        return issued

    monkeypatch.setattr(rt.makini, "issue_token", issue_while_the_lease_is_taken)
    result = await runtime.engine.rotate("prod", "a", reason="t", actor="t")

    assert result.outcome == "deferred" and "lease" in (result.error or "")
    assert [v.version_id if v else None for v in current(runtime)] == [held.version_id] * 2
    [entry] = unaccounted.entries(runtime.journal, include_closed=True)
    view = sim.token(entry.fingerprint or "")
    assert view is not None and view["connection_id"] == "conn-a"
    assert entry.live_until is not None
    # Makini's expiry as it stated it (a Unix timestamp in whole seconds)
    assert entry.live_until == datetime.fromisoformat(view["expires_at"]).replace(microsecond=0)
    assert "arrived after this worker lost the credential's lease" in entry.cause
    state = runtime.journal.state("prod", "a")
    assert state is not None
    if revoke_path:
        assert view["status"] == "revoked" and entry.status == unaccounted.RESOLVED
        assert state.unaccounted == 0
    else:
        assert view["status"] == "active" and entry.status == unaccounted.OPEN
        assert state.unaccounted == 1
    opened = runtime.journal.audit_entries(action="token.unaccounted")
    assert [e.fingerprint for e in opened] == [entry.fingerprint]


async def test_a_new_request_waits_out_a_lost_one_only_where_it_could_still_land() -> None:
    # a lost request Makini answers late would kill the token asked for next (where issuing
    # kills older tokens): the next request waits until the lost one is surely over, at most
    # one request timeout, and not at all where the lost one is long over
    from rotator.settings import MakiniSettings

    def makini(invalidates: bool | None) -> MakiniSettings:
        return MakiniSettings(
            client_id="c",
            client_secret_env="X",
            timeout_s=0.3,
            retry={"total_timeout_s": 1},  # type: ignore[arg-type]
            issue_invalidates_previous=invalidates,
        )

    now = utcnow()
    long_ago = now - timedelta(minutes=5)
    assert await unaccounted.outlast(makini(False), now) == 0  # old tokens stay: no harm
    assert await unaccounted.outlast(makini(True), long_ago) == 0  # retries long over
    # a crashed holder gone well over a timeout ago: over, however recent its request
    assert await unaccounted.outlast(makini(None), now, gone_by=long_ago) == 0
    # a drain gave the lease back a moment ago: the full timeout
    waited = await unaccounted.outlast(makini(True), utcnow())
    assert 0.25 < waited <= 0.3
