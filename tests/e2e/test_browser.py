"""The web client (clients/web) in a real headless Chromium, through Envoy, against the server and the
mock model: browser --gRPC-Web--> Envoy (`gateway` fixture) --gRPC--> the in-process server.

The built app (clients/web/dist; built here with npm when missing or older than its sources) is
served by a static server on a free loopback port and pointed at the gateway with `?api=`. Chromium is
Debian's (/usr/bin/chromium) driven by Playwright's async API in the suite's event loop; no browser is
ever downloaded. Without /usr/bin/chromium these tests fail when CI is set and skip otherwise.
Screenshots of each step land in test-artifacts/.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import jwt
import pytest

from tests.support import PASSWORD, ROOT, unique_email

CHROMIUM = Path("/usr/bin/chromium")
WEB = ROOT / "clients" / "web"
DIST = WEB / "dist"
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
WAIT_MS = 20_000  # the longest any single step may take

pytestmark = pytest.mark.timeout(240)


# -- the app, the static server, the browser ------------------------------------------------------


def _newest_source_mtime() -> float:
    files = [WEB / "index.html", WEB / "package-lock.json", WEB / "vite.config.ts", WEB / "tsconfig.json"]
    files += [p for p in (WEB / "src").rglob("*") if p.is_file()]
    return max(p.stat().st_mtime for p in files if p.exists())


def _build_app() -> Path:
    """clients/web/dist, built with npm (npm ci from the lock file, then vite) when missing or stale."""
    index = DIST / "index.html"
    if index.exists() and index.stat().st_mtime >= _newest_source_mtime():
        return DIST
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is needed to build clients/web (Node.js 20+)")
    steps = (
        [] if (WEB / "node_modules" / ".bin" / "vite").exists() else [[npm, "ci", "--no-audit", "--no-fund"]]
    )
    steps.append([npm, "run", "build"])
    for cmd in steps:
        proc = subprocess.run(cmd, cwd=WEB, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            pytest.fail(
                f"`{' '.join(cmd[1:])}` in clients/web failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
    return DIST


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="session")
def chromium() -> str:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: install Debian's chromium (`make chromium`)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " — CI must run the browser tests")
        pytest.skip(message + " (CI is not set, so this is a skip)")
    return str(CHROMIUM)


@pytest.fixture(scope="session")
async def web_url(chromium: str) -> AsyncIterator[str]:
    """The built app on a free loopback port (a static server in a thread). The build runs in a
    thread too: the in-process server shares this event loop and must keep answering meanwhile."""
    dist = await asyncio.to_thread(_build_app)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(dist)))
    thread = threading.Thread(target=server.serve_forever, name="web-static", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    await asyncio.to_thread(thread.join, 5)


@pytest.fixture(scope="session")
async def playwright_driver(chromium: str):
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        yield p


async def _map_public_image_base(context, public_base: str, gateway_url: str) -> None:
    """Signed image URLs start with the server's EVERYTHING_IMAGE_URL_BASE, the gateway's public
    address in a deployment. This run's server was configured before its gateway got a free port,
    so when the two differ, requests to the public base are sent to this run's gateway instead (the
    browser still loads and decodes bytes that Envoy served). A no-op when the base is the gateway."""
    public_base = public_base.rstrip("/")
    if public_base == gateway_url:
        return

    async def to_gateway(route) -> None:
        url = gateway_url + route.request.url[len(public_base) :]
        await route.fulfill(response=await route.fetch(url=url))

    await context.route(re.compile("^" + re.escape(public_base) + "/v1/images/"), to_gateway)


class Browser:
    """One Chromium with a fresh profile and one page, plus what the page logged."""

    def __init__(self, context, page, app_url: str, artifacts: Path, name: str):
        self.context = context
        self.page = page
        self.app_url = app_url
        self.artifacts = artifacts
        self.name = name
        self.console: list[str] = []
        self.shots = 0
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    async def shot(self, step: str) -> Path:
        self.shots += 1
        path = self.artifacts / f"browser-{self.name}-{self.shots:02d}-{step}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path

    def testid(self, name: str):
        return self.page.get_by_test_id(name)

    async def goto(self, route: str = "") -> None:
        await self.page.goto(f"{self.app_url}#/{route}")

    async def storage(self, key: str, area: str = "localStorage"):
        raw = await self.page.evaluate(f"k => {area}.getItem(k)", key)
        return json.loads(raw) if raw else None


@pytest.fixture
async def browser(
    playwright_driver, web_url: str, gateway, settings, artifacts_dir: Path, tmp_path, request
) -> AsyncIterator[Browser]:
    context = await playwright_driver.chromium.launch_persistent_context(
        str(tmp_path / "profile"),
        executable_path=str(CHROMIUM),
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 900},
    )
    context.set_default_timeout(WAIT_MS)
    await _map_public_image_base(context, settings.image_url_base, gateway.url)
    page = context.pages[0] if context.pages else await context.new_page()
    name = re.sub(r"^test_", "", request.node.name)[:60]
    b = Browser(context, page, f"{web_url}/?api={quote(gateway.url, safe='')}", artifacts_dir, name)
    try:
        yield b
    finally:
        # The last screen and the page's console, whatever the outcome (a failure's best evidence).
        try:
            await b.shot("end")
        except Exception:  # noqa: BLE001, S110 - a screenshot must not hide the real failure
            pass
        (artifacts_dir / f"browser-{name}-console.log").write_text("\n".join(b.console))
        await context.close()


# -- steps ----------------------------------------------------------------------------------------


async def sign_up(b: Browser, email: str | None = None) -> str:
    email = email or unique_email()
    await b.goto("signin")
    await b.testid("auth-mode-toggle").click()
    await b.testid("auth-email").fill(email)
    await b.testid("auth-password").fill(PASSWORD)
    await b.testid("auth-display-name").fill("Ada")
    await b.testid("auth-submit").click()
    await b.testid("view-chat").wait_for()
    assert await b.testid("current-user").text_content() == "Ada"
    return email


def assistant(b: Browser, message_id: str | None = None):
    if message_id:
        return b.page.locator(f'[data-testid="message"][data-message-id="{message_id}"]')
    return b.page.locator('[data-testid="message"][data-role="assistant"]').last


async def send(b: Browser, text: str) -> str:
    """Sends a chat message; returns the assistant message's id once its reply has started."""
    before = await b.page.locator('[data-testid="message"][data-role="assistant"]').count()
    await b.testid("chat-input").fill(text)
    await b.testid("chat-send").click()
    await b.page.wait_for_function(
        """n => document.querySelectorAll('[data-testid="message"][data-role="assistant"]').length > n""",
        arg=before,
    )
    return await assistant(b).get_attribute("data-message-id")


async def reply_text(b: Browser, message_id: str) -> str:
    return await assistant(b, message_id).get_by_test_id("message-content").text_content() or ""


async def wait_status(b: Browser, message_id: str, status: str, timeout_ms: int = WAIT_MS) -> None:
    await b.page.wait_for_function(
        """([id, status]) => document.querySelector(
             `[data-testid="message"][data-message-id="${id}"]`)?.dataset.status === status""",
        arg=[message_id, status],
        timeout=timeout_ms,
    )


async def stored_message(db_conn, message_id: str) -> tuple[str, str]:
    row = await db_conn.fetchrow("SELECT content, status FROM messages WHERE id = $1", uuid.UUID(message_id))
    assert row is not None, f"message {message_id} was not stored"
    return row["content"], row["status"]


def assert_no_page_errors(b: Browser) -> None:
    errors = [line for line in b.console if line.startswith("pageerror")]
    assert not errors, errors


# -- tests ----------------------------------------------------------------------------------------


async def test_sign_up_sign_out_and_sign_in_again_with_readable_errors(browser: Browser):
    b = browser
    email = await sign_up(b)
    await b.shot("signed-up")
    session = await b.storage("everything.session")
    assert session["email"] == email and session["accessToken"] and session["refreshToken"]

    # A reload keeps the session (tokens in localStorage).
    await b.page.reload()
    await b.testid("view-chat").wait_for()

    await b.testid("sign-out").click()
    await b.testid("auth-form").wait_for()
    assert await b.storage("everything.session") is None

    # A wrong password: the ErrorInfo reason, read from grpc-status-details-bin, in plain words.
    await b.testid("auth-email").fill(email)
    await b.testid("auth-password").fill("not the password at all")
    await b.testid("auth-submit").click()
    error = b.testid("auth-error")
    await b.page.wait_for_function(
        """() => document.querySelector('[data-testid="auth-error"]')?.textContent"""
    )
    assert await error.get_attribute("data-reason") == "INVALID_CREDENTIALS"
    assert "Wrong email or password" in await error.text_content()

    # A weak password at sign-up: the BadRequest field violation shows under the field.
    await b.testid("auth-mode-toggle").click()
    await b.testid("auth-email").fill(unique_email())
    await b.testid("auth-password").fill("aaaaaaaaaaaa")
    await b.testid("auth-submit").click()
    await b.page.wait_for_function(
        """() => document.querySelector('[data-testid="auth-error-password"]')?.textContent"""
    )
    await b.shot("field-error")

    await b.testid("auth-mode-toggle").click()
    await b.testid("auth-email").fill(email)
    await b.testid("auth-password").fill(PASSWORD)
    await b.testid("auth-submit").click()
    await b.testid("view-chat").wait_for()
    assert_no_page_errors(b)


def _expired_copy(access_token: str, jwt_keys: str) -> str:
    """The same access token (user, session, key), signed again with an expiry an hour ago."""
    claims = jwt.decode(access_token, options={"verify_signature": False})
    kid, secret = jwt_keys.split(",")[0].split(":", 1)
    assert jwt.get_unverified_header(access_token)["kid"] == kid
    past = datetime.now(UTC) - timedelta(hours=1)
    claims.update(iat=int((past - timedelta(minutes=15)).timestamp()), exp=int(past.timestamp()))
    return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": kid, "typ": "at+jwt"})


async def _expire_access_token(b: Browser, jwt_keys: str) -> dict:
    session = await b.storage("everything.session")
    expired = {**session, "accessToken": _expired_copy(session["accessToken"], jwt_keys)}
    await b.page.evaluate("s => localStorage.setItem('everything.session', JSON.stringify(s))", expired)
    return expired


async def _wait_refreshed(b: Browser, old: dict) -> dict:
    await b.page.wait_for_function(
        """old => JSON.parse(localStorage.getItem('everything.session') || '{}').refreshToken !== old""",
        arg=old["refreshToken"],
    )
    new = await b.storage("everything.session")
    assert new["accessToken"] != old["accessToken"]
    return new


async def test_an_expired_access_token_is_refreshed_and_the_call_retried(browser: Browser, settings_env):
    b = browser
    keys = settings_env["EVERYTHING_JWT_KEYS"]
    await sign_up(b)

    # A unary call: on load the app checks the session (GetCurrentUser) -> TOKEN_EXPIRED ->
    # RefreshToken (the refresh token rotates) -> the call again, and the page works normally.
    expired = await _expire_access_token(b, keys)
    await b.page.reload()
    await _wait_refreshed(b, expired)
    await b.testid("view-chat").wait_for()
    await b.testid("nav-prefs").click()
    await b.page.wait_for_function(
        """() => document.querySelector('[data-testid="pref-save"]')?.disabled === false"""
    )
    assert await b.testid("error-banner").is_hidden()

    # A stream: SendMessage fails before its first event, is refreshed and opened again (once).
    await b.testid("nav-chat").click()
    await b.testid("chat-input").wait_for()
    expired = await _expire_access_token(b, keys)
    message_id = await send(b, "[mock:tokens=5 rate=0] Still signed in?")
    await wait_status(b, message_id, "completed")
    await _wait_refreshed(b, expired)
    assert await b.page.locator('[data-testid="message"][data-role="user"]').count() == 1
    assert await b.testid("error-banner").is_hidden()
    assert_no_page_errors(b)


async def test_chat_reply_appears_token_by_token_and_is_stored(browser: Browser, db_conn):
    b = browser
    await sign_up(b)
    message_id = await send(b, "[mock:tokens=60 rate=30] Tell me about the sea")
    # Sample the reply while it streams: it must grow in several steps, not arrive at once.
    lengths: list[int] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        lengths.append(len(await reply_text(b, message_id)))
        if await assistant(b, message_id).get_attribute("data-status") != "generating":
            break
        if len(lengths) == 10:
            await b.shot("streaming")
        await asyncio.sleep(0.1)
    await wait_status(b, message_id, "completed")
    final = await reply_text(b, message_id)
    growth = sorted({n for n in lengths if 0 < n < len(final)})
    assert len(growth) >= 3, f"the reply did not grow token by token: {lengths}"
    assert lengths == sorted(lengths), f"the reply shrank while streaming: {lengths}"
    await b.shot("completed")

    content, status = await stored_message(db_conn, message_id)
    assert (final, status) == (content, "completed")
    assert len(final.split()) == 60

    # The thread got a URL and is in the list; a reload shows the stored exchange.
    assert re.search(r"#/chat/[0-9a-f-]{36}$", b.page.url)
    await b.page.reload()
    await wait_status(b, message_id, "completed")
    assert await reply_text(b, message_id) == final
    assert await b.testid("thread-item").count() == 1
    assert_no_page_errors(b)


async def test_stop_cancels_the_reply_and_it_stays_cancelled(browser: Browser, db_conn, mock_model):
    b = browser
    await sign_up(b)
    first = await send(b, "[mock:tokens=8 rate=0] Warm up")
    await wait_status(b, first, "completed")

    aborts = len(mock_model.aborts)
    second = await send(b, "[mock:tokens=400 rate=20] Count slowly to four hundred")
    await b.page.wait_for_function(
        """id => (document.querySelector(`[data-message-id="${id}"] [data-testid="message-content"]`)
                  ?.textContent.length ?? 0) > 10""",
        arg=second,
    )
    await b.testid("chat-stop").click()
    await wait_status(b, second, "cancelled")
    assert (await assistant(b, second).get_by_test_id("message-status").text_content()) == "cancelled"
    await b.shot("cancelled")

    # The cancel reached the model (the upstream HTTP stream was closed) and nothing more arrives.
    await mock_model.wait_for_abort(timeout=10, count=aborts + 1)
    shown = await reply_text(b, second)
    await asyncio.sleep(0.6)
    assert await reply_text(b, second) == shown
    assert 0 < len(shown.split()) < 400
    content, status = await stored_message(db_conn, second)
    assert status == "cancelled" and content == shown

    await b.page.reload()
    await wait_status(b, second, "cancelled")
    await wait_status(b, first, "completed")
    assert await b.testid("chat-stop").is_hidden()
    assert_no_page_errors(b)


async def test_a_reload_mid_reply_resumes_the_stream_and_it_finishes(browser: Browser, db_conn):
    b = browser
    await sign_up(b)
    message_id = await send(b, "[mock:tokens=160 rate=20] Write a long story")
    await b.page.wait_for_function(
        """id => (document.querySelector(`[data-message-id="${id}"] [data-testid="message-content"]`)
                  ?.textContent.length ?? 0) > 20""",
        arg=message_id,
    )
    before = await reply_text(b, message_id)
    pending = await b.storage(f"everything.chat.pending.{message_id}", "sessionStorage")
    assert pending and int(pending["seq"]) > 0
    await b.shot("before-reload")

    await b.page.reload()
    # Still generating after the reload, and it keeps growing from where it was.
    await wait_status(b, message_id, "generating", timeout_ms=5000)
    await b.shot("after-reload")
    await wait_status(b, message_id, "completed")
    final = await reply_text(b, message_id)
    assert final.startswith(before.rstrip())
    assert len(final.split()) == 160, "the resumed reply lost or repeated tokens"
    content, status = await stored_message(db_conn, message_id)
    assert (final, status) == (content, "completed")
    assert await b.storage(f"everything.chat.pending.{message_id}", "sessionStorage") is None
    await b.shot("finished")
    assert_no_page_errors(b)


async def test_a_generated_image_shows_progress_and_is_decoded_in_the_page(browser: Browser):
    b = browser
    await sign_up(b)
    await b.testid("nav-images").click()
    await b.testid("image-prompt").fill("[mock:image-delay=0.3] A lighthouse at dusk")
    await b.testid("image-size").select_option("256x256")
    await b.testid("image-partials").select_option("2")
    await b.testid("image-generate").click()

    await b.page.wait_for_function(
        """() => { const p = document.querySelector('[data-testid="image-progress"]');
                   return p && !p.hidden && p.value > 0 && p.value < 100; }"""
    )
    await b.shot("progress")
    result = b.testid("image-result")
    await result.wait_for()
    await b.page.wait_for_function(
        """() => { const img = document.querySelector('[data-testid="image-result"]');
                   return img && img.complete && img.naturalWidth > 0; }"""
    )
    size = await result.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size == [256, 256]
    # Loaded from its signed URL through the gateway, not from bytes inlined in the page.
    src = await result.get_attribute("src")
    assert re.search(r"/v1/images/[0-9a-f-]{36}/content\?.*signature=", src), src
    assert await b.testid("image-preview").count() >= 1
    await b.shot("image")

    # The gallery lists it, and a reload loads it again from its signed URL.
    await b.page.reload()
    await b.page.wait_for_function(
        """() => [...document.querySelectorAll('[data-testid="gallery-image"]')]
                   .some(img => img.complete && img.naturalWidth > 0)"""
    )
    assert_no_page_errors(b)


async def test_search_shows_numbered_sources_and_a_cited_summary(browser: Browser):
    b = browser
    await sign_up(b)
    # Something of the user's own history to find (the `history` provider works offline).
    word = "quokka" + "".join(chr(ord("a") + int(c, 16) % 26) for c in uuid.uuid4().hex[:8])
    first = await send(b, f"What do {word} eat?")
    await wait_status(b, first, "completed")

    await b.testid("nav-search").click()
    # [mock:echo] makes the summary the prompt the model got, which lists the sources as [1], [2]...:
    # a summary with real citations to render, and proof that the sources reached the model.
    await b.testid("search-input").fill(f"{word} diet [mock:echo]")
    await b.testid("search-providers").fill("history")
    await b.testid("search-submit").click()
    await b.page.wait_for_function(
        """() => document.querySelector('[data-testid="search-status"]')?.dataset.status === 'completed'"""
    )
    sources = b.testid("search-source")
    assert await sources.count() >= 1
    indexes = [int(i) for i in await sources.evaluate_all("els => els.map(e => e.dataset.index)")]
    assert indexes == list(range(1, len(indexes) + 1))
    assert (await sources.first.locator(".num").text_content()) == "[1]"
    assert word in (await b.testid("search-sources").text_content())
    # The history source links back to the chat thread it found.
    href = await sources.first.locator("a").get_attribute("href")
    assert re.fullmatch(r"#/chat/[0-9a-f-]{36}", href)

    summary = await b.testid("search-summary").text_content()
    assert word in summary
    citation = b.page.locator('[data-testid="citation"][data-index="1"]').first
    await citation.click()
    await b.page.wait_for_function(
        """() => document.querySelector('[data-testid="search-source"][data-index="1"]')?.classList.contains('flash')"""
    )
    await b.shot("search")

    # The search is saved: it is listed and opens again.
    await b.page.reload()
    await b.testid("search-history-item").first.click()
    await b.page.wait_for_function(
        """() => document.querySelectorAll('[data-testid="search-source"]').length > 0"""
    )
    assert_no_page_errors(b)


async def test_preferences_are_saved_with_a_field_mask_and_honoured_by_chat(browser: Browser):
    b = browser
    await sign_up(b)
    await b.testid("nav-prefs").click()
    save = b.testid("pref-save")
    await b.page.wait_for_function(
        """() => document.querySelector('[data-testid="pref-save"]')?.disabled === false"""
    )

    # A value the server refuses: its BadRequest shows next to the field.
    await b.testid("pref-temperature").fill("7")
    await save.click()
    await b.page.wait_for_function(
        """() => document.querySelector('[data-testid="pref-error-temperature"]')?.textContent"""
    )
    await b.shot("field-error")

    await b.testid("pref-temperature").fill("0.4")
    await b.testid("pref-system_prompt").fill("You are a pirate named Flint.")
    await b.testid("pref-theme").select_option(label="dark")
    await save.click()
    await b.page.wait_for_function(
        """() => document.querySelector('[data-testid="pref-status"]')?.dataset.saved"""
    )
    saved = set((await b.testid("pref-status").get_attribute("data-saved")).split(","))
    assert saved == {"temperature", "system_prompt", "theme"}
    assert await b.page.evaluate("document.documentElement.dataset.theme") == "dark"

    await b.page.reload()
    await b.page.wait_for_function(
        """() => document.querySelector('[data-testid="pref-save"]')?.disabled === false"""
    )
    assert await b.testid("pref-temperature").input_value() == "0.4"
    assert await b.testid("pref-system_prompt").input_value() == "You are a pirate named Flint."
    await b.shot("saved")

    # Chat uses them: the mock echoes what it received.
    await b.testid("nav-chat").click()
    message_id = await send(b, "[mock:echo] hello")
    await wait_status(b, message_id, "completed")
    echo = await reply_text(b, message_id)
    assert "pirate named Flint" in echo and "0.4" in echo
    assert_no_page_errors(b)
