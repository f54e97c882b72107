"""Discovery: the Makini connections an environment's admin client lists, as credentials.

``[environments.X.discover]`` enrols each listed connection that passes the filters as a
credential named by the template, and off-boards an enrolled one that is no longer listed (gone
at Makini, or filtered out since). The journal's ``discovered_connections`` table is what
discovery knows; :func:`effective` (in :mod:`rotator.rotation.enrolled`, which ``rotator
status`` imports alone) turns it, with the configuration, into the environment's
credentials, which every reader of the configuration then sees (status, the schedule, the
engine, the API). A connection the configuration lists keeps its configuration (config wins).

Each environment uses its own admin client: discovery never crosses environments.

Off-boarding: an off-boarded credential rotates no more (the schedule skips it) but its tokens
stay readable for ``offboard_grace``; then every version is made unreadable in every backend
(``make_unreadable``, as retiring does) and the row becomes ``purged``. Nothing is ever
deleted at Makini. A listing that may be incomplete (a page on another host, fewer items than
``meta.total``) off-boards nothing.
"""

from __future__ import annotations

import asyncio
import fnmatch
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import ValidationError
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection

from rotator.errors import ConfigError, NotFound, Offboarded
from rotator.journal.schema import AuditEntry, DiscoveredConnection
from rotator.makini import ListedConnection
from rotator.rotation.enrolled import ENROLLED as ENROLLED
from rotator.rotation.enrolled import OFFBOARDED as OFFBOARDED
from rotator.rotation.enrolled import PURGED as PURGED
from rotator.rotation.enrolled import Known as Known
from rotator.rotation.enrolled import effective as effective
from rotator.rotation.work import RotationResult, Work
from rotator.settings import (
    CredentialSettings,
    DiscoverFilter,
    EnvironmentSettings,
    credential_name,
)

if TYPE_CHECKING:
    from rotator.journal import Journal
    from rotator.rotation.runtime import Runtime
    from rotator.settings import Config

log = structlog.get_logger("rotator.discovery")

_LEASE = timedelta(minutes=10)
"""How long a discovery's lease outlives a process that died holding it."""
ACTOR = "discovery"


@dataclass(frozen=True)
class Candidate:
    """A listed connection discovery would enrol, under the credential name it gets."""

    connection_id: str
    credential: str
    platform: str | None = None
    company: str | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "connection_id": self.connection_id,
            "credential": self.credential,
            "platform": self.platform,
            "company": self.company,
            "name": self.name,
        }


@dataclass
class Change:
    """What one discovery finds for an environment, and (unless a dry run) did."""

    environment: str
    new: list[Candidate] = field(default_factory=list)
    returned: list[Candidate] = field(default_factory=list)
    """Off-boarded (or purged) connections listed again: enrolled again."""
    gone: list[Candidate] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    purge: list[Candidate] = field(default_factory=list)
    configured: list[str] = field(default_factory=list)
    """Listed connections the configuration lists: left to it."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(connection id, why) of listed connections that cannot be enrolled."""
    filtered: int = 0
    listed: int = 0
    complete: bool = True
    dry_run: bool = False
    busy: bool = False
    """Another process was discovering this environment: nothing was done here."""
    results: list[RotationResult] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.new or self.returned or self.gone or self.purge)

    def as_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "dry_run": self.dry_run,
            "busy": self.busy,
            "listed": self.listed,
            "complete": self.complete,
            "new": [c.as_dict() for c in self.new],
            "returned": [c.as_dict() for c in self.returned],
            "gone": [c.as_dict() for c in self.gone],
            "purge": [c.as_dict() for c in self.purge],
            "kept": sorted(self.kept),
            "configured": sorted(self.configured),
            "skipped": [{"connection_id": c, "reason": r} for c, r in self.skipped],
            "filtered": self.filtered,
            "first_tokens": [r.as_dict() for r in self.results],
        }


# --- what the journal knows ----------------------------------------------------------------


def rows(journal: Journal, environment: str) -> list[Known]:
    """The environment's discovered connections, every status (plain rows: 10,000 of them
    as ORM objects would cost a second at each discovery)."""
    t = DiscoveredConnection
    with journal.reader() as s:
        return [
            Known(*row)
            for row in s.execute(
                select(t.connection_id, t.credential, t.status, t.platform, t.company, t.name,
                       t.gone_at)
                .where(t.environment == environment)
                .order_by(t.credential)
            )
        ]


def refresh(runtime: Runtime, environment: str) -> EnvironmentSettings:
    """Make ``environment``'s credentials the effective ones everywhere: in the runtime's
    configuration (the one object status, the schedule, metrics and webhooks read) and in its
    environment runtime (the engine and the API)."""
    rt = runtime.environments[environment]
    settings = effective(rt.settings, rows(runtime.journal, environment))
    rt.settings = settings
    # the configuration is frozen but its environments are a plain dict: every holder of
    # this Config (the CLI, the webhook worker, metrics) sees the change
    runtime.config.environments[environment] = settings
    for listener in runtime.credentials_changed:
        listener(environment)
    return settings


# --- what changes --------------------------------------------------------------------------


def _match(value: str | None, patterns: Sequence[str]) -> bool:
    text = (value or "").lower()
    return any(fnmatch.fnmatchcase(text, p.lower()) for p in patterns)


def _fields(item: ListedConnection) -> dict[str, str | None]:
    return {"id": item.connection_id, "name": item.name, "platform": item.platform,
            "company": item.company}


def included(item: ListedConnection, include: DiscoverFilter, exclude: DiscoverFilter) -> bool:
    """Whether ``item`` passes: every key ``include`` gives matches, no key ``exclude`` gives
    does."""
    values = _fields(item)
    for key in ("id", "name", "platform", "company"):
        patterns = getattr(include, key)
        if patterns and not _match(values[key], patterns):
            return False
    for meta_key, pattern in include.metadata.items():
        if meta_key not in item.metadata or not _match(item.metadata[meta_key], [pattern]):
            return False
    for key in ("id", "name", "platform", "company"):
        patterns = getattr(exclude, key)
        if patterns and _match(values[key], patterns):
            return False
    return not any(
        meta_key in item.metadata and _match(item.metadata[meta_key], [pattern])
        for meta_key, pattern in exclude.metadata.items()
    )


def compute(
    environment: str,
    env: EnvironmentSettings,
    listed: Sequence[ListedConnection],
    known: Sequence[Known],
    *,
    complete: bool,
    now: datetime,
) -> Change:
    """What discovery changes, from what Makini lists and what the journal knows."""
    settings = env.discover
    change = Change(environment=environment, listed=len(listed), complete=complete)
    configured = env.configured_credentials
    configured_ids = {c.connection_id for c in configured}
    taken = {c.name for c in configured}
    by_id = {row.connection_id: row for row in known}
    taken |= {row.credential for row in known}  # a purged one's name too: it may come back
    wanted: set[str] = set()
    for item in listed:
        if item.connection_id in configured_ids:
            change.configured.append(item.connection_id)
            continue
        if not included(item, settings.include, settings.exclude):
            change.filtered += 1
            continue
        row = by_id.get(item.connection_id)
        if row is not None:
            wanted.add(item.connection_id)
            if row.status == ENROLLED:
                change.kept.append(row.credential)
            else:
                change.returned.append(_candidate(item, row.credential))
            continue
        name = credential_name(settings.name_template, _fields(item))
        try:
            CredentialSettings(name=name, connection_id=item.connection_id)
        except ValidationError:
            change.skipped.append(
                (item.connection_id[:200], f"not a valid credential name or connection id "
                 f"({name!r}); change the name_template")
            )
            continue
        if name in taken:
            change.skipped.append(
                (item.connection_id, f"the credential name {name!r} is taken; add {{id}} "
                 "or another field to the name_template")
            )
            continue
        taken.add(name)
        wanted.add(item.connection_id)
        change.new.append(_candidate(item, name))
    for row in known:
        if row.connection_id in wanted or row.connection_id in configured_ids:
            continue
        if row.status == ENROLLED and complete:
            change.gone.append(_from_row(row))
        elif (
            row.status == OFFBOARDED
            and row.gone_at is not None
            and now - row.gone_at >= settings.offboard_grace
        ):
            change.purge.append(_from_row(row))
    return change


def _candidate(item: ListedConnection, credential: str) -> Candidate:
    return Candidate(item.connection_id, credential, item.platform, item.company, item.name)


def _from_row(row: Known) -> Candidate:
    return Candidate(row.connection_id, row.credential, row.platform, row.company, row.name)


# --- doing it ------------------------------------------------------------------------------


_AUDIT_COLUMNS = tuple(c.key for c in AuditEntry.__table__.columns if c.key != "id")
_TABLE = DiscoveredConnection
_BY_KEY = (_TABLE.environment == bindparam("b_env")) & (
    _TABLE.connection_id == bindparam("b_id")
)


def _audit(journal: Journal, action: str, env: str, cand: Candidate, **detail: Any) -> dict[
    str, Any
]:
    entry = journal.audit_row(
        actor=ACTOR, action=action, outcome="ok", environment=env, credential=cand.credential,
        connection_id=cand.connection_id, **detail,
    )
    return {key: getattr(entry, key) for key in _AUDIT_COLUMNS}


def _record(journal: Journal, change: Change, now: datetime) -> None:
    """Enrol, re-enrol and off-board in one transaction, each with its audit entry: a few
    statements, each run for many rows (10,000 new connections are two inserts)."""
    env = change.environment
    new = [
        {"environment": env, "connection_id": c.connection_id, "credential": c.credential,
         "platform": _cut(c.platform), "company": _cut(c.company), "name": _cut(c.name),
         "status": ENROLLED, "enrolled_at": now, "seen_at": now, "gone_at": None,
         "purged_at": None}
        for c in change.new
    ]
    back = [{"b_env": env, "b_id": c.connection_id} for c in change.returned]
    gone = [{"b_env": env, "b_id": c.connection_id} for c in change.gone]
    audits = [_audit(journal, "discovery.enrolled", env, c) for c in change.new]
    audits += [_audit(journal, "discovery.enrolled", env, c, again=True) for c in change.returned]
    audits += [_audit(journal, "discovery.offboarded", env, c) for c in change.gone]

    def work(conn: Connection) -> None:
        if new:
            conn.execute(insert(_TABLE), new)
        if back:
            conn.execute(
                update(_TABLE).where(_BY_KEY).values(
                    status=ENROLLED, gone_at=None, purged_at=None, seen_at=now
                ),
                back,
            )
        if gone:
            conn.execute(
                update(_TABLE).where(_BY_KEY).values(status=OFFBOARDED, gone_at=now), gone
            )
        if audits:
            conn.execute(insert(AuditEntry), audits)

    journal.transaction("record discovered connections", work)


def _cut(value: str | None) -> str | None:
    return value[:200] if value is not None else None


def _purge_backends(runtime: Runtime, environment: str, credential: str) -> list[str]:
    """Make every readable version of ``credential`` unreadable in every backend."""
    done: list[str] = []
    for backend in runtime.environments[environment].backends:
        for version in backend.versions(credential):
            if version.readable:
                backend.make_unreadable(credential, version.version_id)
                done.append(version.version_id)
    return done


def _purged(journal: Journal, environment: str, cand: Candidate, versions: list[str],
            now: datetime) -> None:
    with journal.session("record a purged connection") as s:
        row = s.get(DiscoveredConnection, (environment, cand.connection_id))
        if row is not None:
            row.status, row.purged_at = PURGED, now
        s.add(journal.audit_row(
            actor=ACTOR, action="discovery.purged", outcome="ok", environment=environment,
            credential=cand.credential, connection_id=cand.connection_id,
            versions=len(versions),
        ))


async def discover(
    runtime: Runtime,
    environment: str,
    *,
    dry_run: bool = False,
    first_tokens: bool = True,
) -> Change:
    """List ``environment``'s connections with its own admin client, compute the change and,
    unless ``dry_run``, apply it: record it (audited), make the new credentials effective, hand
    each new one to the engine for its first token (``first_tokens``), and make the tokens of
    those off-boarded longer than the grace unreadable. Raises ConfigError where discovery is
    not enabled for the environment, and the MakiniError of a failed listing."""
    rt = runtime.environments.get(environment)
    if rt is None:
        raise ConfigError(
            f"environment {environment!r} is not served here",
            where="discovery",
            hint=f"known environments: {', '.join(runtime.environments)}",
        )
    settings = rt.settings
    if not settings.discover.enabled:
        raise ConfigError(
            f"discovery is not enabled for environment {environment!r}",
            where=f"environments.{environment}.discover.enabled",
            hint="set enabled = true in the environment's [environments."
            f"{environment}.discover] table",
        )
    journal = runtime.journal
    if dry_run:
        return await _compute_now(runtime, environment, dry_run=True)
    # one discovery of an environment at a time across replicas (two would enrol one
    # connection twice): another's run is as good as this one; take what it recorded
    lease, owner = f"discover:{environment}", uuid.uuid4().hex
    if not await asyncio.to_thread(journal.acquire, lease, owner, _LEASE):
        await asyncio.to_thread(refresh, runtime, environment)
        return Change(environment=environment, busy=True)
    try:
        change = await _compute_now(runtime, environment, dry_run=False)
        now = runtime.engine.clock.now()
        if change.new or change.returned or change.gone:
            await asyncio.to_thread(_record, journal, change, now)
        for cand in change.purge:
            versions = await asyncio.to_thread(
                _purge_backends, runtime, environment, cand.credential
            )
            await asyncio.to_thread(_purged, journal, environment, cand, versions, now)
        await asyncio.to_thread(refresh, runtime, environment)
    finally:
        await asyncio.to_thread(journal.release, lease, owner)
    bound = log.bind(environment=environment)
    if change.changed or not change.complete:
        bound.info(
            "discovery.done", listed=change.listed, new=len(change.new),
            returned=len(change.returned), gone=len(change.gone), purged=len(change.purge),
            skipped=len(change.skipped), complete=change.complete,
        )
    if first_tokens and (change.new or change.returned):
        work = [Work(environment, c.credential, "discovered") for c in change.new]
        work += [Work(environment, c.credential, "discovered again", forced=True)
                 for c in change.returned]
        change.results = await runtime.engine.rotate_many(work, actor=ACTOR)
    return change


async def _compute_now(runtime: Runtime, environment: str, *, dry_run: bool) -> Change:
    """List the connections with the environment's own admin client and compute the change."""
    rt = runtime.environments[environment]
    listing = await rt.makini.connections()
    known = await asyncio.to_thread(rows, runtime.journal, environment)
    change = compute(
        environment, rt.settings, listing.items, known, complete=listing.complete,
        now=runtime.engine.clock.now(),
    )
    change.dry_run = dry_run
    return change


def enabled(runtime: Runtime) -> list[str]:
    """The served environments with discovery enabled."""
    return [
        name for name, rt in runtime.environments.items()
        if rt.settings.discover.enabled and rt.makini_client is not None
    ]


def gone_row(journal: Journal, environment: str, connection_id: str) -> Known | None:
    """The discovered connection's row where it is off-boarded or purged (gone at Makini);
    ``None`` for an enrolled or a configured one."""
    t = DiscoveredConnection
    with journal.reader() as s:
        row = s.execute(
            select(t.connection_id, t.credential, t.status, t.platform, t.company, t.name,
                   t.gone_at)
            .where(t.environment == environment, t.connection_id == connection_id)
        ).first()
    if row is None or row.status == ENROLLED:
        return None
    return Known(*row)


def offboarded_error(
    env: EnvironmentSettings, environment: str, name: str, connection_id: str,
    gone_at: datetime | None, *, purged: bool = False,
) -> Offboarded:
    """The error every path that would issue ``name`` a token raises or reports: what (the
    connection is gone, since when), where, and what to do next."""
    since = f" since {gone_at.isoformat(timespec='seconds')}" if gone_at else ""
    if purged:
        tokens = "its tokens have been made unreadable"
    elif gone_at is not None:
        until = (gone_at + env.discover.offboard_grace).isoformat(timespec="seconds")
        tokens = f"its tokens stay readable until {until}, then are made unreadable"
    else:
        tokens = "its tokens stay readable for discover.offboard_grace, then are made unreadable"
    return Offboarded(
        f"credential {name!r} is off-boarded: its Makini connection {connection_id} is gone "
        f"at Makini{since}, so no token is issued for it ({tokens})",
        where=f"{environment}/{name} (discovered)",
        hint=f"if the connection is listed at Makini again, `rotator discover {environment}` "
        "re-enrols it and gives it a new token; a customer who reconnected through Makini Link "
        "has a new connection, which discovery enrols as a credential of its own",
    )


def refuse_offboarded(journal: Journal, env: EnvironmentSettings, environment: str,
                      name: str) -> None:
    """Raise :class:`Offboarded` if ``name`` is a discovered credential whose connection is
    gone at Makini, as the journal says now (a configured credential never is)."""
    if name in {c.name for c in env.configured_credentials}:
        return
    try:
        cred = env.credential(name, environment)
    except NotFound:
        return
    row = gone_row(journal, environment, cred.connection_id)
    if row is not None and row.credential == name:
        raise offboarded_error(env, environment, name, row.connection_id, row.gone_at,
                               purged=row.status == PURGED)


def known_credentials(journal: Journal, env: EnvironmentSettings,
                      environment: str) -> EnvironmentSettings:
    """The environment's credentials with the ones discovery enrolled, as the journal says."""
    return effective(env, rows(journal, environment))


def unknown_error(env: EnvironmentSettings, environment: str, names: Sequence[str]) -> NotFound:
    """No such credential: naming the known ones (a few, and the closest to each name given,
    where an environment has thousands)."""
    import difflib

    known = [c.name for c in env.credentials]
    close = sorted({m for n in names for m in difflib.get_close_matches(n, known, n=3)})
    shown = ", ".join(known[:20]) or "none"
    if len(known) > 20:
        shown += f" ... and {len(known) - 20} more (`rotator status {environment}` lists them)"
    hint = f"known credentials: {shown}"
    if close:
        hint = f"did you mean {', '.join(close)}? " + hint
    listed = ", ".join(repr(n) for n in names)
    return NotFound(
        f"environment {environment!r} has no credential {listed}",
        where=f"environments.{environment}.credentials (configured or discovered)",
        hint=hint,
    )


def require_credential(
    config: Config, environment: str, name: str, *, issuing: bool = False
) -> None:
    """Raise the configuration's NotFound unless ``name`` is a credential of ``environment``:
    configured, or enrolled by discovery (the journal is opened on that path alone, so a
    command that reads a configured credential starts without it). ``issuing`` (rotate): an
    off-boarded one raises :class:`Offboarded` too; otherwise it is a credential like any
    other (its tokens stay readable for the grace)."""
    from rotator.journal import Journal as JournalStore

    env = config.environment(environment)
    try:
        env.credential(name, environment)
    except NotFound:
        journal = JournalStore.open(config.journal)
        try:
            known = rows(journal, environment)
            found = effective(env, known)
            if name not in {c.name for c in found.credentials}:
                purged = next((r for r in known if r.credential == name), None)
                if purged is not None and purged.status == PURGED:
                    if not issuing:
                        raise NotFound(
                            f"credential {name!r} of environment {environment!r} was "
                            f"off-boarded and purged: its connection {purged.connection_id} "
                            "is gone at Makini and its tokens were made unreadable",
                            where=f"{environment}/{name} (discovered)",
                            hint=f"`rotator discover {environment}` re-enrols it if Makini "
                            "lists the connection again",
                        ) from None
                    raise offboarded_error(found, environment, name, purged.connection_id,
                                           purged.gone_at, purged=True) from None
                raise unknown_error(found, environment, [name]) from None
            if issuing and name in found.offboarded:
                refuse_offboarded(journal, found, environment, name)
        finally:
            journal.close()
