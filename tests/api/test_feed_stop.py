"""Nothing in the app's background holds up a shutdown: the loops that wait on an event (the
replica feed, the webhook worker) end when cancelled as the event is set, and the feed's
notification listener is left after a bounded wait (psycopg can lose a cancellation that arrives
while it connects, psycopg#1345). Either made ``serve`` hang after its drain."""

from __future__ import annotations

import asyncio
import contextlib

from rotator.api import build_app, feed
from tests.factories import RuntimeFactory
from tests.wait import tasks_awaiting_in, until


async def test_the_app_stops_when_its_loops_are_woken_as_the_shutdown_cancels_them(
    make_runtime: RuntimeFactory,
) -> None:
    """As under load: a journal notification and a webhook arrive just as the shutdown comes."""
    app = build_app(make_runtime())
    sent: list[str] = []
    started = asyncio.Event()

    async def receive() -> dict[str, str]:
        if not sent:
            return {"type": "lifespan.startup"}
        await started.wait()
        # both loops suspended on their events, so that the shutdown meets them there
        await until("the feed and webhook loops wait", lambda: tasks_awaiting_in("woken") >= 2)
        app.feed.changed()
        app.state.webhook_wake.set()
        return {"type": "lifespan.shutdown"}  # the app cancels its loops in this same step

    async def send(message: dict[str, str]) -> None:
        sent.append(message["type"])
        if message["type"] == "lifespan.startup.complete":
            started.set()

    lifespan = asyncio.ensure_future(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    )
    done, _ = await asyncio.wait({lifespan}, timeout=10)
    assert lifespan in done, f"the app did not stop; it sent {sent}"
    lifespan.result()
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_a_listener_that_loses_its_cancellation_is_left_after_a_bounded_wait() -> None:
    release, running = asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        running.set()
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # as a lost cancellation does
                await release.wait()

    listener = asyncio.ensure_future(stubborn())
    await running.wait()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await feed.stop_listener(listener)
    assert loop.time() - started < feed.LISTENER_STOP_S + 1
    assert not listener.done()  # left behind, not waited for
    release.set()
    await listener


async def test_a_listener_that_stops_is_waited_for() -> None:
    running = asyncio.Event()

    async def listening() -> None:
        running.set()
        await asyncio.Event().wait()

    listener = asyncio.ensure_future(listening())
    await running.wait()
    await feed.stop_listener(listener)
    assert listener.cancelled()
