"""The HTTP API of ``rotator serve``.

    app        the factory: the lean token router in front of FastAPI, background work
    tokens     GET /v1/tokens/{env}[/{name}]: the hot path, bare ASGI
    docs       the same two operations as FastAPI path operations, for the OpenAPI document
    cache      the in-memory token cache; ``drop_everywhere`` for the emergency revoke
    feed       replicas learn promotions, drops and key changes through the journal
    auth       bearer keys, the order of checks (401, 403, then 422, 404), the key guard
    gate       the key decides before a body is read or a path validated (ASGI)
    limits     request body limits (413 in the envelope)
    state      what the routes share (runtime, key index, cache, read records, metrics)
    admin      POST /v1/admin/rotate/{env}/{name}, POST /v1/admin/revoke/{env}
    webhooks   POST /v1/webhooks/makini/{env}
    ops        /healthz, /readyz, /metrics
    status     GET /status: the status page (HTML, live by server-sent events), its sessions
    status_board  what the status page shows of an environment, and when that changes
    errors     the error envelope
    routing    the route class of every router (FastAPI parses bodies with ``jsonbody``)

Importing this package is cheap; FastAPI is loaded by :func:`build_app`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rotator.api.app import ApiApp
    from rotator.rotation.runtime import Runtime


def build_app(runtime: Runtime) -> ApiApp:
    """The ASGI app serving ``runtime`` (see :mod:`rotator.api.app`)."""
    from rotator.api.app import build_app as build

    return build(runtime)


__all__ = ["build_app"]
