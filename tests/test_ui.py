"""The dashboard through the real app: its page and assets (headers, no inline script, no
file outside the assets), and ``GET /overview`` with and without ``--auth``."""

from __future__ import annotations

import asyncio
import time
import tomllib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from linger.http import access, ui
from linger.store import tokens

from .conftest import ClientFactory
from .helpers import Client, Probe, add, connection, error, raw, raw_request, status_of

ROOT = Path(__file__).parent.parent
XSS = "<img src=x onerror=alert(1)>"
XSS_PATH = "%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E"
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class _Markup(HTMLParser):
    """The page's scripts, stylesheets and event-handler attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str | None] = []
        self.inline: list[str] = []
        self.links: list[str] = []
        self.handlers: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        self.handlers += [name for name, _ in attrs if name.startswith("on") or name == "style"]
        if tag == "script":
            self.scripts.append(named.get("src"))
            self._in_script = True
        if tag == "link" and named.get("href"):
            self.links.append(str(named["href"]))

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append(data)


def _csp(value: str) -> dict[str, list[str]]:
    return {
        name: sources
        for name, *sources in (part.split() for part in value.split(";") if part.strip())
    }


async def test_page_and_assets_are_served_with_security_headers(client: Client) -> None:
    for path in ["/ui", "/ui/", *(f"/ui/{name}" for name in ui.ASSETS)]:
        response = await client.get(path)
        assert response.status == 200, path
        body = await response.read()
        name = path.removeprefix("/ui").removeprefix("/") or ui.PAGE
        assert body == ui.ASSETS[name][0]
        assert response.content_type == ui.ASSETS[name][1]
        for header, value in HEADERS.items():
            assert response.headers[header] == value, (path, header)
        policy = _csp(response.headers["Content-Security-Policy"])
        assert policy["default-src"] == ["'self'"]
        assert policy["script-src"] == ["'self'"]  # no 'unsafe-inline', no 'unsafe-eval'
        assert policy["frame-ancestors"] == ["'none'"]
        assert policy["object-src"] == ["'none'"]
    assert (await client.head("/ui")).status == 405


async def test_the_page_has_no_inline_script_and_its_script_no_markup_sink(client: Client) -> None:
    markup = _Markup()
    markup.feed((await (await client.get("/ui")).read()).decode())
    assert markup.scripts == ["/ui/app.js"]
    assert markup.inline == []
    assert markup.handlers == []
    for reference in [*markup.scripts, *markup.links]:
        assert reference is not None
        assert reference.startswith("/ui/")
        assert reference.removeprefix("/ui/") in ui.ASSETS
    script = ui.ASSETS["app.js"][0].decode()
    # Client data reaches the page as text only.
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    assert "sessionStorage" in script
    assert "localStorage" not in script


def test_assets_ship_in_the_package_and_are_open_with_auth() -> None:
    assert set(ui.ASSETS) == {"index.html", "app.js", "style.css", "favicon.svg"}
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "ui/*" in package_data["package-data"]["linger.http"]
    assert {"/ui", "/ui/", *(f"/ui/{name}" for name in ui.ASSETS)} <= access.OPEN_PATHS
    assert "overview" in access.RULES


async def test_hostile_paths_get_404_and_the_server_stays_responsive(client: Client) -> None:
    hostile = [
        "/ui/../../etc/passwd",
        "/ui/%2e%2e/",
        "/ui/%2e%2e/%2e%2e/etc/passwd",
        "/ui/..%2f..%2fetc%2fpasswd",
        "/ui/..",
        "/ui/./app.js",
        "/ui//app.js",
        "/ui/app.js/",
        "/ui/app.js%00",
        "/ui/%2fetc%2fpasswd",
        "/ui/__init__.py",
        "/ui/" + "a" * 5000,
    ]
    async with Probe(client, "/health"):
        for path in hostile:
            request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            answer = await raw_request(client, request)
            assert status_of(answer) in (404, 414, 431), (path, answer[:200])
            assert b"root:" not in answer
            assert b"import" not in answer
        await asyncio.gather(*(client.get(raw("/ui/%2e%2e%2f%2e%2e")) for _ in range(50)))
    response = await client.get(raw("/ui/%2e%2e/"))
    await error(response, 404)


async def _scene(client: Client) -> None:
    """Three channels, a dead channel with two rejected dead letters, a subscription."""
    await add(client, "orders", "a", priority="-1")
    await add(client, "orders", "b")
    await add(client, "billing", "c", delay="60")
    await add(client, XSS_PATH, "<b>x</b>")
    for body in ("d", "e"):
        await add(client, "jobs", body, dead="jobs.dead")
    received = await client.get("/channels/jobs/messages", params={"n": "2", "nowait": ""})
    leases = [m["lease"] for m in (await received.json())["messages"]]
    rejected = await client.post("/messages/reject", json={"leases": leases})
    assert rejected.status == 200
    subscribed = await client.put(
        "/channels/audit/topics/orders.placed",
        params={"priority": "3", "timeout": "60", "deliver": "5", "dead": "audit.dead"},
    )
    assert subscribed.status == 204


async def _overview(client: Client, headers: dict[str, str] | None = None) -> Any:
    response = await client.get("/overview", headers=headers)
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    return await response.json()


async def test_overview_shows_counts_dead_links_topics_and_the_process(client: Client) -> None:
    await _scene(client)
    overview = await _overview(client)
    rows = {row["name"]: row for row in overview["channels"]}
    assert list(rows) == sorted(rows)
    assert set(rows) == {"orders", "billing", XSS, "jobs.dead", "audit"}
    for name, row in rows.items():
        path = "/channels/" + (XSS_PATH if name == XSS else name) + "/stats"
        detail = await (await client.get(raw(path), params={"detail": ""})).json()
        shown = {k: row[k] for k in ("ready", "hidden", "delayed", "oldest_ready_age")}
        assert shown == {k: detail[k] for k in shown}, name
    assert rows["billing"]["delayed"] == 1
    assert rows["jobs.dead"]["ready"] == 2
    assert rows["jobs.dead"]["dead_from"] == ["jobs"]
    assert rows["audit"]["dead_to"] == ["audit.dead"]
    assert rows["orders"]["dead_from"] == rows["orders"]["dead_to"] == []
    assert overview["channels_total"] == 5
    assert overview["topics"] == [
        {
            "name": "orders.placed",
            "subscriptions": [
                {
                    "channel": "audit",
                    "priority": 3,
                    "timeout": 60,
                    "deliver": 5,
                    "linger": 0,
                    "delay": 0,
                    "dead": "audit.dead",
                }
            ],
        }
    ]
    server = overview["server"]
    stats = await (await client.get("/stats")).json()
    assert server["id"] == stats["id"]
    assert server["pid"] == stats["pid"]
    assert server["database"] == stats["db-file"]
    assert server["counters"]["msg-add"] == stats["msg-add"] == 6
    assert server["counters"]["delivered"] == 2
    assert server["waiters"] == 0
    assert server["auth"] is False
    assert overview["scopes"] is None


async def test_overview_counts_only_the_deepest_channels(make_client: ClientFactory) -> None:
    client = await make_client(metrics_channels=2)
    for channel, n in (("a", 3), ("b", 2), ("c", 1)):
        for _ in range(n):
            await add(client, channel)
    rows = {row["name"]: row for row in (await _overview(client))["channels"]}
    assert rows == {
        "a": {**rows["a"], "ready": 3},
        "b": {**rows["b"], "ready": 2},
    }


async def _token(client: Client, *scopes: str) -> dict[str, str]:
    async with connection(client) as conn:
        _token, secret = await tokens.create(conn, "t", scopes, None, int(time.time() * 1000))
    return {"Authorization": f"Bearer {secret}"}


async def test_overview_with_auth_shows_what_the_token_may_read(
    make_client: ClientFactory,
) -> None:
    client = await make_client(auth=True)
    admin = await _token(client, "admin:*")
    for channel in ("orders.a", "x.b", "other.c"):
        added = await client.post(f"/channels/{channel}", data=b"m", headers=admin)
        assert added.status == 202
    for channel, topic in (("orders.a", "orders.t"), ("other.c", "orders.t"), ("x.b", "x.t")):
        path = f"/channels/{channel}/topics/{topic}?dead=elsewhere.dead"
        assert (await client.put(path, headers=admin)).status == 204
    for path in ("/ui", "/ui/app.js"):  # the page needs no token: it asks for one
        assert (await client.get(path)).status == 200
    await error(await client.get("/overview"), 401, "Authentication required.")

    scoped = await _overview(client, await _token(client, "read:orders.*", "produce:x.*"))
    rows = {row["name"]: row for row in scoped["channels"]}
    assert set(rows) == {"orders.a", "x.b"}  # listed as /channels lists them
    assert rows["orders.a"]["ready"] == 1
    assert rows["x.b"]["ready"] is None  # produce only: the name, not the counts
    assert rows["orders.a"]["dead_to"] == []  # elsewhere.dead is not the token's to see
    assert scoped["channels_total"] == 2
    assert scoped["topics"] == [
        {"name": "orders.t", "subscriptions": [{**scoped["topics"][0]["subscriptions"][0]}]}
    ]
    (subscription,) = scoped["topics"][0]["subscriptions"]
    assert subscription["channel"] == "orders.a"
    assert subscription["dead"] is None
    assert scoped["server"]["database"] is None
    assert scoped["server"]["counters"] is None
    assert scoped["server"]["waiters"] is None
    assert scoped["scopes"]["read"] == ["orders.*"]
    assert scoped["scopes"]["produce"] == ["x.*"]
    assert scoped["scopes"]["manage"] == []

    everything = await _overview(client, await _token(client, "read:*"))
    assert {row["name"] for row in everything["channels"]} == {"orders.a", "x.b", "other.c"}
    assert everything["server"]["counters"]["msg-add"] == 3
    assert everything["server"]["auth"] is True
    assert all(row["ready"] == 1 for row in everything["channels"])

    nothing = await _overview(client, await _token(client, "consume:none.*"))
    assert nothing["channels"] == []
    assert nothing["topics"] == []
