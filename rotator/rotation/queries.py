"""What the CLI and the webhook worker ask about a credential outside a rotation: its current
version, whether Makini still accepts it, and which version each backend holds as current."""

from __future__ import annotations

from backends.base import Backend
from rotator.errors import BackendError, MakiniRejected, MakiniTransient, MakiniUntrusted
from rotator.model import Stage, StoredVersion
from rotator.rotation.engine import RotationEngine


async def current(engine: RotationEngine, env: str, name: str) -> StoredVersion | None:
    """The current version in the primary backend (None: no token)."""
    rt = engine.runtime(env)
    rt.settings.credential(name, env)
    return await engine.worker.call(rt.primary.read, name, Stage.CURRENT)


async def verify_current(engine: RotationEngine, env: str, name: str) -> tuple[bool, str]:
    """Whether Makini accepts the current token for its connection, and why not. A definite
    rejection is recorded as the credential's attention."""
    rt = engine.runtime(env)
    cred = rt.settings.credential(name, env)
    version = await current(engine, env, name)
    if version is None:
        return False, "no current token in the primary backend"
    try:
        info = await rt.makini.verify(version.tokens.access, cred.connection_id)
    except MakiniRejected as exc:
        await engine.worker.journal(engine.journal.set_state, env, name, attention=exc.message)
        return False, exc.message
    except (MakiniTransient, MakiniUntrusted) as exc:
        return False, f"could not check: {exc.message}"
    return True, f"accepted for connection {info.connection_id}"


async def backend_versions(engine: RotationEngine, env: str, name: str) -> dict[str, str | None]:
    """The current version id in each backend (None where absent), keyed by backend name."""
    rt = engine.runtime(env)

    def current_id(b: Backend) -> str | None:
        try:
            v = b.read(name, Stage.CURRENT)
        except BackendError as exc:
            return f"error: {exc.message}"
        return v.version_id if v else None

    ids = await engine.worker.each(rt.backends, current_id)
    return {b.name: vid for b, vid in zip(rt.backends, ids, strict=True)}
