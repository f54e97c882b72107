"""The status page, in a real headless Chromium (Playwright driving ``/usr/bin/chromium``, never
a browser of its own) against the API served by uvicorn on 127.0.0.1 and the Makini simulator.

Playwright rather than selenium: its assertions wait for the page by themselves (no sleeps, no
polling loops), it starts the system Chromium directly (no chromedriver whose version must
match), and it reads cookies and takes screenshots with no extra plumbing.

The run keeps a screenshot under the test's tmp dir; with ``ROTATOR_UPDATE_SCREENSHOT=1`` it
also writes ``docs/status-page.png`` (the one the README shows).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from typer.testing import CliRunner

from rotator.aio import within
from rotator.api.status import COOKIE, KEEPALIVE_S, SESSION_S, check_session, issue_session
from rotator.cli.app import app as cli
from rotator.errors import ConfigError
from rotator.keys import create_key, list_keys, revoke_key
from rotator.makini.sim import SimServer
from rotator.scrub import mask
from tests.api.conftest import Factory, LogTrap, Served, bearer, make_keys
from tests.api.test_keys_and_readers import run, write_config
from tests.factories import Runtimes

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VERIFY_ROUTE = "GET /api/integrations/current"
DOCS_SHOT = Path(__file__).resolve().parents[2] / "docs" / "status-page.png"
WAIT_MS = 15_000  # the page hears of a change within about a second; this only bounds a failure


def chromium_installed() -> bool:
    return Path(CHROMIUM).exists()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert chromium_installed(), (
        f"{CHROMIUM} is missing: `make test` installs the Debian package chromium (apt-get)"
    )
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


def status_key(api: Served, trap: LogTrap, env: str = "prod", name: str = "wallboard") -> str:
    key = create_key(api.runtime.journal, env, name, status=True)[1]
    trap.secrets.add(key)
    api.app.state.keys.load(api.runtime.journal)
    return key


async def sign_in(page: Page, api: Served, key: str) -> None:
    await page.goto(f"{api.url}/status")
    await page.fill("#key", key)
    await page.click("#open")


def secrets_in(text: str, secrets: set[str]) -> list[str]:
    """The first characters of each secret found in ``text``."""
    return [s[:12] for s in secrets if s in text]


async def test_the_page_shows_failures_and_rotations_live(
    serve: Factory,
    browser: Browser,
    sim: SimServer,
    log_trap: LogTrap,
    tmp_path: Path,
    runtimes: Runtimes,
) -> None:
    api = await serve()
    keys = make_keys(api, log_trap)
    key = status_key(api, log_trap)
    for cred in ("alpha", "beta"):
        await api.rotate("prod", cred)
    page = await browser.new_page(viewport={"width": 1400, "height": 820})
    fetched: list[str] = []
    page.on("request", lambda request: fetched.append(request.url))
    await sign_in(page, api, key)

    alpha, beta = page.locator("#cred-alpha"), page.locator("#cred-beta")
    await expect(alpha).to_have_attribute("data-state", "ok")
    await expect(beta).to_have_attribute("data-state", "ok")
    await expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
    assert await page.locator("#cred-gamma").count() == 0  # dev's credential: not on prod's page
    assert await alpha.locator("meter").count() == 1  # the token's age against its lifetime
    await page.evaluate("window.stayed = true")  # gone if the page reloads

    # a failing credential: Makini rejects the new token, the rotation rolls back
    sim.set(fail_only=VERIFY_ROUTE, fail_next=[401])
    result = await api.runtime.engine.rotate("prod", "alpha", reason="test", actor="tests")
    assert not result.ok, result
    await expect(alpha).to_have_attribute("data-state", "failing", timeout=WAIT_MS)
    await expect(alpha.locator(".outcome")).to_contain_text("rolled back")
    await expect(page.locator(".pill.failing").first).to_have_text("1 failing")

    # a rotation shows without a reload: the new version in every backend, in the audit log
    sim.set(fail_only=None, fail_next=[])
    version = await api.rotate("prod", "beta")
    await expect(beta.locator(".backends")).to_contain_text(version[-8:], timeout=WAIT_MS)
    await expect(beta).to_have_attribute("data-state", "ok")
    await expect(page.locator(".audit tr.entry").first).to_contain_text("beta")
    assert await page.evaluate("window.stayed") is True
    assert fetched and all(url.startswith(f"{api.url}/") for url in fetched), fetched  # offline

    shot = tmp_path / "status-page.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("ROTATOR_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, DOCS_SHOT)

    # another process on the journal (a replica, `run-due`) rotates: seen through the journal
    other = runtimes.open(api.runtime.config)
    done = await other.engine.rotate("prod", "alpha", reason="test", actor="run-due")
    assert done.ok and done.version_id is not None, done
    await expect(alpha).to_have_attribute("data-state", "ok", timeout=WAIT_MS)
    await expect(alpha.locator(".backends")).to_contain_text(done.version_id[-8:])
    assert await page.evaluate("window.stayed") is True

    # never a token (nor a key) in the page or in the event stream
    secrets = set(sim.state.tokens) | set(keys.all()) | {key}
    assert len(sim.state.tokens) >= 3
    html = await page.content()
    assert secrets_in(html, secrets) == []
    assert "verify" in html and re.search(r"sha256:[0-9a-f]{6}", html) is None  # no fingerprint
    cookies = {c["name"]: c["value"] for c in await page.context.cookies()}
    stream = await first_event(api, cookies)
    assert 'id="cred-alpha"' in stream
    assert secrets_in(stream, secrets) == []
    for record in await page.context.cookies():
        assert record["httpOnly"] and record["sameSite"] == "Strict", record
        assert record["path"] == "/status"


async def first_event(api: Served, cookies: dict[str, str]) -> str:
    """The event stream as read until its first board (with the browser's session)."""
    got = ""
    async with (
        httpx.AsyncClient(base_url=api.url, cookies=cookies, timeout=10) as http,
        http.stream("GET", "/status/events") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for chunk in response.aiter_text():
            got += chunk
            if "event: board" in got and got.endswith("\n\n"):
                break
    return got


async def test_a_reader_key_is_refused_and_a_status_key_opens_only_the_page(
    serve: Factory, browser: Browser, log_trap: LogTrap
) -> None:
    api = await serve()
    keys = make_keys(api, log_trap)
    key = status_key(api, log_trap)
    await api.rotate("prod", "alpha")
    page = await browser.new_page()

    await sign_in(page, api, keys.reader["prod"])
    await expect(page.locator("#problem")).to_contain_text("reader key cannot open")
    assert await page.locator("#board").count() == 0
    assert await page.context.cookies() == []

    await sign_in(page, api, "mrs_0123456789ab_not-a-key-at-all")
    await expect(page.locator("#problem")).to_contain_text("not a live key")

    await sign_in(page, api, keys.admin["prod"])  # an admin key opens the page too
    await expect(page.locator("#cred-alpha")).to_have_attribute("data-state", "ok")
    await page.click("button.link")  # sign out
    await expect(page.locator("#key")).to_be_visible()

    await sign_in(page, api, key)
    await expect(page.locator("#cred-alpha")).to_have_attribute("data-state", "ok")

    # the status key opens nothing else
    for method, path in (
        ("GET", "/v1/tokens/prod/alpha"),
        ("GET", "/v1/tokens/prod"),
        ("POST", "/v1/admin/rotate/prod/alpha"),
    ):
        answer = await api.http.request(method, path, headers=bearer(key))
        assert answer.status_code == 403, (path, answer.text)
        assert "status key" in answer.json()["error"]["message"]
    # the session opens the page and its stream, nothing else; no session, no stream
    cookies = {c["name"]: c["value"] for c in await page.context.cookies()}
    stranger = await api.http.get("/status/events")
    assert stranger.status_code == 401
    value = cookies[COOKIE]
    tampered = value[:-2] + ("AA" if value[-2:] != "AA" else "BB")
    async with httpx.AsyncClient(base_url=api.url, cookies={COOKIE: tampered}) as forged:
        assert (await forged.get("/status")).status_code == 401
        assert (await forged.get("/status/events")).status_code == 401
    async with httpx.AsyncClient(base_url=api.url, cookies=cookies) as session:
        async with session.stream("GET", "/status/events") as opened:
            assert opened.status_code == 200
        assert (await session.get("/v1/tokens/prod/alpha")).status_code == 401

    # revoking the key ends its sessions
    revoke_key(api.runtime.journal, key)
    api.app.state.keys.load(api.runtime.journal)
    await page.reload()
    await expect(page.locator("#key")).to_be_visible()
    assert await page.locator("#board").count() == 0


async def test_text_from_keys_and_errors_is_shown_escaped(
    serve: Factory, browser: Browser, log_trap: LogTrap, sim: SimServer
) -> None:
    api = await serve()
    key = status_key(api, log_trap)
    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=1</script>'
    admin = create_key(api.runtime.journal, "prod", hostile, admin=True)[1]
    log_trap.secrets.add(admin)
    api.app.state.keys.load(api.runtime.journal)
    answer = await api.http.post(
        "/v1/admin/rotate/prod/alpha", headers=bearer(admin), json={"reason": "<b>bold</b>"}
    )
    assert answer.status_code == 200, answer.text
    page = await browser.new_page()
    await sign_in(page, api, key)
    actor = page.locator(".audit tr.entry").first
    await expect(actor).to_contain_text(hostile)  # shown as text, not run
    await expect(actor).to_contain_text("<b>bold</b>")
    assert await page.evaluate("window.pwned") is None
    assert await page.locator("#board script, #board img").count() == 0


async def test_sessions_expire_and_name_their_key(serve: Factory, log_trap: LogTrap) -> None:
    api = await serve()
    keys = make_keys(api, log_trap)
    key = status_key(api, log_trap)
    index = api.app.state.keys
    info = index.verify(key)
    assert info is not None and info.kind == "status"
    now = time.time()
    value = issue_session(index, info, now)
    assert value is not None and key not in value
    assert check_session(index, value, now) == info
    assert check_session(index, value, now + SESSION_S + 1) is None  # expired
    key_id, expires, mac = value.split(".")
    longer = f"{key_id}.{int(expires) + 3600}.{mac}"  # a client cannot extend it
    assert check_session(index, longer, now) is None
    reader = index.verify(keys.reader["prod"])
    assert reader is not None
    # a reader key's "session" is refused even when correctly signed
    signed = issue_session(index, reader, now)
    assert signed is not None and check_session(index, signed, now) is None

    # over TLS the cookie is Secure (the scheme the server sees, as with --tls-cert)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api.app), base_url="https://rotator.test"
    ) as tls:
        answer = await tls.post("/status/login", data={"key": key})
    assert answer.status_code == 303
    cookie = answer.headers["set-cookie"].lower()
    for attribute in ("httponly", "samesite=strict", "secure", "path=/status", "max-age=3600"):
        assert attribute in cookie, cookie


async def test_a_stopping_server_ends_the_event_streams_at_once(
    serve: Factory, log_trap: LogTrap
) -> None:
    api = await serve()
    key = status_key(api, log_trap)
    info = api.app.state.keys.verify(key)
    assert info is not None
    session = issue_session(api.app.state.keys, info, time.time())
    assert session is not None
    loop = asyncio.get_running_loop()
    async with (
        httpx.AsyncClient(base_url=api.url, cookies={COOKIE: session}, timeout=10) as http,
        http.stream("GET", "/status/events") as response,
    ):
        chunks = response.aiter_text()
        got = ""
        while "event: board" not in got:
            got += await within(anext(chunks), 10)
        started = loop.time()
        api.app.status.close()  # what `rotator serve` calls once it stops serving
        rest = await within(read_rest(chunks), 10)
        took = loop.time() - started
    assert took < KEEPALIVE_S / 2, took  # not after a keep-alive, nor after STREAM_MAX_S
    assert "event: board" not in rest


async def read_rest(chunks: AsyncIterator[str]) -> str:
    return "".join([chunk async for chunk in chunks])


async def test_keys_create_makes_a_status_key(
    serve: Factory, tmp_path: Path, namespace: str, log_trap: LogTrap
) -> None:
    api = await serve()
    config = write_config(
        tmp_path, api.runtime.config.environments["prod"].makini.base_url, namespace
    )
    create = ("keys", "create", "prod", "--name", "wallboard")
    code, out, _ = await asyncio.to_thread(run, log_trap, config, *create, "--status", "--json")
    made = json.loads(out)
    log_trap.secrets.add(made["key"])
    assert code == 0 and made["kind"] == "status" and made["key"].startswith("mrs_")
    assert mask(f"key {made['key']}") == f"key mrs_{made['key_id']}_[masked]"
    api.app.state.keys.load(api.runtime.journal)
    found = api.app.state.keys.verify(made["key"])
    assert found is not None and found.is_status and found.may_view_status

    for extra, said in (
        (("--status", "--credentials", "alpha"), "drop --credentials"),
        (("--status", "--admin"), "not both"),
    ):
        result = await asyncio.to_thread(
            CliRunner().invoke, cli, ["--config", str(config), *create, *extra]
        )
        assert result.exit_code != 0 and said in str(result.exception), (extra, result.exception)
        assert isinstance(result.exception, ConfigError)  # the CLI prints it, with no traceback
        assert result.stdout.strip() == ""
    assert [k.kind for k in list_keys(api.runtime.journal)] == ["status"]
