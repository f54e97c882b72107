"""Fixtures of the Makini client and simulator tests.

``sim`` (the session's simulator, reset for each test) comes from ``tests/conftest.py``. Here:
a fake ``sleep`` that records the backoff instead of waiting (and can move the simulator's clock
so that a Retry-After really elapses), settings pointing at the simulator, and client factories.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from rotator.errors import MakiniError
from rotator.makini import MakiniClient
from rotator.makini.sim import SimServer
from rotator.settings import MakiniSettings, RetrySettings

PROD, PROD_SECRET = "test-prod", "test-prod-secret"
DEV, DEV_SECRET = "test-dev", "test-dev-secret"


class FakeSleep:
    """Records each backoff delay; ``then`` runs after each (e.g. to end an outage)."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.then: Callable[[float], object] | None = None

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.then is not None:
            self.then(delay)
        await asyncio.sleep(0)


def settings(url: str, client_id: str = PROD, **overrides: Any) -> MakiniSettings:
    retry = overrides.pop("retry", {})
    return MakiniSettings(
        base_url=url,
        client_id=client_id,
        client_secret_env="UNUSED_IN_THESE_TESTS",
        timeout_s=5,
        retry=RetrySettings(**{"max_attempts": 4, "base_delay_s": 0.5, "max_delay_s": 8,
                               "total_timeout_s": 60, **retry}),
        **overrides,
    )


@pytest.fixture
def sleeper() -> FakeSleep:
    return FakeSleep()


ClientFactory = Callable[..., MakiniClient]


@pytest.fixture
async def make_client(sim: SimServer, sleeper: FakeSleep) -> AsyncIterator[ClientFactory]:
    """``make_client(client_id=..., secret=..., transport=..., **settings)``; all are closed."""
    made: list[MakiniClient] = []

    def make(
        client_id: str = PROD,
        secret: str | None = None,
        *,
        url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] | None = None,
        **overrides: Any,
    ) -> MakiniClient:
        extra: dict[str, Any] = {"clock": clock} if clock else {}
        client = MakiniClient(
            settings(url or sim.url, client_id, **overrides),
            secret or {PROD: PROD_SECRET, DEV: DEV_SECRET}.get(client_id, "x"),
            environment="test",
            transport=transport,
            sleep=sleeper,
            **extra,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


@pytest.fixture
def client(make_client: ClientFactory) -> MakiniClient:
    return make_client()


def assert_clean(error: BaseException, *secrets: str) -> None:
    """No secret in the error's str, repr, describe() or args, nor in its cause's str."""
    texts = [str(error), repr(error), *map(str, error.args)]
    if isinstance(error, MakiniError):
        texts += [error.describe(), error.hint or "", error.where or "", error.code or ""]
    if error.__cause__ is not None:
        texts.append(str(error.__cause__))
    for secret in secrets:
        for text in texts:
            assert secret not in text, f"a secret leaked into {type(error).__name__}: {text!r}"
