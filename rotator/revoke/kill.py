"""The Makini side of a revoke: choosing how to kill a token, and the calls that do it.

Makini documents no single-token revocation (``makini/FACTS.md``). A token dies when the admin
API issues a new one *where* issuing invalidates the old (undocumented), when the refresh grant
replaces the pair (same), at an undocumented revocation endpoint some accounts have
(``makini.revoke_path``), or when the connection is deleted (every token dies and the customer
must reconnect). So every kill is followed by a probe: the old token must now get a 401.
"""

from __future__ import annotations

from collections.abc import Sequence

from rotator.errors import InvalidToken, MakiniRejected, WrongConnection
from rotator.makini import MakiniClient
from rotator.makini.client import Issued
from rotator.model import Secret, TokenPair
from rotator.settings import CredentialSettings, MakiniSettings

from .model import KillMethod, Strategy

DISCONNECT_WARNING = (
    "DISCONNECT: connection {conn} will be deleted at Makini; every token of it dies and the "
    "customer must reconnect (Makini Link) before this credential works again"
)
ESCALATION_WARNING = (
    "if Makini still accepts the old token once the rotator has tried to {how}, the "
    "connection {conn} will be "
    "DISCONNECTED (deleted at Makini): the customer must reconnect"
)


def resolve(
    strategy: Strategy,
    cred: CredentialSettings,
    makini: MakiniSettings,
    has_refresh: bool,
) -> tuple[KillMethod, bool, list[str]]:
    """The kill method for ``strategy``, whether a surviving old token escalates to a disconnect
    (only ``auto`` does), and notes for the plan."""
    notes: list[str] = []
    if strategy == "auto":
        if makini.revoke_path:
            return "revoke_path", True, notes
        if makini.issue_invalidates_previous is False:
            notes.append(
                "makini.issue_invalidates_previous is false and no makini.revoke_path is "
                "configured: deleting the connection is the only way to kill the token"
            )
            return "disconnect", False, notes
        if cred.method == "refresh" and has_refresh:
            return "refresh", True, notes
        return "issue", True, notes
    if strategy == "refresh" and not has_refresh:
        notes.append("no refresh token is stored: the admin API issues the new token instead")
        return "issue", False, notes
    return strategy, False, notes


def describe(method: str) -> str:
    return {
        "issue": "have the admin API issue a new token (which kills the old one)",
        "refresh": "use the refresh grant (the new pair kills the old one)",
        "revoke_path": "revoke the token at makini.revoke_path",
        "disconnect": "delete the connection at Makini",
    }.get(method, method)


async def rejected(makini: MakiniClient, token: Secret, connection_id: str) -> bool:
    """Whether Makini now rejects ``token`` (401).

    A live token of another connection counts as alive. Raises :class:`MakiniTransient` (or a
    protocol error) when Makini cannot say: the caller stops and a resume asks again.
    """
    try:
        await makini.verify(token, connection_id)
    except InvalidToken:
        return True
    except WrongConnection:
        return False
    return False


async def revoke_pair(makini: MakiniClient, tokens: TokenPair) -> bool:
    """Revoke the access and refresh token at ``makini.revoke_path``; False when none is
    configured. Raises a MakiniError when Makini refuses or fails."""
    return await makini.revoke_pair(tokens)


async def obtain(
    makini: MakiniClient, cred: CredentialSettings, method: str, sources: Sequence[Secret]
) -> tuple[Issued, list[str]]:
    """A new token pair for the credential: by the refresh grant from the first refresh token
    in ``sources`` Makini still takes (``method="refresh"``), else from the admin API.

    Raises a MakiniError; an ``ambiguous`` one means Makini may have issued a token that never
    arrived (issuing again is then the way to kill it).
    """
    notes: list[str] = []
    if method == "refresh":
        for source in sources:
            try:
                return await makini.refresh(source), notes
            except MakiniRejected as exc:
                notes.append(f"refresh token {source.short} was refused ({exc.code or exc.status})")
        notes.append("no refresh token worked: the admin API issued the new token")
    return await makini.issue_token(cred.connection_id), notes
