"""Tokens nobody else holds: accounting for the tokens pre-empted rotations received (dead,
revoked, or reported), so none is ever lost silently."""

from __future__ import annotations

from rotator.journal import Rotation
from rotator.rotation.engine import RotationEngine
from rotator.rotation.environment import EnvironmentRuntime
from rotator.rotation.sealing import unseal
from rotator.settings import CredentialSettings

from . import custody, kill
from .model import CredentialReport


def short(fingerprint: str | None) -> str | None:
    return f"sha256:{fingerprint[:12]}" if fingerprint else None


def disconnected_attention(env: str, cred: CredentialSettings) -> str:
    return (
        f"connection {cred.connection_id} was DISCONNECTED at Makini by an emergency revoke: "
        "the customer must reconnect (Makini Link), then `rotator import "
        f"{env} {cred.name}` stores the new pair"
    )


async def account_for(
    engine: RotationEngine,
    rt: EnvironmentRuntime,
    cred: CredentialSettings,
    rows: list[Rotation],
    *,
    actor: str,
    disconnected: bool,
    report: CredentialReport,
) -> None:
    """Account for the tokens that superseded rotations ``rows`` hold sealed and nobody else
    holds: dead (the kill killed them), revoked at makini.revoke_path, or reported as still
    valid until they expire. The sealed copy is dropped either way, with an audit entry.

    Raises MakiniError when Makini cannot say whether a token is dead (the token stays sealed).
    """
    for rot in rows:
        version = unseal(rt, rot)
        token = version.tokens.access
        dead = disconnected or await kill.rejected(rt.makini, token, cred.connection_id)
        if not dead and await kill.revoke_pair(rt.makini, version.tokens):
            dead = True
        if dead:
            note = f"the token {token.short} of pre-empted rotation {rot.id[:8]} is dead"
        else:
            expiry = version.tokens.expires_at.isoformat() if version.tokens.expires_at else "?"
            note = (
                f"the token {token.short} of pre-empted rotation {rot.id[:8]} stays valid at "
                f"Makini until it expires ({expiry}); it is stored nowhere"
            )
            report.next(note)
        await engine.worker.journal(custody.drop, engine.journal, rot.id, note)
        await engine.worker.journal(
            engine.journal.audit,
            actor=actor,
            action="revoke.token_accounted",
            outcome="dead" if dead else "alive",
            environment=rt.name,
            credential=cred.name,
            version_id=version.version_id,
            fingerprint=token.fingerprint,
            rotation_id=rot.id,
            note=note,
        )
        report.notes.append(note)
