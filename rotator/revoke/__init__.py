"""Emergency revoke: make a compromised token useless, everywhere, now.

For each credential in scope (one version, several credentials, or a whole environment; never
more than one environment), in this order:

1. **kill** at Makini, by the credential's ``revoke_strategy``: have the admin API *issue* a new
   token where that invalidates the old one, use the *refresh* grant, call the account's
   ``makini.revoke_path``, or *disconnect* the connection (every token dies and the customer
   must reconnect). A token the kill produces is sealed into the journal at once. Then the old
   token is probed: Makini must answer 401. With ``auto``, a token that survives escalates to
   ``revoke_path`` and, as the last resort, to a disconnect (the plan says so beforehand).
2. **replace**: verify the replacement and make it current in every backend, with no grace
   period (unless ``--no-replace``; a token the kill produced is stored anyway).
3. **purge**: make the old version unreadable in every backend, tell readers' caches
   (the engine's ``revoked`` events), drop every sealed copy from the journal.
4. **confirm**: the old token gets 401 from Makini; report per backend what was done and how
   long each part took, to the audit log.

A rotation in flight for the credential is pre-empted: the revoke takes its lease over
(``Journal.steal``) and marks it superseded in the transaction that records the revoke; the
other worker's next fence fails, the journal refuses its further writes to that rotation (and
keeps a token it still receives, sealed). A token the pre-empted rotation holds is adopted as
the replacement only if Makini accepts it; otherwise it is killed, or reported.

Every step is journaled (a ``Rotation`` row of ``kind="revoke"``, steps
``revoke-started … revoke-done``), so a revoke that stops halfway (Makini down, a backend down,
a crash) is finished by ``rotator revoke --resume`` or by the scheduler, and ``rotator status``
shows it as needing attention until then.
"""

from __future__ import annotations

from .model import (
    STRATEGIES,
    CredentialPlan,
    CredentialReport,
    RevokeRequest,
    RevokeStep,
    Strategy,
)
from .service import Revoker, resume_held, revoke_from_api

__all__ = [
    "STRATEGIES",
    "CredentialPlan",
    "CredentialReport",
    "RevokeRequest",
    "RevokeStep",
    "Revoker",
    "Strategy",
    "resume_held",
    "revoke_from_api",
]
