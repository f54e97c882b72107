"""AWS Secrets Manager for tests: moto's threaded HTTP server on a free loopback port."""

from __future__ import annotations

import logging
import urllib.request


class MotoServer:
    """One ``ThreadedMotoServer``; ``reset()`` forgets every resource (``/moto-api/reset``)."""

    def __init__(self) -> None:
        self._server: object | None = None
        self.endpoint = ""

    def start(self) -> str:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # it logs every request
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        self._server = server
        self.endpoint = f"http://{host}:{port}"
        return self.endpoint

    def reset(self) -> None:
        url = f"{self.endpoint}/moto-api/reset"
        request = urllib.request.Request(url, method="POST")  # noqa: S310 - loopback http
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            response.read()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()  # type: ignore[attr-defined]
            self._server = None
