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
from linger.http.keys import BROKER
from linger.store import dashboard, db, tokens

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
        assert policy["img-src"] == ["'self'"]  # no data: (nothing uses it)
    assert (await client.head("/ui")).status == 405
    missing = await client.get("/ui/missing.js")
    await error(missing, 404)
    for header, value in HEADERS.items():
        assert missing.headers[header] == value, header
    assert "Content-Security-Policy" in missing.headers


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
    # Derived from the served files: a new asset needs no token, and nothing else is open.
    open_ui = {"/ui", "/ui/", *(f"/ui/{name}" for name in ui.ASSETS)}
    assert {"/health", "/ready"} | open_ui == access.OPEN_PATHS
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
    # Topics as /topics lists them; a subscription only where the token reads the channel.
    assert [t["name"] for t in scoped["topics"]] == ["orders.t", "x.t"]
    assert scoped["topics"][1]["subscriptions"] == []
    (subscription,) = scoped["topics"][0]["subscriptions"]
    assert subscription["channel"] == "orders.a"
    assert subscription["dead"] is None
    assert scoped["server"]["database"] is None
    assert scoped["server"]["pid"] is None  # process details: read:* only, as /stats
    assert scoped["server"]["uptime"] is None
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


async def test_dotted_channel_names_round_trip_percent_encoded(client: Client) -> None:
    """``.`` and ``..`` reach the server as %2E: the page cannot send them (browsers fold
    those segments even encoded), curl --path-as-is and the clients can."""
    for name, path in ((".", "%2E"), ("..", "%2E%2E")):
        assert (await client.post(raw(f"/channels/{path}"), data=b"x")).status == 202
        stats = await client.get(raw(f"/channels/{path}/stats"))
        assert (await stats.json())["ready"] == 1, name
    rows = {row["name"]: row for row in (await _overview(client))["channels"]}
    assert rows["."]["ready"] == rows[".."]["ready"] == 1


async def test_overview_details_need_read_on_each_channel(make_client: ClientFactory) -> None:
    client = await make_client(auth=True)
    admin = await _token(client, "admin:*")
    for body in ("d", "e"):
        added = await client.post("/channels/jobs?dead=jobs.dead", data=body, headers=admin)
        assert added.status == 202
    received = await client.get("/channels/jobs/messages?n=2&nowait", headers=admin)
    leases = [m["lease"] for m in (await received.json())["messages"]]
    assert (await client.post("/messages/reject", json={"leases": leases}, headers=admin)).ok
    assert (await client.post("/channels/jobs?dead=jobs.dead", headers=admin, data="f")).ok
    path = "/channels/audit/topics/jobs.t?dead=jobs.dead"
    assert (await client.put(path, headers=admin)).status == 204

    both = await _overview(client, await _token(client, "read:jobs*", "read:audit"))
    rows = {row["name"]: row for row in both["channels"]}
    assert rows["jobs.dead"]["dead_from"] == ["audit", "jobs"]
    assert rows["jobs"]["dead_to"] == ["jobs.dead"]
    assert rows["audit"]["dead_to"] == ["jobs.dead"]
    assert both["topics"][0]["subscriptions"][0]["dead"] == "jobs.dead"

    # Reads the dead channel, only consumes its origin: the origin's name, nothing else.
    dead_only = await _overview(client, await _token(client, "read:jobs.dead", "consume:jobs"))
    rows = {row["name"]: row for row in dead_only["channels"]}
    assert rows["jobs.dead"]["ready"] == 2
    assert rows["jobs.dead"]["dead_from"] == []  # jobs may not be read: not said
    assert rows["jobs"] == {
        "name": "jobs",
        **dict.fromkeys(("ready", "hidden", "delayed", "oldest_ready_age")),
        "dead_from": [],
        "dead_to": [],
    }
    # Reads the origin, may only produce into the dead channel: no counts, no links there.
    origin = await _overview(client, await _token(client, "read:audit", "produce:jobs.dead"))
    rows = {row["name"]: row for row in origin["channels"]}
    assert rows["jobs.dead"]["ready"] is None
    assert rows["jobs.dead"]["dead_from"] == []
    assert rows["audit"]["dead_to"] == []
    assert origin["topics"] == []  # topic jobs.t is not the token's


async def test_a_scoped_token_sees_its_topics_past_a_thousand_others(
    make_client: ClientFactory,
) -> None:
    client = await make_client(auth=True)
    others = [
        {"topic": f"a.{i:04}", "channel": "c", "priority": 0, "timeout": 30, "deliver": 0}
        | {"linger": 0, "delay": 0, "dead": None}
        for i in range(ui.SUBSCRIPTIONS_SHOWN + 1)
    ]
    async with connection(client) as conn:
        await conn.execute(db.subscriptions.insert(), others)
    admin = await _token(client, "admin:*")
    assert (await client.put("/channels/z.c/topics/z.t", headers=admin)).status == 204
    everything = await _overview(client, admin)
    assert everything["subscriptions_truncated"] is True
    assert "z.t" not in {t["name"] for t in everything["topics"]}

    # Listed as /topics lists it (consume on the topic is enough); the subscription's
    # options with read on its channel.
    mine = await _overview(client, await _token(client, "consume:z.t", "read:z.c"))
    assert mine["subscriptions_truncated"] is False
    listing = await client.get("/topics", headers=await _token(client, "consume:z.t"))
    assert (await listing.json())["topics"] == ["z.t"]
    assert [t["name"] for t in mine["topics"]] == ["z.t"]
    assert [s["channel"] for s in mine["topics"][0]["subscriptions"]] == ["z.c"]


async def test_overview_reads_are_shared_one_at_a_time_and_bounded_in_time(
    make_client: ClientFactory, monkeypatch: Any
) -> None:
    client = await make_client()
    await add(client, "orders")
    storage = client.app[BROKER].storage
    running, most, calls = 0, 0, []

    def counted(name: str, read: Any) -> Any:
        async def wrapper(*args: Any) -> Any:
            nonlocal running, most
            running += 1
            most = max(most, running)
            calls.append(name)
            try:
                await asyncio.sleep(delay)
                return await read(*args)
            finally:
                running -= 1

        return wrapper

    delay = 0.0
    monkeypatch.setattr(ui, "_ON_LOOP", 0)  # the thread paths, as with many names
    monkeypatch.setattr(storage.overview, "depths", counted("depths", storage.overview.depths))
    monkeypatch.setattr(
        storage.overview, "list_channels", counted("list", storage.overview.list_channels)
    )
    monkeypatch.setattr(
        dashboard, "list_subscriptions", counted("subs", dashboard.list_subscriptions)
    )
    monkeypatch.setattr(dashboard, "dead_links", counted("links", dashboard.dead_links))
    answers = await asyncio.gather(*(_overview(client) for _ in range(10)))
    assert all(a["channels"][0]["ready"] == 1 for a in answers)
    assert sorted(calls) == ["depths", "links", "list", "subs"]  # once for all ten
    assert most == 1  # one after the other: one pooled connection at a time
    await _overview(client)
    assert len(calls) == 4  # still fresh

    monkeypatch.setattr(ui, "OVERVIEW_TTL", 0.0)
    monkeypatch.setattr(ui, "OVERVIEW_TIMEOUT", 0.05)
    delay = 0.1
    slow = await client.get("/overview")
    await error(slow, 503)
    assert slow.headers["Retry-After"] == "1"
    async with Probe(client, "/health"):  # the loop stays free meanwhile
        await asyncio.sleep(0.5)


async def test_a_scoped_tokens_overview_reads_its_subscriptions_once_a_second(
    make_client: ClientFactory, monkeypatch: Any
) -> None:
    """Found by attacking the overview: a scoped token's subscriptions were read once per
    request. Concurrent requests of one scope share one read, reads of different scopes
    run one at a time, and each scope's read is kept for OVERVIEW_TTL."""
    client = await make_client(auth=True)
    headers = await _token(client, "read:orders.*")
    others = await _token(client, "read:payments.*")
    running, most, calls = 0, 0, []
    read = dashboard.list_subscriptions

    async def counted(*args: Any) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        calls.append(args[2] if len(args) > 2 else None)
        try:
            await asyncio.sleep(0.01)
            return await read(*args)
        finally:
            running -= 1

    monkeypatch.setattr(dashboard, "list_subscriptions", counted)
    requests = [_overview(client, headers) for _ in range(30)]
    requests += [_overview(client, others) for _ in range(30)]
    await asyncio.gather(*requests)
    scoped = [patterns for patterns in calls if patterns is not None]
    assert len(scoped) == 2  # once per scope, for sixty requests
    assert most == 1
    await _overview(client, headers)
    assert len([p for p in calls if p is not None]) == 2  # still fresh
