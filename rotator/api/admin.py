"""Admin actions, for an environment's admin key. Each is audited with the key's name as actor.

``POST /v1/admin/revoke/{env}`` hands over to :func:`rotator.revoke.revoke_from_api`, which
returns the plan and the per-credential reports.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Body, Depends, Path
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from backends.base import NAME_PATTERN
from rotator.api.auth import KeyGuard, check_cred_name
from rotator.api.errors import ApiError, responses
from rotator.api.routing import api_router
from rotator.api.state import ApiState
from rotator.configfile import ENV_NAME_PATTERN
from rotator.errors import ConfigError, NotFound, Offboarded, RotatorError
from rotator.keys import KeyInfo
from rotator.revoke import revoke_from_api
from rotator.scrub import mask

if TYPE_CHECKING:
    from rotator.rotation.runtime import Runtime

# Patterns are documented but checked by the handlers: the key decides first (the guard, and
# the key gate in front of the app), so a stranger gets 401 whatever the path or body holds.
ENV_PATH = Path(description="Environment name.", json_schema_extra={"pattern": ENV_NAME_PATTERN})
NAME_PATH = Path(description="Credential name.", json_schema_extra={"pattern": NAME_PATTERN})


class RotateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="admin api", min_length=1, max_length=500)
    if_version: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="Rotate only if this is still the current version (the one the caller "
        "saw); otherwise answer outcome `nothing`: another worker rotated it meanwhile. "
        "Without it, the version current when the request arrives.",
    )


class RotateOut(BaseModel):
    environment: str
    credential: str
    outcome: str = Field(
        description="rotated | retired | waiting | rolled_back | failed | busy | deferred | "
        "parked | nothing"
    )
    ok: bool
    rotation_id: str | None
    version_id: str | None
    step: str | None
    error: str | None
    detail: str | None = Field(
        default=None, description="Why nothing was done (outcome `nothing`), or where it parked."
    )
    duration_s: float


class RevokeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    credentials: list[Annotated[str, Field(pattern=NAME_PATTERN)]] | None = Field(
        default=None, max_length=1000, description="The credentials to revoke (or all)."
    )
    all: bool = Field(default=False, description="Every credential of the environment.")
    version: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="current (default), previous, or a version id.",
    )
    replace: bool = Field(default=True, description="Issue and promote a replacement.")
    reason: str = Field(min_length=1, max_length=500)
    dry_run: bool = False


def router(state: ApiState) -> APIRouter:
    api = api_router(["admin"])
    runtime = state.runtime
    # a default, not an Annotated extra: the annotations are strings, read without this scope
    admin_key = Depends(KeyGuard(state.keys, "admin"))

    def audit(key: KeyInfo, action: str, outcome: str, env: str, **detail: Any) -> None:
        runtime.journal.audit(
            actor=key.name,
            action=action,
            outcome=outcome,
            environment=env,
            key_id=key.key_id,
            **detail,
        )

    @api.post(
        "/v1/admin/rotate/{env}/{name}",
        response_model=RotateOut,
        summary="Rotate a credential now",
        responses=responses(400, 401, 403, 404, 409, 422),
    )
    async def rotate(
        env: Annotated[str, ENV_PATH],
        name: Annotated[str, NAME_PATH],
        body: Annotated[RotateIn | None, Body()] = None,
        key: KeyInfo = admin_key,
    ) -> JSONResponse:
        check_cred_name(name)
        if name not in state.credentials.get(env, ()):
            raise ApiError(404, f"environment {env!r} has no credential {name!r}")
        reason = body.reason if body else "admin api"
        if_version = body.if_version if body else None
        await asyncio.to_thread(_refuse_offboarded, runtime, env, name)
        result = await runtime.engine.rotate(
            env,
            name,
            reason=reason,
            actor=key.name,
            seen=if_version is not None,
            seen_version=if_version,
        )
        await asyncio.to_thread(
            audit,
            key,
            "api.rotate",
            result.outcome,
            env,
            credential=name,
            rotation_id=result.rotation_id,
            reason=reason,
        )
        if result.outcome == "busy":
            raise ApiError(409, "another worker is rotating this credential", "busy")
        return JSONResponse({**result.as_dict(), "ok": result.ok})

    @api.post(
        "/v1/admin/revoke/{env}",
        summary="Emergency revoke (a version, a credential, or the whole environment)",
        responses={
            200: {
                "description": "The revoke report",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            **responses(400, 401, 403, 404, 409, 422),
        },
    )
    async def revoke(
        env: Annotated[str, ENV_PATH], body: RevokeIn, key: KeyInfo = admin_key
    ) -> JSONResponse:
        known = state.credentials.get(env, frozenset())
        unknown = [n for n in body.credentials or () if n not in known]
        if unknown:
            raise ApiError(404, f"environment {env!r} has no credential {unknown[0]!r}")
        # token-shaped text masked as in the logs; each credential's revoke record replaces
        # the very tokens it revokes (rotator.revoke.service)
        detail = {"credentials": body.credentials, "all": body.all, "reason": mask(body.reason)}
        try:
            report = await revoke_from_api(
                runtime,
                env,
                names=body.credentials,
                all_=body.all,
                version=body.version,
                no_replace=not body.replace,
                reason=body.reason,
                actor=key.name,
                dry_run=body.dry_run,
            )
        except NotFound as exc:
            raise ApiError(404, exc.message) from None
        except ConfigError as exc:
            raise ApiError(422, exc.message) from None
        except RotatorError as exc:
            await asyncio.to_thread(audit, key, "api.revoke", "error", env, **detail)
            raise ApiError(409, exc.message, "revoke_failed") from None
        outcome = "dry_run" if body.dry_run else ("success" if report.get("ok") else "failed")
        await asyncio.to_thread(audit, key, "api.revoke", outcome, env, **detail)
        return JSONResponse(report)

    return api


def _refuse_offboarded(runtime: Runtime, env: str, name: str) -> None:
    """409 for a discovered credential whose connection is gone at Makini (as the journal
    says now): no token is issued for it."""
    from rotator.rotation import discovery

    rt = runtime.environments.get(env)
    if rt is None:
        return
    try:
        discovery.refuse_offboarded(runtime.journal, rt.settings, env, name)
    except Offboarded as exc:
        raise ApiError(409, f"{exc.message}; next: {exc.hint}", "offboarded") from None
