"""What the metrics read beyond the journal's credential state (:class:`rotator.metrics.Probes`):
the webhook queue's depth, readers still on an old version, and whether every backend holds
the current version. Serve and run-due build them on the same journal and backends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from sqlalchemy import func, select, tuple_

from rotator.errors import RotatorError
from rotator.journal.schema import CredentialState, WebhookEvent
from rotator.metrics import CredentialFigures, CredentialKey, Probes, Snapshot, epoch_us
from rotator.readers import activity, stale_in
from rotator.webhooks.queue import PENDING, WORKING

if TYPE_CHECKING:
    from backends.base import Backend
    from rotator.journal import Journal
    from rotator.rotation.runtime import Runtime
    from rotator.settings import Config

_READ_THREADS = 8

_RAW = (
    "SELECT environment, credential, current_version_id, rotated_at, expires_at, "
    "attention, last_error IS NOT NULL FROM credential_state"
)
"""Every credential's figures as the driver gives them, on the session's own DB-API cursor: no
type conversion, no row object, no ORM object (10,000 credentials in about 10 ms); compared
with the last read to find the rows that changed."""
_TYPED = (
    CredentialState.environment,
    CredentialState.credential,
    CredentialState.current_version_id,
    CredentialState.rotated_at,
    CredentialState.expires_at,
    CredentialState.attention,
    CredentialState.last_error.is_not(None),
)
_TYPED_BATCH = 500
"""Changed rows re-read by key, this many a query; more changed than this at once: all."""


class Observer:
    """The probes on one journal and each environment's backends. Backend agreement reads
    every backend, so it is cached for ``metrics.backend_check_interval``."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        backends: Mapping[str, Sequence[Backend]],
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.journal = journal
        self.backends = backends
        self._monotonic = monotonic
        self._agree: dict[CredentialKey, bool] | None = None
        self._agree_at = 0.0
        self._lock = threading.Lock()
        self._raw: dict[CredentialKey, tuple[object, ...]] = {}
        self._figures: dict[CredentialKey, CredentialFigures] = {}
        self._generation = 0
        self._figures_lock = threading.Lock()

    @classmethod
    def of(cls, runtime: Runtime) -> Observer:
        return cls(
            runtime.config,
            runtime.journal,
            {env: rt.backends for env, rt in runtime.environments.items()},
        )

    def probes(self) -> Probes:
        return Probes(
            webhook_depth=self.webhook_depth,
            stale_readers=self.stale_readers,
            backends_agree=self.backends_agree,
            credentials=self.credentials,
        )

    def credentials(self) -> Snapshot:
        """Every credential's figures, read from the journal now: one query of plain rows, and
        the typed values re-read only for the rows that differ from the last read (a
        promotion, a failure, attention, whichever process wrote it)."""
        with self._figures_lock:
            with self.journal.reader() as s:
                cursor = s.connection().connection.cursor()
                try:
                    cursor.execute(_RAW)
                    raw = {(row[0], row[1]): tuple(row[2:]) for row in cursor.fetchall()}
                finally:
                    cursor.close()
                changed = [key for key, row in raw.items() if self._raw.get(key) != row]
                gone = [key for key in self._figures if key not in raw]
                if changed:
                    typed = select(*_TYPED)
                    rows = []
                    if len(changed) > _TYPED_BATCH:
                        rows = list(s.execute(typed))
                    else:
                        where = tuple_(CredentialState.environment, CredentialState.credential)
                        rows = list(s.execute(typed.where(where.in_(changed))))
                    for env, cred, version, rotated, expires, attention, failing in rows:
                        self._figures[(env, cred)] = CredentialFigures(
                            version=version,
                            rotated_us=epoch_us(rotated),
                            expires_us=epoch_us(expires),
                            attention=bool(attention),
                            failing=bool(failing),
                        )
            for key in gone:
                del self._figures[key]
            if changed or gone:
                self._generation += 1
                # a row whose typed read did not see it (deleted in between) is read again next
                self._raw = {k: v for k, v in raw.items() if k in self._figures}
            return Snapshot(self._generation, dict(self._figures))

    def webhook_depth(self) -> dict[str, int]:
        """Webhooks received and not yet processed (pending, or claimed by a worker)."""
        q = (
            select(WebhookEvent.environment, func.count())
            .where(WebhookEvent.status.in_((PENDING, WORKING)))
            .group_by(WebhookEvent.environment)
        )
        with self.journal.reader() as s:
            return {str(row[0]): int(row[1]) for row in s.execute(q)}

    def stale_readers(self) -> dict[CredentialKey, int]:
        """Per credential, how many readers active within ``api.readers.active_window`` last
        read a version that is not the current one."""
        found = activity(self.journal, window=self.config.api.readers.active_window)
        if not found:
            return {}
        figures = self.credentials().figures
        out: dict[CredentialKey, int] = {}
        for key, readers in found.items():
            fig = figures.get(key)
            stale = stale_in(readers, fig.version if fig else None)
            if stale:
                out[key] = len(stale)
        return out

    def backends_agree(self) -> dict[CredentialKey, bool]:
        """Per credential with a current version: does every backend of its environment hold
        that version as current? A backend that cannot be read counts as disagreeing."""
        interval = self.config.metrics.backend_check_interval.total_seconds()
        with self._lock:  # one check at a time; scrapes meanwhile wait for its answer
            if self._agree is None or self._monotonic() - self._agree_at >= interval:
                self._agree = self._check_backends()
                self._agree_at = self._monotonic()
            return dict(self._agree)

    def _check_backends(self) -> dict[CredentialKey, bool]:
        figures = self.credentials().figures
        todo = [
            (env, cred.name, fig.version)
            for env, settings in self.config.environments.items()
            if env in self.backends
            for cred in settings.credentials
            if (fig := figures.get((env, cred.name))) is not None and fig.version is not None
        ]

        def agrees(item: tuple[str, str, str]) -> bool:
            env, cred, version = item
            for backend in self.backends[env]:
                try:
                    if backend.current_version_id(cred) != version:
                        return False
                except RotatorError:
                    return False
            return True

        from backends.base import read_many

        local = {env for env, bs in self.backends.items() if all(b.capabilities.local for b in bs)}
        answers = read_many(todo, agrees, local=lambda t: t[0] in local, workers=_READ_THREADS)
        return {(env, cred): ok for (env, cred, _), ok in zip(todo, answers, strict=True)}
