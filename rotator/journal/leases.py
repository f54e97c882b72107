"""Leases on credentials, kept alive by a heartbeat and checked before every outside write.

One drive (a rotation, a retire, a revoke of one credential) holds the credential's lease in the
journal's ``locks`` table under a holder name of its own (host, process, drive). While the
process lives, :class:`LeaseKeeper` renews every lease it holds in one statement every third of
``journal.lock_ttl``; a process that dies (kill -9, a lost node) stops renewing, and another
replica or the next run takes the credential over once the lease expires, within
``lock_ttl``.

Fencing. A holder that was paused (SIGSTOP, a long GC, a frozen VM) past its lease's expiry may
wake while another holder drives the credential. It writes nothing:

* every journal write of a drive is conditional on the lease, in the same transaction
  (:class:`~rotator.errors.LeaseLost` otherwise);
* before each write outside the journal (a backend, Makini), :meth:`LeaseKeeper.check` wants the
  lease confirmed by the journal less than two thirds of ``lock_ttl`` ago, else renews it there
  and then; a lease the journal no longer grants is lost for good.

What fencing cannot close is a pause between that check and the write it guards (at most one
backend call): the stale write then repeats a step of the same rotation, which every step is
built to tolerate (each write is idempotent per version).

Intervals are measured on the :class:`~rotator.clock.Clock` the keeper is given
(``clock.monotonic()``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from rotator.clock import SYSTEM, Clock
from rotator.errors import LeaseLost, RotatorError

log = structlog.get_logger("rotator.leases")

Renew = Callable[[list[str]], Awaitable[set[str]]]
"""Renews the leases of these holders in the journal; returns the holders it renewed."""
RenewOne = Callable[[str, str], Awaitable[bool]]


@dataclass(eq=False)
class Lease:
    """One drive's lease on one credential (``name`` is ``env/credential``)."""

    name: str
    owner: str
    confirmed_at: float = field(default_factory=SYSTEM.monotonic)
    """When the journal last granted it (the keeper's ``clock.monotonic()``, taken before the
    granting statement; :meth:`LeaseKeeper.new` stamps it on the keeper's clock)."""
    lost: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.owner


class LeaseKeeper:
    """The leases one process holds, renewed together by a heartbeat."""

    def __init__(
        self, ttl_s: float, renew: Renew, renew_one: RenewOne, *, clock: Clock = SYSTEM
    ) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._renew = renew
        self._renew_one = renew_one
        self._held: dict[str, Lease] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def interval_s(self) -> float:
        return self.ttl_s / 3

    @property
    def held(self) -> list[Lease]:
        return list(self._held.values())

    def new(self, name: str, owner: str) -> Lease:
        """A lease to ask the journal for, stamped now on this keeper's clock (call it before
        the statement that takes the lease)."""
        return Lease(name, owner, confirmed_at=self.clock.monotonic())

    def add(self, lease: Lease) -> None:
        """Keep ``lease`` alive from now on (starts the heartbeat on the running loop)."""
        self._held[lease.owner] = lease
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._beat())

    def drop(self, lease: Lease) -> None:
        self._held.pop(lease.owner, None)

    def forget_all(self) -> list[str]:
        """Stop keeping every lease; their holders' names (to give them back in the journal)."""
        owners, self._held = list(self._held), {}
        return owners

    async def check(self, lease: Lease, where: str) -> None:
        """Raise LeaseLost unless ``lease`` is still this drive's, for an outside write."""
        now = self.clock.monotonic()
        if not lease.lost and now - lease.confirmed_at >= self.ttl_s * 2 / 3:
            started = now
            try:
                held = await self._renew_one(lease.name, lease.owner)
            except RotatorError as exc:  # the journal cannot say: not safe to write outside
                raise LeaseLost(
                    f"the credential's lease could not be renewed: {exc.message}",
                    where=where,
                    hint="nothing to do: the next run resumes from the last journaled step",
                ) from exc
            if held:
                lease.confirmed_at = started
            else:
                lease.lost = True
        if lease.lost:
            raise LeaseLost(
                "this worker lost the credential's lease (it expired or another worker took "
                "it over); it writes nothing more",
                where=where,
                hint="nothing to do: the worker that holds the lease resumes the work",
            )

    async def _beat(self) -> None:
        while self._held:
            await asyncio.sleep(self.interval_s)
            await self.beat()

    async def beat(self) -> None:
        """Renew every held lease once (the heartbeat; public for tests and the drain)."""
        leases = list(self._held.values())
        if not leases:
            return
        started = self.clock.monotonic()
        try:
            renewed = await self._renew([lease.owner for lease in leases])
        except RotatorError as exc:
            log.warning("lease.heartbeat_failed", leases=len(leases), error=exc.message)
            return
        for lease in leases:
            if lease.owner in renewed:
                lease.confirmed_at = started
            elif not lease.lost and lease.owner in self._held:
                lease.lost = True
                log.warning("lease.lost", lock=lease.name, owner=lease.owner)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
