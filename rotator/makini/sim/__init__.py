"""The Makini simulator: an HTTP server that plays the documented API and its undocumented
variants, rate limits and faults, and sends signed webhooks (tests, ``make run``, benchmarks).

    SimOptions        how the simulator behaves (each undocumented variant is an option)
    SimServer         the simulator on a background thread, for tests and benchmarks
    serve_simulator   the simulator in the foreground (``rotator makini-sim``)
    link_code         a Makini Link authorization code from a running simulator
    create_app        the ASGI app alone

    state      what it plays, and the choices it makes where Makini is undocumented
    app        its routes and fault injection
    webhooks   its webhook sender (signs with :mod:`rotator.webhooks.signature` only)
    server     running it
"""

from rotator.makini.sim.app import create_app
from rotator.makini.sim.server import SimServer, link_code, serve_simulator
from rotator.makini.sim.state import SimOptions

__all__ = ["SimOptions", "SimServer", "create_app", "link_code", "serve_simulator"]
