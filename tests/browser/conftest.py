"""Browser tests: the real app on uvicorn in a background thread with its own event loop, driven by
Debian's headless Chromium through pytest-playwright's sync API in the test's thread.

Playwright's sync API marks its own event loop as running in the thread that uses it, so it lives
in this package's scope only (`playwright`, `browser` and friends are package-scoped here, not
session-scoped as the plugin has them): the async tests that run after this package get their
thread back. Never `playwright install`; the browser is /usr/bin/chromium (scripts/bootstrap)."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import FastAPI
from playwright.sync_api import Browser, BrowserContext, BrowserType, Page, Playwright, expect, sync_playwright

from companion.app import create_app
from companion.config import Settings
from companion.llm.scripted import ScriptedProvider
from companion.services import Services
from tests.conftest import make_settings
from tests.support.live import LiveServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FAILURE_SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-results"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
DEADLINE = 15.0  # seconds, for conditions the server side has to reach
T = TypeVar("T")

expect.set_options(timeout=10_000)


class ThreadedServer:
    """`LiveServer` in a thread of its own, with its own event loop. `run` executes a coroutine
    there (e.g. creating a user); `call_soon` runs a plain callable there (e.g. releasing a
    ScriptedReply's gate, an asyncio primitive of that loop)."""

    def __init__(self, app: FastAPI) -> None:
        self.live = LiveServer(app)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="browser-test-server", daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    @property
    def base_url(self) -> str:
        return self.live.base_url

    @property
    def services(self) -> Services:
        return self.live.app.state.services  # type: ignore[no-any-return]

    def start(self) -> None:
        self._thread.start()
        self.run(self.live.start())

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call_soon(self, callback: Callable[[], object]) -> None:
        self.loop.call_soon_threadsafe(callback)

    def stop(self) -> None:
        try:
            self.run(self.live.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- the server -------------------------------------------------------------------------------------


@pytest.fixture
def web_settings(tmp_path: Path, sqlite_template: Path) -> Settings:
    database = tmp_path / "companion.db"
    shutil.copyfile(sqlite_template, database)
    return make_settings(f"sqlite+aiosqlite:///{database}", tmp_path)


@pytest.fixture
def start_server(provider: ScriptedProvider) -> Iterator[Callable[[Settings], ThreadedServer]]:
    """Start the app with the given settings and the test's scripted provider; stopped at the end."""
    started: list[ThreadedServer] = []

    def start(settings: Settings) -> ThreadedServer:
        server = ThreadedServer(create_app(settings, provider=provider))
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def app_server(start_server: Callable[[Settings], ThreadedServer], web_settings: Settings) -> ThreadedServer:
    return start_server(web_settings)


@pytest.fixture
def api_key(app_server: ThreadedServer) -> str:
    """A fresh user's API key, as `companion users create` prints it."""
    return app_server.run(app_server.services.users.create("ana")).api_key


@pytest.fixture
def api(app_server: ThreadedServer, api_key: str) -> Iterator[httpx.Client]:
    """The same user through the API with a bearer key, to check what the page did."""
    with httpx.Client(base_url=app_server.base_url, headers={"Authorization": f"Bearer {api_key}"}) as client:
        yield client


# --- the browser ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/bootstrap (or `apt-get install -y chromium`).")
    return {**browser_type_launch_args, "executable_path": str(CHROMIUM), "args": CHROMIUM_ARGS}


@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    driver = sync_playwright().start()
    yield driver
    driver.stop()


@pytest.fixture(scope="package")
def browser_type(playwright: Playwright, browser_name: str) -> BrowserType:
    return getattr(playwright, browser_name)  # type: ignore[no-any-return]


@pytest.fixture(scope="package")
def browser(browser_type: BrowserType, browser_type_launch_args: dict[str, Any]) -> Iterator[Browser]:
    launched = browser_type.launch(**browser_type_launch_args)
    yield launched
    launched.close()


@pytest.fixture(scope="package")
def browser_context_args() -> dict[str, Any]:
    return {}  # new_page sets the viewport and the base URL of each test's own server


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


def save_failure_screenshot(request: pytest.FixtureRequest, page: Page, label: str = "") -> None:
    if not request.node.stash.get(_FAILED, False) or page.is_closed():
        return
    FAILURE_SCREENSHOTS.mkdir(exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid.split("::", 1)[-1]) + label
    path = FAILURE_SCREENSHOTS / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    print(f"\nscreenshot of the failed page: {path}")


@pytest.fixture
def new_page(
    app_server: ThreadedServer, new_context: Callable[..., BrowserContext], request: pytest.FixtureRequest
) -> Iterator[Callable[..., Page]]:
    """Open pages on the test's server (`new_page(viewport=PHONE)`); each failed test leaves a
    screenshot of every page it opened in test-results/, and a page that threw an uncaught
    JavaScript error or broke its Content-Security-Policy fails the test. The server is set up
    first so that it stops last, after the browser contexts have closed their connections."""
    pages: list[Page] = []
    problems: list[str] = []

    def open_page(**context_args: Any) -> Page:
        page = new_context(**{"viewport": LAPTOP, **context_args, "base_url": app_server.base_url}).new_page()
        page.on("pageerror", lambda error: problems.append(f"uncaught error: {error}"))
        page.on(
            "console",
            lambda message: (
                problems.append(f"CSP: {message.text}") if "Content Security Policy" in message.text else None
            ),
        )
        pages.append(page)
        return page

    yield open_page
    for index, page in enumerate(pages):
        save_failure_screenshot(request, page, f"-{index}" if index else "")
    assert not problems, problems


@pytest.fixture
def page(new_page: Callable[..., Page]) -> Page:
    return new_page()


# --- helpers the tests share ------------------------------------------------------------------------


def sign_in(page: Page, api_key: str) -> None:
    page.goto("/")
    page.get_by_label("API key").fill(api_key)
    page.get_by_role("button", name="Sign in").click()
    wait_ready(page)


def wait_ready(page: Page) -> None:
    """The signed-in page has loaded what it shows first (and will not switch views on its own)."""
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#app")).not_to_have_attribute("aria-busy", "true")


def start_chat(page: Page, display_name: str) -> None:
    page.locator("#picker-list").get_by_role("button", name=re.compile(display_name)).click()
    expect(page.locator("#composer")).to_be_visible()


def send(page: Page, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")


def wait_until(condition: Callable[[], T], *, what: str, timeout: float = DEADLINE, page: Page | None = None) -> T:
    """Poll `condition` until it returns something truthy (and return that), failing after `timeout`.
    With `page`, wait through the page, not `time.sleep`: a condition set by Playwright's own
    callbacks (a `page.route` handler) changes only while Playwright waits."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        if page is None:
            time.sleep(0.05)
        else:
            page.wait_for_timeout(20)
