"""Who read which version of which credential, and what follows from it.

The API records every successful read in memory (:class:`ReadRecorder`, a dict update on the
hot path) and flushes the batch to the journal every few seconds, one row per key, credential
and version with the first and last read and a count. From those rows:

* :func:`stale_readers`: readers that still hold an old version (``rotator status``);
* :func:`readers_caught_up`: whether every reader active recently has fetched a version;
* :func:`end_grace_early`: the scheduler's hook that ends a grace period once they all have
  (``api.readers.early_end_grace``; off by default, and it only ever shortens a grace period).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from rotator.journal.rows import Step
from rotator.model import utcnow

if TYPE_CHECKING:
    from collections.abc import Iterable

    from rotator.journal import Journal
    from rotator.settings import Config

ReadKey = tuple[str, str, str, str]
"""(key id, environment, credential, version id)"""


class ReadRecorder:
    """Reads in memory until the next flush. ``record`` runs on the event loop's thread."""

    def __init__(self) -> None:
        self._pending: dict[ReadKey, list[Any]] = {}

    def record(
        self, key_id: str, key_name: str, env: str, cred: str, version: str, at: float
    ) -> None:
        entry = self._pending.get((key_id, env, cred, version))
        if entry is None:
            self._pending[(key_id, env, cred, version)] = [at, at, 1, key_name]
        else:
            entry[1] = at
            entry[2] += 1

    def take(self) -> dict[ReadKey, list[Any]]:
        batch, self._pending = self._pending, {}
        return batch

    def put_back(self, batch: dict[ReadKey, list[Any]]) -> None:
        """Merge a batch that failed to flush back in (the next flush retries it)."""
        for k, (first, last, count, name) in batch.items():
            entry = self._pending.get(k)
            if entry is None:
                self._pending[k] = [first, last, count, name]
            else:
                entry[0] = min(entry[0], first)
                entry[2] += count

    def __len__(self) -> int:
        return len(self._pending)


def write_batch(journal: Journal, batch: dict[ReadKey, list[Any]]) -> None:
    """Upsert a batch of reads (one statement per row, one transaction)."""
    if not batch:
        return
    from rotator.journal.schema import ReaderRead

    insert = journal.dialect_insert
    with journal.session("record reads") as s:
        for (key_id, env, cred, version), (first, last, count, name) in batch.items():
            stmt = insert(ReaderRead).values(
                key_id=key_id,
                environment=env,
                credential=cred,
                version_id=version,
                key_name=name,
                first_at=datetime.fromtimestamp(first, UTC),
                last_at=datetime.fromtimestamp(last, UTC),
                count=count,
            )
            s.execute(
                stmt.on_conflict_do_update(
                    index_elements=["key_id", "environment", "credential", "version_id"],
                    set_={
                        "last_at": stmt.excluded.last_at,
                        "count": ReaderRead.count + stmt.excluded.count,
                    },
                )
            )


@dataclass(frozen=True)
class ReaderView:
    """What one reader last fetched of one credential."""

    key_id: str
    name: str
    version_id: str
    last_read_at: datetime

    def as_dict(self) -> dict[str, str]:
        return {
            "key_id": self.key_id,
            "name": self.name,
            "version": self.version_id,
            "last_read_at": self.last_read_at.isoformat(),
        }


Activity = dict[tuple[str, str], dict[str, tuple[ReaderView, set[str]]]]
"""(environment, credential) → key id → (its latest read, every version it read)"""


class Read(Protocol):
    """A row of ``reader_reads``, as :func:`fold` reads it."""

    @property
    def key_id(self) -> str: ...
    @property
    def key_name(self) -> str: ...
    @property
    def environment(self) -> str: ...
    @property
    def credential(self) -> str: ...
    @property
    def version_id(self) -> str: ...
    @property
    def last_at(self) -> datetime: ...


def activity(
    journal: Journal,
    *,
    window: timedelta,
    now: datetime | None = None,
    env: str | None = None,
    cred: str | None = None,
) -> Activity:
    """What live keys read within ``window`` (of one credential, or of all)."""
    from sqlalchemy import select

    from rotator.journal.schema import ReaderKey, ReaderRead

    since = (now or utcnow()) - window
    q = (
        select(ReaderRead)
        .join(ReaderKey, ReaderKey.key_id == ReaderRead.key_id)
        .where(ReaderRead.last_at >= since, ReaderKey.revoked_at.is_(None))
        .order_by(ReaderRead.last_at)
    )
    if env is not None and cred is not None:
        q = q.where(ReaderRead.environment == env, ReaderRead.credential == cred)
    with journal.reader() as s:
        return fold(s.scalars(q))


def fold(reads: Iterable[Read]) -> Activity:
    """Activity from the reads of live keys, oldest first (``rotator.journal.snapshot`` reads
    them for ``status``)."""
    out: Activity = {}
    for r in reads:
        readers = out.setdefault((r.environment, r.credential), {})
        seen = readers[r.key_id][1] if r.key_id in readers else set()
        seen.add(r.version_id)
        readers[r.key_id] = (ReaderView(r.key_id, r.key_name, r.version_id, r.last_at), seen)
    return out


def stale_in(
    readers: dict[str, tuple[ReaderView, set[str]]], current_version: str | None
) -> list[ReaderView]:
    if current_version is None:
        return []
    return [view for view, _ in readers.values() if view.version_id != current_version]


def stale_readers(
    journal: Journal,
    env: str,
    cred: str,
    current_version: str | None,
    *,
    window: timedelta,
    now: datetime | None = None,
) -> list[ReaderView]:
    """Readers active within ``window`` whose latest read was not ``current_version``."""
    if current_version is None:
        return []
    found = activity(journal, window=window, now=now, env=env, cred=cred)
    return stale_in(found.get((env, cred), {}), current_version)


def readers_caught_up(
    journal: Journal,
    env: str,
    cred: str,
    version_id: str,
    *,
    window: timedelta,
    now: datetime | None = None,
) -> bool:
    """True when every reader that read ``env/cred`` within ``window`` has fetched
    ``version_id`` (vacuously true when nobody read it)."""
    found = activity(journal, window=window, now=now, env=env, cred=cred)
    return all(version_id in seen for _, seen in found.get((env, cred), {}).values())


def end_grace_early(config: Config, journal: Journal, now: datetime | None = None) -> list[str]:
    """For each promoted rotation still in its grace period whose readers have all fetched the
    new version, move ``retire_after`` to now so that the next plan retires it. Only with
    ``api.readers.early_end_grace``; never where Makini already killed the old token (there is
    no grace to end). Returns the ``env/credential`` names whose grace was ended."""
    settings = config.api.readers
    if not settings.early_end_grace:
        return []
    now = now or utcnow()
    ended = []
    for rot in journal.open_rotations():
        if (
            rot.step != Step.PROMOTED
            or rot.retire_after is None
            or rot.retire_after <= now
            or rot.invalidated_old
            or rot.environment not in config.environments
        ):
            continue
        if not readers_caught_up(
            journal,
            rot.environment,
            rot.credential,
            rot.version_id,
            window=settings.active_window,
            now=now,
        ):
            continue
        journal.update_rotation(rot.id, retire_after=now)
        journal.add_note(
            rot.id, "grace period ended early: every active reader has the new version"
        )
        journal.audit(
            actor="scheduler",
            action="rotation.grace_ended",
            outcome="success",
            environment=rot.environment,
            credential=rot.credential,
            version_id=rot.version_id,
        )
        ended.append(f"{rot.environment}/{rot.credential}")
    return ended
