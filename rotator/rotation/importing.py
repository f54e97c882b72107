"""A token pair obtained outside the rotator (Makini Link) made current, journaled like any
other change of a credential's current version."""

from __future__ import annotations

import uuid

from rotator.errors import LockBusy
from rotator.journal import Rotation, Step
from rotator.model import Stage, StoredVersion, TokenPair, new_version_id
from rotator.rotation.engine import RotationEngine
from rotator.rotation.sealing import seal

KIND = "import"


async def import_pair(
    engine: RotationEngine, env: str, name: str, tokens: TokenPair, *, actor: str, reason: str
) -> str:
    """Store ``tokens`` as the current version of ``env/name``, verified by Makini first, under
    the credential's lease (never beside a drive of it). Returns the new version id.

    The pair is sealed into a journal row (``kind="import"``, step *issued*) before any backend
    is written, and the row is closed with the credential's state and the audit entry in one
    transaction: an import that stops halfway is finished by the next drive of the credential,
    as a rotation whose token came from the operator. Raises LockBusy while another worker
    holds the credential.
    """
    rt = engine.runtime(env)
    cred = rt.settings.credential(name, env)
    await rt.makini.verify(tokens.access, cred.connection_id)
    lease = engine.new_lease(env, name, "import")
    where = f"{env}/{name}"
    if not await engine.worker.journal(engine.journal.acquire, *lease.key):
        raise LockBusy(
            "another worker is rotating or revoking this credential right now",
            where=where,
            hint="run the import again in a moment; `rotator status` shows the lease",
        )
    engine.leases.add(lease)
    try:
        now = engine.clock.now()
        version = StoredVersion(env, name, new_version_id(), tokens, created_at=now)
        old = await engine.worker.call(rt.primary.read, name, Stage.CURRENT)
        row = Rotation(
            id=str(uuid.uuid4()),
            environment=env,
            credential=name,
            kind=KIND,
            step=Step.ISSUED,
            version_id=version.version_id,
            old_version_id=old.version_id if old else None,
            fingerprint=tokens.access.fingerprint,
            old_fingerprint=old.tokens.access.fingerprint if old else None,
            sealed=seal(rt, version),
            expires_at=tokens.expires_at,
            reason=reason[:500],
            actor=actor[:200],
            started_at=now,
            updated_at=now,
            attempts=0,
            notes="[]",
        )
        await engine.worker.journal(engine.journal.add_rotation, row, lease=lease.key)
        await engine.fence(lease, where)
        await engine.worker.each(rt.backends, lambda b: b.stage_pending(version))
        await engine.fence(lease, where)
        await engine.worker.each(rt.backends, lambda b: b.promote(name, version.version_id))
        now = engine.clock.now()
        await engine.worker.journal(
            engine.journal.commit_step,
            row.id,
            {"step": Step.DONE, "sealed": None, "finished_at": now},
            lease=lease.key,
            state={
                "current_version_id": version.version_id,
                "current_fingerprint": tokens.access.fingerprint,
                "expires_at": tokens.expires_at,
                "rotated_at": now,
                "last_outcome": "imported",
                "last_error": None,
                "attention": None,
            },
            audit={
                "actor": actor,
                "action": "credential.imported",
                "outcome": "success",
                "version_id": version.version_id,
                "fingerprint": tokens.access.fingerprint,
                "reason": reason,
            },
        )
    finally:
        engine.leases.drop(lease)
        await engine.worker.journal(engine.journal.release, *lease.key)
    return version.version_id
