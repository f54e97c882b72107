"""The Makini API: the async client the engine uses.

    MakiniClient      issue, refresh, exchange a code, verify, disconnect, revoke
    Issued            a new token pair and the request id that produced it
    ConnectionInfo    what a working token says about its connection
    ConnectionList    an admin client's connections (ListedConnection each), and if complete

The simulator that plays the API is the subpackage :mod:`rotator.makini.sim`; importing this
package does not load it.
"""

from rotator.makini.client import (
    ConnectionInfo,
    ConnectionList,
    Issued,
    ListedConnection,
    MakiniClient,
)

__all__ = ["ConnectionInfo", "ConnectionList", "Issued", "ListedConnection", "MakiniClient"]
