"""Token pairs sealed into journal rows: each sealed copy opens for its own row only."""

from __future__ import annotations

from rotator.errors import CryptoError
from rotator.journal import Rotation
from rotator.model import StoredVersion
from rotator.rotation.environment import EnvironmentRuntime


def journal_aad(env: str, cred: str, version_id: str) -> str:
    """What a token sealed into a journal row is bound to (it opens for that row only)."""
    return f"journal/{env}/{cred}/{version_id}"


def seal(rt: EnvironmentRuntime, version: StoredVersion) -> bytes:
    """``version`` sealed for the journal, bound to its own version id."""
    aad = journal_aad(rt.name, version.credential, version.version_id)
    return rt.sealer.seal(version.to_json().encode(), aad)


def unseal(rt: EnvironmentRuntime, row: Rotation, version_id: str | None = None) -> StoredVersion:
    """The token pair a journal row holds sealed (its new version's, or ``version_id``'s: a
    retiring row holds its old pair). Raises CryptoError naming the sealing key."""
    assert row.sealed is not None
    vid = version_id or row.version_id
    try:
        plain = rt.sealer.open(row.sealed, journal_aad(rt.name, row.credential, vid))
    except CryptoError as exc:
        raise CryptoError(
            f"cannot unseal the token held by journal row {row.id}: {exc.message}",
            where=f"sealing key of environment {rt.name}",
            hint=exc.hint or "configure the sealing key this journal was written with",
        ) from exc
    return StoredVersion.from_json(plain)
