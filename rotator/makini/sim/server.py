"""Running the simulator: in the foreground (:func:`serve_simulator`) or on a background
thread (:class:`SimServer`, for tests and benchmarks)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import uvicorn

from .app import SimApp, create_app
from .state import SimOptions, SimState

_START_TIMEOUT_S = 10.0


def _config(app: Any, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
    )


def serve_simulator(
    options: SimOptions,
    host: str,
    port: int,
    *,
    log_level: str = "warning",
    state_path: Path | None = None,
) -> None:
    """Serve the simulator until interrupted (blocking; ``rotator makini-sim``). With
    ``state_path`` its connections and tokens are kept in that file across restarts."""
    state = SimState(options, path=state_path)
    uvicorn.Server(_config(create_app(state), host, port, log_level)).run()


def link_code(
    base_url: str, connection_id: str, *, client_id: str | None = None,
    redirect_uri: str | None = None,
) -> str:
    """Ask a running simulator for a Makini Link authorization code (not a token)."""
    params = {k: v for k, v in (("client_id", client_id), ("redirect_uri", redirect_uri)) if v}
    response = httpx.post(
        f"{base_url.rstrip('/')}/_sim/connections/{connection_id}/link-code", params=params
    )
    if response.is_error:
        raise ValueError(f"simulator: no link code: {response.status_code} {response.text}")
    return str(response.json()["code"])


class SimServer:
    """The simulator on ``127.0.0.1`` and a free port, on a background thread.

    ``with SimServer(SimOptions(...)) as sim:`` then point a client at ``sim.url``. The control
    helpers (``set``, ``reset``, ``tokens``...) go through the ``/_sim/`` HTTP routes, so they
    are safe from any thread.
    """

    def __init__(
        self,
        options: SimOptions | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        state_path: Path | None = None,
    ) -> None:
        self.state = SimState(options, path=state_path)
        self._server = uvicorn.Server(_config(SimApp(self.state).build(), host, port, log_level))
        self._host = host
        self._thread: threading.Thread | None = None
        self._http: httpx.Client | None = None
        self.url = ""

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._server.run, name="makini-sim", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the Makini simulator did not start")
            time.sleep(0.005)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self._host}:{port}"
        self._http = httpx.Client(base_url=self.url, timeout=10)
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- control helpers (over /_sim/) -----------------------------------------------------

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        if self._http is None:
            raise RuntimeError("the simulator is not running")
        response = self._http.request(method, path, **kw)
        if response.is_error:
            raise ValueError(f"simulator: {method} {path}: {response.status_code} {response.text}")
        return response.json()

    @property
    def options(self) -> SimOptions:
        """A copy of the options in force (client secrets included, unlike ``/_sim/options``)."""
        return self.state.options.model_copy(deep=True)

    def set(self, **changes: Any) -> SimOptions:
        """Change options at runtime: any SimOptions field, or ``outage_s`` / ``advance_s``."""
        self._call("PATCH", "/_sim/options", json=changes)
        return self.options

    def reset(self, options: SimOptions | None = None) -> None:
        """Forget every connection, token and count; replace the options when given."""
        body = {"options": options.model_dump()} if options is not None else {}
        self._call("POST", "/_sim/reset", json=body)

    def tokens(self, connection_id: str | None = None, **filters: str) -> list[dict[str, Any]]:
        """Token views (fingerprints, never values), filtered by connection, kind, status."""
        params = {**filters, **({"connection_id": connection_id} if connection_id else {})}
        result: list[dict[str, Any]] = self._call("GET", "/_sim/tokens", params=params)
        return result

    def token(self, fingerprint: str) -> dict[str, Any] | None:
        if self._http is None:
            raise RuntimeError("the simulator is not running")
        response = self._http.get(f"/_sim/tokens/{fingerprint}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def revoke(self, fingerprint: str) -> None:
        """Revoke one token behind the client's back (tests of early death)."""
        self._call("POST", f"/_sim/tokens/{fingerprint}/revoke")

    def connections(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/_sim/connections")
        return result

    def add_connection(
        self, connection_id: str, client_id: str | None = None, **fields: Any
    ) -> None:
        """Create a connection; ``fields``: platform, company, name, metadata (a dict)."""
        body = {"id": connection_id, **({"client_id": client_id} if client_id else {}), **fields}
        self._call("POST", "/_sim/connections", json=body)

    def add_connections(
        self, count: int, *, prefix: str = "conn-", client_id: str | None = None, **fields: Any
    ) -> None:
        """Create ``count`` connections named ``{prefix}00000`` on, in one request."""
        body = {"count": count, "prefix": prefix, **fields,
                **({"client_id": client_id} if client_id else {})}
        self._call("POST", "/_sim/connections", json=body)

    def remove_connection(self, connection_id: str) -> None:
        """The connection disappears at Makini: its tokens die, it is no longer listed."""
        self._call("DELETE", f"/_sim/connections/{connection_id}")

    def inflight(self) -> list[dict[str, Any]]:
        """The API requests being answered right now: route, connection id, count."""
        result: list[dict[str, Any]] = self._call("GET", "/_sim/inflight")
        return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/_sim/stats")
        return result

    def link_code(
        self, connection_id: str, *, client_id: str | None = None, redirect_uri: str | None = None
    ) -> str:
        return link_code(self.url, connection_id, client_id=client_id, redirect_uri=redirect_uri)
