"""The dashboard in a real browser (Debian's chromium, headless, driven by selenium through
chromium-driver): a server process on SQLite, the overview and a channel's page, a
redrive confirmed in the page, and a read-only token under ``--auth``. One browser for
every check; every wait is explicit and short.

Screenshots go to ``LINGER_TEST_SCREENSHOTS`` (a folder) when it is set, else to the
test's temporary folder; ``docs/dashboard-*.png`` were made so.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import pytest
from yarl import URL

from linger.store import db, tokens

from .processes import Server, start_server

pytestmark = pytest.mark.sqlite

try:
    from selenium import webdriver
    from selenium.common.exceptions import (
        NoAlertPresentException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.wait import WebDriverWait
except ImportError:  # pragma: no cover - the test extra installs it
    webdriver = None  # type: ignore[assignment]

XSS = "<img src=x onerror=alert(1)>"
WAIT = 6.0  # seconds: the page polls every 2 s
T = TypeVar("T")


def _tools() -> tuple[str, str]:
    browser = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if webdriver is None or browser is None or driver is None:
        missing = "selenium" if webdriver is None else "chromium and chromium-driver"
        if os.environ.get("LINGER_TEST_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{missing} required but not installed")
        pytest.skip(f"{missing} not installed")
    return browser, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    binary, driver = _tools()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--no-first-run",
        "--window-size=1280,900",
    ):
        options.add_argument(argument)
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield chrome
    finally:
        chrome.quit()


def until(browser: WebDriver, condition: Callable[[WebDriver], T], what: str) -> T:
    try:
        wait = WebDriverWait(
            browser, WAIT, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,)
        )
        result: T = wait.until(condition)
    except TimeoutException:
        pytest.fail(f"not seen within {WAIT} s: {what}")
    return result


def _shots() -> Path | None:
    folder = os.environ.get("LINGER_TEST_SCREENSHOTS")
    return Path(folder) if folder else None


def _cells(browser: WebDriver) -> dict[str, list[str]]:
    """The overview's channel table, read in one go: name -> [ready, hidden, delayed]."""
    rows: list[list[str]] = browser.execute_script(
        "return [...document.querySelectorAll('#channels tbody tr')]"
        ".map((tr) => [...tr.cells].map((td) => td.textContent))"
    )
    return {row[0]: row[1:4] for row in rows}


class Api:
    def __init__(self, session: aiohttp.ClientSession, base: str, headers: dict[str, str]):
        self.session = session
        self.base = base
        self.headers = headers

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        url = URL(self.base + path, encoded=True)  # names sent exactly as encoded
        async with self.session.request(method, url, headers=self.headers, **kwargs) as response:
            assert response.status < 300, (path, response.status, await response.text())
            return await response.json() if response.status != 204 else None

    async def add(self, channel: str, body: str = "hello", **options: str) -> None:
        path = "/channels/" + quote(channel, safe="")
        await self.call("POST", path, data=body, params=options)

    async def counts(self, channel: str) -> list[str]:
        path = "/channels/" + quote(channel, safe="") + "/stats"
        detail = await self.call("GET", path, params={"detail": ""})
        return [str(detail[state]) for state in ("ready", "hidden", "delayed")]


async def _scene(api: Api) -> None:
    """Three channels and a dead channel holding two rejected dead letters."""
    for body in ("one", "two", "three"):
        await api.add("orders", body)
    await api.add("billing", "later", delay="600")
    await api.add(XSS, "<script>alert(2)</script>")
    for body in ("job 1", "job 2"):
        await api.add("jobs", body, dead="jobs.dead")
    received = await api.call("GET", "/channels/jobs/messages", params={"n": "2", "nowait": ""})
    leases = [message["lease"] for message in received["messages"]]
    await api.call("POST", "/messages/reject", json={"leases": leases})
    await api.call("PUT", "/channels/audit/topics/orders?priority=1&dead=audit.dead")


def _no_alert(browser: WebDriver) -> None:
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - reading it is the check


async def test_dashboard_in_a_browser(
    browser: WebDriver, servers: list[Server], tmp_path: Path
) -> None:
    shots = _shots() or tmp_path
    server = await start_server(servers, "--dbfile", str(tmp_path / "open.db"))
    async with aiohttp.ClientSession() as session:
        api = Api(session, server.base, {})
        await _scene(api)

        # The overview: the counts the API gives, the hostile name as text.
        browser.get(server.base + "/ui")
        names = {"orders", "billing", XSS, "jobs.dead", "audit"}
        until(browser, lambda b: set(_cells(b)) == names, "every channel")
        for name in names:
            assert _cells(browser)[name] == await api.counts(name), name
        assert browser.find_elements(By.CSS_SELECTOR, "main img") == []
        _no_alert(browser)
        dead_row = browser.find_element(By.CSS_SELECTOR, '#channels tr[data-channel="jobs.dead"]')
        assert "dead channel of jobs" in dead_row.text
        assert "audit.dead" in browser.find_element(By.ID, "topics").text

        # More adds show without a reload.
        await api.add("orders", "four")
        await api.add("orders", "five")
        until(browser, lambda b: _cells(b)["orders"][0] == "5", "the new count")

        # To the dead channel's page with the keyboard; its dead letters, peeked.
        link = dead_row.find_element(By.TAG_NAME, "a")
        link.send_keys(Keys.ENTER)
        peeked = "#peek-ready tbody tr"
        until(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, peeked)) == 2, "a peek")
        first = browser.find_element(By.CSS_SELECTOR, peeked)
        assert "job 1" in first.text
        assert "from jobs (rejected)" in first.text
        stats = browser.find_element(By.ID, "channel-stats").text
        assert "Dead letters from\njobs" in stats
        browser.save_screenshot(str(shots / "dashboard-channel.png"))

        # Redrive, confirmed in the page's dialog; the API confirms the move.
        browser.find_element(By.ID, "redrive-button").click()
        dialog = browser.find_element(By.ID, "confirm")
        until(browser, lambda b: dialog.get_attribute("open") is not None, "the dialog")
        assert "every ready dead letter of jobs.dead" in dialog.text
        browser.find_element(By.ID, "confirm-ok").click()
        result = browser.find_element(By.ID, "action-result")
        until(browser, lambda b: result.text == "Moved 2 dead letters.", "the result")
        assert await api.counts("jobs.dead") == ["0", "0", "0"]
        assert await api.counts("jobs") == ["2", "0", "0"]
        until(browser, lambda b: not b.find_elements(By.CSS_SELECTOR, peeked), "an empty peek")

        # "5-" in How many is no number (badInput, value ""): an error, not "all".
        redrive_form = browser.find_element(By.ID, "redrive-form")
        redrive_form.find_element(By.NAME, "n").send_keys("5-")
        browser.find_element(By.ID, "redrive-button").click()
        until(browser, lambda b: "whole number" in result.text, "the refusal")
        assert dialog.get_attribute("open") is None
        redrive_form.find_element(By.NAME, "n").clear()

        # A phone's width: nothing wider than the screen.
        browser.set_window_size(390, 844)
        try:
            wide = browser.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth"
            )
            assert wide <= 0, wide
        finally:
            browser.set_window_size(1280, 900)

        await api.call("POST", "/channels/%2E%2E", data="dots")  # for the end

        # Back to the overview: the dead letters are where they came from.
        browser.find_element(By.LINK_TEXT, "← Overview").click()
        until(browser, lambda b: _cells(b).get("jobs") == ["2", "0", "0"], "the redriven")
        assert "jobs.dead" not in _cells(browser)  # empty now: channels come and go
        browser.save_screenshot(str(shots / "dashboard-overview.png"))

        # A channel named "..": browsers fold it out of any URL path, %2E%2E included, so
        # its page says so and reads nothing (it would read /stats and /topics instead).
        assert _cells(browser).get("..") == ["1", "0", "0"]
        browser.find_element(By.CSS_SELECTOR, '#channels tr[data-channel=".."] a').click()
        note = browser.find_element(By.ID, "channel-note")
        until(browser, lambda b: "cannot be read from this page" in note.text, "the note")
        assert not browser.find_element(By.ID, "actions").is_displayed()
        assert browser.find_element(By.ID, "channel-stats").text == ""
        assert browser.find_element(By.ID, "channel-name").text == ".."

    await _read_only_token(browser, servers, tmp_path)


async def _read_only_token(browser: WebDriver, servers: list[Server], tmp_path: Path) -> None:
    """With --auth the page asks for a token; a read-only one sees counts, no actions."""
    dbfile = tmp_path / "auth.db"
    server = await start_server(servers, "--dbfile", str(dbfile), "--auth")
    engine = db.create_engine(f"sqlite+aiosqlite:///{dbfile}")
    try:
        async with engine.begin() as conn:
            now = int(time.time() * 1000)
            _admin, admin = await tokens.create(conn, "admin", ["admin:*"], None, now)
            _reader, reader = await tokens.create(conn, "reader", ["read:*"], None, now)
    finally:
        await engine.dispose()
    async with aiohttp.ClientSession() as session:
        api = Api(session, server.base, {"Authorization": f"Bearer {admin}"})
        await api.add("orders", "secret")

    browser.get(server.base + "/ui#/channel/orders")
    dialog = browser.find_element(By.ID, "token-dialog")
    until(browser, lambda b: dialog.get_attribute("open") is not None, "the token dialog")
    browser.find_element(By.ID, "token-input").send_keys(reader + Keys.ENTER)
    stats = browser.find_element(By.ID, "channel-stats")
    until(browser, lambda b: "Ready\n1" in stats.text, "the counts")
    denied = browser.find_element(By.ID, "peek-denied")
    until(browser, lambda b: "consume" in denied.text, "peek refused")
    assert not browser.find_element(By.ID, "actions").is_displayed()
    assert "manage" in browser.find_element(By.ID, "actions-denied").text
    buttons = [b.text for b in browser.find_elements(By.TAG_NAME, "button") if b.is_displayed()]
    assert buttons == ["Token"]
    assert browser.execute_script("return sessionStorage.getItem('linger.token')") == reader
    assert reader not in browser.current_url
    _no_alert(browser)

    # Forgetting the token leaves nothing it read on the page.
    browser.find_element(By.ID, "token-button").click()
    until(browser, lambda b: dialog.get_attribute("open") is not None, "the token dialog")
    browser.find_element(By.ID, "token-forget").click()
    until(browser, lambda b: dialog.get_attribute("open") is not None, "asked again")
    assert stats.text == ""
    assert browser.execute_script("return sessionStorage.getItem('linger.token')") is None

    # A refused token is dropped, and the overview the last one had shown cleared.
    browser.find_element(By.ID, "token-input").send_keys(reader + Keys.ENTER)
    browser.get(server.base + "/ui#/")
    until(browser, lambda b: "orders" in _cells(b), "the overview")
    browser.find_element(By.ID, "token-button").click()
    browser.find_element(By.ID, "token-input").send_keys("refused" + Keys.ENTER)
    why = browser.find_element(By.ID, "token-why")
    until(browser, lambda b: "refused this token" in why.text, "the refusal")
    assert browser.execute_script("return sessionStorage.getItem('linger.token')") is None
    assert _cells(browser) == {}
    assert browser.find_element(By.ID, "server").text == ""
