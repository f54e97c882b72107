"""The Makini API: the async client the engine uses, and a simulator that plays the API.

    MakiniClient      issue, refresh, exchange a code, verify, disconnect, revoke
    Issued            a new token pair and the request id that produced it
    ConnectionInfo    what a working token says about its connection
    SimOptions        how the simulator behaves (each undocumented variant is an option)
    SimServer         the simulator on a background thread, for tests and benchmarks
    serve_simulator   the simulator in the foreground (``rotator makini-sim``)
    link_code         a Makini Link authorization code from a running simulator
"""

from typing import TYPE_CHECKING, Any

from rotator.makini.client import ConnectionInfo, Issued, MakiniClient

if TYPE_CHECKING:
    from rotator.makini.sim import SimOptions, SimServer, link_code, serve_simulator

_SIMULATOR = frozenset({"SimOptions", "SimServer", "link_code", "serve_simulator"})


def __getattr__(name: str) -> Any:
    # the simulator (a FastAPI app) loads on first use: a rotation never needs it
    if name in _SIMULATOR:
        from rotator.makini import sim

        return getattr(sim, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConnectionInfo",
    "Issued",
    "MakiniClient",
    "SimOptions",
    "SimServer",
    "link_code",
    "serve_simulator",
]
