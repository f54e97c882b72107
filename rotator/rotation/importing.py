"""A token pair obtained outside the rotator (Makini Link) made current."""

from __future__ import annotations

from rotator.errors import LockBusy
from rotator.model import StoredVersion, TokenPair, new_version_id
from rotator.rotation.engine import RotationEngine


async def import_pair(
    engine: RotationEngine, env: str, name: str, tokens: TokenPair, *, actor: str, reason: str
) -> str:
    """Store ``tokens`` as the current version of ``env/name``, verified by Makini first, under
    the credential's lease (never beside a drive of it). Returns the new version id."""
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
        version = StoredVersion(env, name, new_version_id(), tokens, created_at=engine.clock.now())
        await engine.fence(lease, where)
        await engine.worker.each(rt.backends, lambda b: b.stage_pending(version))
        await engine.fence(lease, where)
        await engine.worker.each(rt.backends, lambda b: b.promote(name, version.version_id))
        now = engine.clock.now()
        await engine.worker.journal(
            engine.journal.set_state,
            env,
            name,
            lease=lease.key,
            current_version_id=version.version_id,
            current_fingerprint=tokens.access.fingerprint,
            expires_at=tokens.expires_at,
            rotated_at=now,
            last_outcome="imported",
            last_error=None,
            attention=None,
        )
        await engine.worker.journal(
            engine.journal.audit,
            actor=actor,
            action="credential.imported",
            outcome="success",
            environment=env,
            credential=name,
            version_id=version.version_id,
            fingerprint=tokens.access.fingerprint,
            reason=reason,
        )
    finally:
        engine.leases.drop(lease)
        await engine.worker.journal(engine.journal.release, *lease.key)
    return version.version_id
