"""Access control (``--auth``): every route against tokens of every kind, scopes checked
against the channel of a message named by id or lease, listings limited to what a token
may see, revocation and expiry across processes, hostile headers, and ``linger token``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from linger import tokencli
from linger.auth.cache import FAILURE_BURST, Authenticator
from linger.auth.scopes import Grant, InvalidScope, matches, parse
from linger.auth.tokens import Token, digest, new_secret
from linger.http.access import GUARD, budget_key, client, networks
from linger.http.keys import BROKER
from linger.store import db, tokens

from .conftest import ClientFactory, NoDeadlocks
from .helpers import Client, Probe, connection, error, raw, raw_request, status_of
from .processes import Server, start_server, until
from .test_migrations import _down_to, _to
from .test_schema import fresh_url  # noqa: F401 - a fixture

Headers = dict[str, str]


async def make_token(
    client: Client, *scopes: str, expires_at: int | None = None, name: str = "t"
) -> tuple[Token, str]:
    async with connection(client) as conn:
        return await tokens.create(conn, name, scopes, expires_at, int(time.time() * 1000))


def bearer(secret: str) -> Headers:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
async def guarded(make_client: ClientFactory) -> Client:
    return await make_client(auth=True)


class Kit:
    """An admin's view of the server, to set the scene of a request and to see what the
    request changed."""

    def __init__(self, client: Client, admin: Headers) -> None:
        self.client = client
        self.admin = admin

    async def add(self, channel: str = "orders.a", **query: str) -> int:
        response = await self.client.post(
            raw(f"/channels/{quote(channel, safe='')}"), data=b"m", params=query, headers=self.admin
        )
        assert response.status == 202, await response.text()
        return int((await response.json())["id"])

    async def delivered(self, channel: str = "orders.a") -> tuple[int, str]:
        """(id, lease) of a message just added and delivered."""
        await self.add(channel, dead="orders.dead")
        response = await self.client.get(
            raw(f"/channels/{quote(channel, safe='')}"), params={"nowait": ""}, headers=self.admin
        )
        assert response.status == 200
        return int(response.headers["x-linger-msg-id"]), response.headers["x-linger-lease"]

    async def state(self) -> Any:
        """What any request could have changed: messages of each state, subscriptions."""
        stats = await (await self.client.get("/stats", headers=self.admin)).json()
        topics = await (await self.client.get("/topics", headers=self.admin)).json()
        keys = ("current-messages", "current-messages-ready", "current-messages-hidden")
        return [stats[key] for key in keys], topics


Scene = Callable[[Kit], Awaitable[tuple[str, str, dict[str, Any]]]]


@dataclass
class Case:
    """A request (built by ``scene`` on a fresh scene each time), the action it needs
    (None: any valid token) and whether that action must cover every name."""

    scene: Scene
    action: str | None
    everywhere: bool = False
    statuses: tuple[int, ...] = (200,)
    open: bool = False
    tokens: dict[str, Headers] = field(default_factory=dict)


def plain(method: str, path: str, **kwargs: Any) -> Scene:
    async def scene(_kit: Kit) -> tuple[str, str, dict[str, Any]]:
        return method, path, kwargs

    return scene


def by_id(method: str, suffix: str = "", *, lease: bool = True) -> Scene:
    async def scene(kit: Kit) -> tuple[str, str, dict[str, Any]]:
        message_id, token = await kit.delivered()
        return method, f"/messages/{message_id}{suffix}", {"params": {"lease": token}}

    return scene


def batch(path: str, key: str = "leases") -> Scene:
    async def scene(kit: Kit) -> tuple[str, str, dict[str, Any]]:
        message_id, token = await kit.delivered()
        named = [token] if key == "leases" else [message_id]
        return "POST", path, {"json": {key: named}}

    return scene


def queued(method: str, path: str, **kwargs: Any) -> Scene:
    async def scene(kit: Kit) -> tuple[str, str, dict[str, Any]]:
        await kit.add()
        return method, path, kwargs

    return scene


ITEMS = [{"body": "x"}]
CASES: dict[str, Case] = {
    "root": Case(plain("GET", "/"), None),
    "openapi": Case(plain("GET", "/openapi.json"), None),
    "channels": Case(plain("GET", "/channels"), None),
    "topics": Case(plain("GET", "/topics"), None),
    "health": Case(plain("GET", "/health"), None, open=True),
    "ready": Case(plain("GET", "/ready"), None, open=True),
    "ui": Case(plain("GET", "/ui"), None, open=True),
    "ui_asset": Case(plain("GET", "/ui/app.js"), None, open=True),
    "overview": Case(plain("GET", "/overview"), None),
    "stats": Case(plain("GET", "/stats"), "read", everywhere=True),
    "metrics": Case(plain("GET", "/metrics"), "read", everywhere=True),
    "post_message": Case(
        plain("POST", "/channels/orders.a", data=b"x"), "produce", statuses=(202,)
    ),
    "post_messages": Case(
        plain("POST", "/channels/orders.a/messages", json=ITEMS), "produce", statuses=(202,)
    ),
    "get_message": Case(queued("GET", "/channels/orders.a", params={"nowait": ""}), "consume"),
    "get_messages": Case(
        queued("GET", "/channels/orders.a/messages", params={"nowait": ""}), "consume"
    ),
    "peek": Case(queued("GET", "/channels/orders.a/peek"), "consume"),
    "delete_channel": Case(queued("DELETE", "/channels/orders.a"), "manage", statuses=(204,)),
    "redrive": Case(plain("POST", "/channels/orders.dead/redrive"), "manage"),
    "put_subscription": Case(
        plain("PUT", "/channels/orders.a/topics/orders.t"), "manage", statuses=(204,)
    ),
    "delete_subscription": Case(
        plain("DELETE", "/channels/orders.a/topics/orders.t"), "manage", statuses=(204,)
    ),
    "channel_stats": Case(plain("GET", "/channels/orders.a/stats"), "read"),
    "channel_topics": Case(plain("GET", "/channels/orders.a/topics"), "read"),
    "publish": Case(plain("POST", "/topics/orders.t", data=b"x"), "produce", statuses=(202,)),
    "publish_messages": Case(
        plain("POST", "/topics/orders.t/messages", json=ITEMS), "produce", statuses=(202,)
    ),
    "topic_channels": Case(plain("GET", "/topics/orders.t/channels"), "read"),
    "delete_messages": Case(batch("/messages/delete"), "consume"),
    "delete_messages_by_id": Case(batch("/messages/delete", "ids"), "consume"),
    "touch_messages": Case(batch("/messages/touch"), "consume"),
    "release_messages": Case(batch("/messages/release"), "consume"),
    "reject_messages": Case(batch("/messages/reject"), "consume"),
    "delete_message": Case(by_id("DELETE"), "consume", statuses=(204,)),
    "touch_message": Case(by_id("POST", "/touch"), "consume", statuses=(204,)),
    "release_message": Case(by_id("POST", "/release"), "consume", statuses=(204,)),
    "reject_message": Case(by_id("POST", "/reject"), "consume", statuses=(204,)),
}
ACTIONS = ("produce", "consume", "manage", "read")


async def test_every_route_against_every_kind_of_token(guarded: Client) -> None:
    """No token or a wrong one: 401 (with ``WWW-Authenticate: Bearer``); a token whose
    scopes miss the route's action or its names: 403, and nothing changed; the action on
    the names: 2xx; admin: 2xx. /health and /ready are open."""
    _admin, admin_secret = await make_token(guarded, "admin:*")
    kit = Kit(guarded, bearer(admin_secret))
    await kit.add("orders.dead")  # a dead letter... in name only: redrive finds none to move
    right = {a: bearer((await make_token(guarded, f"{a}:orders.*"))[1]) for a in ACTIONS}
    everywhere = {a: bearer((await make_token(guarded, f"{a}:*"))[1]) for a in ACTIONS}
    elsewhere = bearer((await make_token(guarded, *(f"{a}:other.*" for a in ACTIONS)))[1])
    wrong_actions = {
        a: bearer((await make_token(guarded, *(f"{b}:*" for b in ACTIONS if b != a)))[1])
        for a in ACTIONS
    }
    covered = {route.name for route in guarded.app.router.routes() if route.name}
    assert covered <= {name.removesuffix("_by_id") for name in CASES}, covered - set(CASES)
    unknown = "lgr_" + "A" * 43
    for name, case in CASES.items():
        allowed: list[Headers] = [kit.admin]
        denied: list[Headers] = []
        if case.action is None:
            allowed += [right["produce"], elsewhere]
        elif case.everywhere:
            allowed.append(everywhere[case.action])
            denied += [right[case.action], wrong_actions[case.action]]
        else:
            allowed += [right[case.action], everywhere[case.action]]
            denied += [elsewhere, wrong_actions[case.action]]
        # From another client (behind the same proxy): a client's failures spend its own
        # budget of lookups, not the others'.
        attacker = {"X-Forwarded-For": "203.0.113.9"}
        refused: list[Headers] = [
            attacker,
            {**attacker, **bearer(unknown)},
            {**attacker, "Authorization": "Basic YTpi"},
        ]
        for headers in allowed + refused + denied:
            method, path, kwargs = await case.scene(kit)
            before = await kit.state()
            response = await guarded.request(method, raw(path), headers=headers, **kwargs)
            if headers in allowed or case.open:
                assert response.status in case.statuses, (name, headers, await response.text())
                continue
            if headers in refused:
                await error(response, 401, "Authentication required.")
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
            else:
                await error(response, 403, "Not allowed.")
            assert await kit.state() == before, name


async def test_listings_show_only_what_a_token_may_act_on(guarded: Client) -> None:
    _admin, admin = await make_token(guarded, "admin:*")
    for channel, topic in (("orders.a", "orders.t"), ("payroll", "salaries"), ("x.in", "x.t")):
        response = await guarded.put(f"/channels/{channel}/topics/{topic}", headers=bearer(admin))
        assert response.status == 204
    _token, secret = await make_token(guarded, "read:orders.*", "produce:x.*")
    channels = await (await guarded.get("/channels", headers=bearer(secret))).json()
    topics = await (await guarded.get("/topics", headers=bearer(secret))).json()
    assert channels == {"channels": ["orders.a", "x.in"]}
    assert topics == {"topics": ["orders.t", "x.t"]}
    everything = await (await guarded.get("/channels", headers=bearer(admin))).json()
    assert everything == {"channels": ["orders.a", "payroll", "x.in"]}


async def test_a_batch_naming_one_message_out_of_scope_acts_on_none(guarded: Client) -> None:
    """Every item of a batch acknowledgement is checked, in the statement that acts: one
    message in another channel makes it 403, and the others stay as they were."""
    _admin, admin = await make_token(guarded, "admin:*")
    kit = Kit(guarded, bearer(admin))
    ours = [await kit.delivered("orders.a") for _ in range(3)]
    theirs = await kit.delivered("payroll")
    _token, secret = await make_token(guarded, "consume:orders.*")
    for path in ("/messages/delete", "/messages/touch", "/messages/release", "/messages/reject"):
        named = [lease for _id, lease in ours] + [theirs[1]]
        response = await guarded.post(path, json={"leases": named}, headers=bearer(secret))
        await error(response, 403, "Not allowed.")
    by_id = {"ids": [message_id for message_id, _lease in [*ours, theirs]]}
    await error(await guarded.post("/messages/delete", json=by_id, headers=bearer(secret)), 403)
    assert (await kit.state())[0] == [4 + 0, 0, 4]  # the four still delivered, untouched
    answer = await guarded.post(
        "/messages/delete", json={"leases": [lease for _id, lease in ours]}, headers=bearer(secret)
    )
    assert (await answer.json())["done"] == [message_id for message_id, _lease in ours]


async def test_a_dead_channel_or_redrive_target_needs_produce_on_it(guarded: Client) -> None:
    """A message must not reach, by dying or by a redrive, a channel its sender may not
    add to."""
    _token, secret = await make_token(guarded, "produce:orders.*", "manage:orders.*")
    headers = bearer(secret)
    denied = [
        guarded.post("/channels/orders.a", data=b"x", params={"dead": "payroll"}, headers=headers),
        guarded.post(
            "/channels/orders.a/messages", json=[{"body": "x", "dead": "payroll"}], headers=headers
        ),
        guarded.put("/channels/orders.a/topics/orders.t?dead=payroll", headers=headers),
        guarded.post("/channels/orders.dead/redrive", params={"to": "payroll"}, headers=headers),
    ]
    for request in denied:
        await error(await request, 403, "Not allowed.")
    ok = await guarded.post(
        "/channels/orders.a", data=b"x", params={"dead": "orders.dead"}, headers=headers
    )
    assert ok.status == 202


async def test_expired_and_revoked_tokens_stop_working(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("linger.auth.cache.FRESH_FOR", 0.2)  # revocation seen within 0.2 s
    guarded = await make_client(auth=True)
    token, secret = await make_token(guarded, "read:*", expires_at=int(time.time() * 1000) + 60_000)
    assert (await guarded.get("/stats", headers=bearer(secret))).status == 200
    async with connection(guarded) as conn:
        await tokens.revoke(conn, token.id, int(time.time() * 1000))
    await until(lambda: _status(guarded.get("/stats", headers=bearer(secret)), 401), seconds=5)
    _later, soon = await make_token(guarded, "read:*", expires_at=int(time.time() * 1000) + 300)
    assert (await guarded.get("/stats", headers=bearer(soon))).status == 200
    await asyncio.sleep(0.35)
    await error(await guarded.get("/stats", headers=bearer(soon)), 401)


async def _status(request: Awaitable[aiohttp.ClientResponse], status: int) -> bool:
    response = await request
    await response.read()
    return response.status == status


async def test_last_use_is_recorded_by_the_process_not_by_each_request(
    guarded: Client,
) -> None:
    token, secret = await make_token(guarded, "read:*")
    for _ in range(5):
        assert (await guarded.get("/stats", headers=bearer(secret))).status == 200
    guard = guarded.app[GUARD]
    used = guard.take_used()
    assert list(used) == [token.id]
    assert guard.take_used() == {}  # noted once per interval, whatever the requests
    await guarded.app[BROKER].storage.tokens.mark_used(used.items())
    async with connection(guarded) as conn:
        (listed,) = await tokens.every(conn)
    assert listed.last_used_at == used[token.id]


async def test_hostile_authorization_headers_get_401_and_others_are_served(
    guarded: Client,
) -> None:
    """Malformed, huge, non-ASCII and wrong-length headers are 401 (or the parser's 400
    for a head too large), never a 500 and never access; a flood of unknown tokens from
    one client costs at most its failure budget of lookups; other clients are served."""
    _token, good = await make_token(guarded, "read:*")
    values = [
        "",
        "Bearer",
        "Bearer ",
        "bearer",
        "Basic " + good,
        "Token " + good,
        "Bearer " + good[:-1],
        "Bearer " + good + "x",
        "Bearer " + good.replace("lgr_", "LGR_"),
        "Bearer " + "lgr_" + "!" * 43,
        "Bearer " + good + " " + good,
        "Bearer\t" + "x" * 4000,
        "Bearer " + "é" * 43,
    ]
    assert (await guarded.get("/stats", headers=bearer(good))).status == 200
    async with Probe(guarded, "/health") as probe:
        for value in values:
            response = await guarded.get("/stats", headers={"Authorization": value})
            await error(response, 401, "Authentication required.")
        for raw_value in (b"Bearer \xff\xfe" + b"a" * 41, b"Bearer lgr_" + b"\x80" * 43):
            head = b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: "
            assert status_of(await raw_request(guarded, head + raw_value + b"\r\n\r\n")) == 401
        huge = b"GET /stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"a" * 20000
        assert status_of(await raw_request(guarded, huge + b"\r\n\r\n")) in (400, 431)
        guard = guarded.app[GUARD]
        before = guard.lookups
        for _wave in range(10):  # 200 unknown secrets, 20 at a time
            flood = [guarded.get("/stats", headers=bearer(new_secret())) for _ in range(20)]
            for response in await asyncio.gather(*flood):
                assert response.status == 401
        assert guard.lookups - before <= FAILURE_BURST + 2
        # The token this client used before still works; another client's new one too.
        assert (await guarded.get("/stats", headers=bearer(good))).status == 200
        _other, fresh = await make_token(guarded, "read:*")
        elsewhere = {**bearer(fresh), "X-Forwarded-For": "198.51.100.7"}
        assert (await guarded.get("/stats", headers=elsewhere)).status == 200
    assert probe.worst < 0.25


async def test_scoped_consumers_share_a_channel_and_a_foreign_one_changes_nothing(
    guarded: Client, no_deadlocks: NoDeadlocks | None
) -> None:
    """Four consumers with scoped tokens take messages of one channel (single and batch
    receives, acknowledgements by lease) while a fifth client, whose token covers another
    channel, tries every action on their messages by id and lease: every message is
    handled exactly once, none twice while leased, and every foreign attempt is 403."""
    _admin, admin = await make_token(guarded, "admin:*")
    _producer, producer = await make_token(guarded, "produce:jobs")
    _worker, worker = await make_token(guarded, "consume:jobs")
    _stranger, stranger = await make_token(guarded, "consume:other", "produce:other")
    total = 120
    for start in range(0, total, 40):
        body = [{"body": str(i)} for i in range(start, start + 40)]
        response = await guarded.post(
            "/channels/jobs/messages", json=body, headers=bearer(producer)
        )
        assert response.status == 202
    seen: dict[str, int] = {}
    leases: list[tuple[int, str]] = []
    forbidden: list[int] = []

    async def consume(batched: bool) -> None:
        while True:
            if batched:
                response = await guarded.get(
                    "/channels/jobs/messages?nowait&n=5", headers=bearer(worker)
                )
                got = [
                    (m["id"], m["lease"], m["body"]) for m in (await response.json())["messages"]
                ]
            else:
                response = await guarded.get("/channels/jobs?nowait", headers=bearer(worker))
                if response.status == 204:
                    got = []
                else:
                    got = [
                        (
                            int(response.headers["x-linger-msg-id"]),
                            response.headers["x-linger-lease"],
                            await response.text(),
                        )
                    ]
            if not got:
                return
            for message_id, lease, body in got:
                assert body not in seen, f"{body} delivered twice while leased"
                seen[body] = message_id
                leases.append((message_id, lease))
            await asyncio.sleep(0.005)  # at work: the stranger may try its hand meanwhile
            acknowledged = await guarded.post(
                "/messages/delete", json={"leases": [g[1] for g in got]}, headers=bearer(worker)
            )
            done = (await acknowledged.json())["done"]
            assert sorted(done) == sorted(g[0] for g in got), "a lease was lost while held"

    async def meddle() -> None:
        headers = bearer(stranger)
        while len(seen) < total:
            if not leases:
                await asyncio.sleep(0.001)
                continue
            message_id, lease = leases[-1]
            attempts = [
                guarded.delete(f"/messages/{message_id}", headers=headers),
                guarded.post(f"/messages/{message_id}/release?lease={lease}", headers=headers),
                guarded.post(f"/messages/{message_id}/touch?lease={lease}", headers=headers),
                guarded.post("/messages/reject", json={"leases": [lease]}, headers=headers),
            ]
            for response in await asyncio.gather(*attempts):
                # Gone once the worker deleted it (404, or "missing" in a batch): the
                # stranger learns no more than that.
                assert response.status in (200, 403, 404), response.status
                if response.status == 200:
                    assert (await response.json())["done"] == []
                forbidden.append(response.status)

    await asyncio.gather(consume(True), consume(True), consume(False), consume(False), meddle())
    assert sorted(int(body) for body in seen) == list(range(total))
    assert 403 in forbidden
    stats = await (await guarded.get("/stats", headers=bearer(admin))).json()
    assert stats["current-messages"] == 0
    if no_deadlocks is not None:
        await no_deadlocks.check()


# The cache of token lookups, alone.


async def test_lookups_are_cached_shared_and_refreshed() -> None:
    calls: list[bytes] = []
    now = [0.0]
    secret = new_secret()
    token = Token(1, "t", ("read:*",), 0, None, None, None)

    async def lookup(key: bytes) -> Token | None:
        calls.append(key)
        await asyncio.sleep(0.01)
        return token if key == digest(secret) else None

    guard = Authenticator(lookup, lambda: 0, monotonic=lambda: now[0])
    verdicts = await asyncio.gather(*(guard.verdict(secret, "c") for _ in range(20)))
    assert all(v.grant is not None for v in verdicts)
    assert len(calls) == 1  # concurrent requests share one lookup
    now[0] += 1.0
    assert (await guard.verdict(secret, "c")).grant is not None
    assert len(calls) == 1
    now[0] += 1.5  # stale: looked up again, so that a revocation is seen
    await guard.verdict(secret, "c")
    assert len(calls) == 2


async def test_failures_of_one_client_stop_costing_lookups() -> None:
    calls = 0

    async def lookup(_key: bytes) -> Token | None:
        nonlocal calls
        calls += 1
        return None

    now = [0.0]
    guard = Authenticator(lookup, lambda: 0, monotonic=lambda: now[0])
    logged = [(await guard.verdict(new_secret(), "bad")).logged for _ in range(100)]
    assert calls == FAILURE_BURST
    assert logged.count(True) == FAILURE_BURST + 1  # and one line that says it stops
    assert (await guard.verdict(new_secret(), "someone else")).reason == "unknown token"
    assert calls == FAILURE_BURST + 1
    now[0] += 3  # the budget refills
    await guard.verdict(new_secret(), "bad")
    assert calls == FAILURE_BURST + 2


def test_scopes_and_their_patterns() -> None:
    assert parse("consume:orders.*") == ("consume", "orders.*")
    for bad in ("consume", "eat:orders", "consume:", "read:a\x00b", "read:" + "x" * 251):
        with pytest.raises(InvalidScope):
            parse(bad)
    assert matches("orders.*", "orders.eu.1")
    assert matches("*.dead", "orders.dead")
    assert not matches("orders.*", "orders")
    assert matches("a*b*c", "a-b-b-c")
    assert not matches("*a*a*a*a*a*a*a*a*a*b", "a" * 250)  # linear, not exponential
    grant = Grant(["produce:orders.*", "admin:ops"])
    assert grant.allows("produce", "orders.x")
    assert grant.allows("manage", "ops")
    assert not grant.allows("consume", "orders.x")
    assert grant.patterns("produce").like() == ["ops", "orders.%"]
    assert Grant(["read:a_b%c"]).patterns("read").like() == ["a\\_b\\%c"]
    assert Grant(["read:a?[b]*"]).patterns("read").glob() == ["a[?][[]b]*"]


async def test_patterns_match_the_same_names_in_sql_and_in_python(guarded: Client) -> None:
    """A glob with the characters LIKE and GLOB treat specially matches the same
    channels in the statement as in the request check."""
    _admin, admin = await make_token(guarded, "admin:*")
    kit = Kit(guarded, bearer(admin))
    names = ["a_b", "axb", "a%b", "a?b", "a[b]", "A_B", "a_bc"]
    delivered = {name: await kit.delivered(name) for name in names}
    for pattern in ("a_b", "a%b", "a?b", "a[b]", "a*b", "A*"):
        _token, secret = await make_token(guarded, f"consume:{pattern}")
        for name, (message_id, lease) in delivered.items():
            response = await guarded.post(
                f"/messages/{message_id}/touch", params={"lease": lease}, headers=bearer(secret)
            )
            expected = 204 if matches(pattern, name) else 403
            assert response.status == expected, (pattern, name)


# Two processes, and the command line.


def _linger(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "linger", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.postgres
async def test_revocation_reaches_every_process_within_5_s(
    server_args: list[str], servers: list[Server]
) -> None:
    await _migrated(server_args)
    created = _linger("token", "create", "--scope", "read:*", "--name", "ops", *server_args)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    first = await start_server(servers, *server_args, "--auth")
    second = await start_server(servers, *server_args, "--auth")
    async with aiohttp.ClientSession(headers=bearer(secret)) as session:
        for server in (first, second):
            async with session.get(server.base + "/stats") as response:
                assert response.status == 200
        listed = json.loads(_linger("token", "list", "--json", *server_args).stdout)
        revoked = _linger("token", "revoke", str(listed["id"]), *server_args)
        assert revoked.returncode == 0, revoked.stderr
        started = time.monotonic()
        for server in (first, second):

            async def refused(base: str = server.base) -> bool:
                async with session.get(base + "/stats") as response:
                    return response.status == 401

            await until(refused, seconds=5)
        assert time.monotonic() - started < 5


async def _migrated(server_args: list[str]) -> None:
    """The server's database exists (a server started on it once)."""
    if server_args[0] == "--dbfile":
        engine = db.create_engine(f"sqlite+aiosqlite:///{server_args[1]}")
        try:
            await db.upgrade(engine)
        finally:
            await engine.dispose()


def _command(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``linger token ARGS`` in this process: (exit status, stdout, stderr)."""
    try:
        tokencli.main(list(args))
    except SystemExit as exited:
        code = exited.code if isinstance(exited.code, int) else 1
        if isinstance(exited.code, str):
            print(exited.code, file=sys.stderr)
    else:
        code = 0
    out, err = capsys.readouterr()
    return code, out, err


def test_token_commands_on_the_servers_database(
    server_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(_migrated(server_args))
    code, secret, err = _command(
        capsys, "create", "--scope", "produce:orders.*", "--scope", "consume:orders.*",
        "--name", "worker", "--expires", "90", *server_args,
    )  # fmt: skip
    assert code == 0, err
    secret = secret.strip()
    assert secret.startswith("lgr_")
    assert len(secret) == 47
    assert "shown only this once" in err
    (listed,) = [
        json.loads(line)
        for line in _command(capsys, "list", "--json", *server_args)[1].splitlines()
    ]
    assert listed["name"] == "worker"
    assert listed["status"] == "active"
    assert listed["scopes"] == ["produce:orders.*", "consume:orders.*"]
    assert secret not in _command(capsys, "list", *server_args)[1]
    assert _command(capsys, "revoke", str(listed["id"]), *server_args)[0] == 0
    assert "revoked" in _command(capsys, "list", *server_args)[1]
    code, _out, err = _command(capsys, "revoke", "999", *server_args)
    assert code == 1
    assert err.strip() == "linger token: no token 999"


@pytest.mark.parametrize(
    "args",
    [
        ["create", "--scope", "eat:orders"],
        ["create", "--scope", "consume"],
        ["create", "--scope", "read:*", "--expires", "0"],
        ["create", "--scope", "read:*", "--expires", "0.0000001"],
        ["create", "--scope", "read: orders.*"],
        ["create", "--scope", "read:orders.\udcff"],
        ["revoke", "99999999999999999999"],
        ["create", "--scope", "read:*", "--name", ""],
        ["create"],
        ["revoke", "one"],
    ],
)
def test_bad_token_commands_are_one_line_and_exit_2(
    args: list[str], tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        tokencli.main([*args, "--dbfile", str(tmp_path / "x.db")])
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) <= 2, stderr  # the usage line and the error
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("args", "text"),
    [
        ([], "no database configured"),
        (["--db", "postgresql+asyncpg://u:secret@127.0.0.1:1/x"], "cannot use the database"),
        (["--dbfile", "/nonexistent/linger.db"], "no database at /nonexistent/linger.db"),
    ],
)
def test_token_command_without_a_reachable_database_is_one_line(args: list[str], text: str) -> None:
    with pytest.raises(SystemExit) as exited:
        tokencli.main(["list", *args])
    message = str(exited.value.code)
    assert text in message
    assert "secret" not in message
    assert "\n" not in message


@pytest.mark.postgres
async def test_token_command_on_a_schema_behind_names_the_upgrade(
    fresh_url: str,  # noqa: F811
) -> None:
    engine = db.create_engine(fresh_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_to("0004"))
    finally:
        await engine.dispose()
    result = _linger("token", "list", "--db", fresh_url)
    assert result.returncode == 1
    assert "alembic upgrade head" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_auth_with_the_in_memory_database_is_refused() -> None:
    result = _linger("--auth")
    assert result.returncode == 2
    assert "--auth needs a database" in result.stderr


async def test_upgrade_from_0004_adds_tokens_and_keeps_messages(
    fresh_url: str,  # noqa: F811
    make_client: ClientFactory,
) -> None:
    now = int(time.time() * 1000)
    engine = db.create_engine(fresh_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_to("0004"))
            await conn.execute(
                sa.text(
                    "INSERT INTO messages (channel, priority, timeout, deliver, linger, topic,"
                    " content_type, body, created_at, visible_at, dead_at, deliveries) VALUES"
                    " ('kept', 0, 30, 0, 0, '', 'text/plain', :body, :now, 0, NULL, 0)"
                ),
                {"body": b"before", "now": now},
            )
            await conn.execute(
                sa.text("INSERT INTO channels (name, polled_at, messages) VALUES ('kept', 0, 1)")
            )
        async with engine.begin() as conn:
            await conn.run_sync(_to("head"))
    finally:
        await engine.dispose()
    client = await make_client(db=fresh_url, auth=True)
    _token, secret = await make_token(client, "consume:kept")
    response = await client.get("/channels/kept?nowait", headers=bearer(secret))
    assert response.status == 200
    assert await response.read() == b"before"
    await client.close()
    engine = db.create_engine(fresh_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_down_to("0004"))
            tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            count = (await conn.execute(sa.text("SELECT count(*) FROM messages"))).scalar_one()
        assert "tokens" not in tables
        assert count == 1
    finally:
        await engine.dispose()


async def test_a_long_poll_ends_when_its_token_is_revoked(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer waiting when its token is revoked claims nothing afterwards: the
    message added then stays for consumers whose tokens hold."""
    monkeypatch.setattr("linger.auth.cache.FRESH_FOR", 0.2)
    guarded = await make_client(auth=True)
    _admin, admin = await make_token(guarded, "admin:*")
    token, secret = await make_token(guarded, "consume:jobs")
    waiting = asyncio.create_task(guarded.get("/channels/jobs?wait=2", headers=bearer(secret)))
    await until(lambda: _waiters(guarded, admin, 1))
    async with connection(guarded) as conn:
        await tokens.revoke(conn, token.id, int(time.time() * 1000))
    guard = guarded.app[GUARD]

    async def seen() -> bool:  # the entry the waiter keeps fresh says revoked
        cached = guard.cached(digest(secret))
        return cached is not None and cached.revoked_at is not None

    await until(seen)
    added = await guarded.post("/channels/jobs", data=b"x", headers=bearer(admin))
    assert added.status == 202
    assert (await waiting).status == 204
    stats = await (await guarded.get("/channels/jobs/stats", headers=bearer(admin))).json()
    assert stats == {"ready": 1, "hidden": 0}


async def _waiters(client: Client, admin: str, count: int) -> bool:
    stats = await (await client.get("/stats", headers=bearer(admin))).json()
    return bool(stats["current-waiters"] == count)


async def test_names_out_of_scope_are_left_out_of_every_answer(guarded: Client) -> None:
    """Topics' subscribers, a publish's copies, a channel's topics and a dead channel's
    origins show only the names the token may read, consume or produce."""
    _admin, admin = await make_token(guarded, "admin:*")
    headers = bearer(admin)
    for channel in ("orders.a", "billing.secret"):
        response = await guarded.put(
            f"/channels/{channel}/topics/orders.events?dead=orders.dlq", headers=headers
        )
        assert response.status == 204
    assert (await guarded.put("/channels/orders.a/topics/billing.t", headers=headers)).status == 204
    kit = Kit(guarded, headers)
    for channel in ("orders.a", "billing.secret"):
        message_id, lease = await kit.delivered(channel)
        # Each message's dead channel is orders.dead (see Kit.delivered).
        rejected = await guarded.post(
            f"/messages/{message_id}/reject?lease={lease}", headers=headers
        )
        assert rejected.status == 204
    _token, secret = await make_token(
        guarded, "produce:orders.*", "read:orders.*", "manage:orders.*"
    )
    mine = bearer(secret)
    published = await guarded.post("/topics/orders.events", data=b"x", headers=mine)
    assert list(await published.json()) == ["orders.a"]
    batch = await guarded.post("/topics/orders.events/messages", json=ITEMS, headers=mine)
    assert [list(ids) for ids in (await batch.json())["messages"]] == [["orders.a"]]
    subscribers = await guarded.get("/topics/orders.events/channels", headers=mine)
    assert await subscribers.json() == {"channels": ["orders.a"]}
    topics = await guarded.get("/channels/orders.a/topics", headers=mine)
    assert await topics.json() == {"topics": ["orders.events"]}
    detail = await guarded.get("/channels/orders.dead/stats?detail", headers=mine)
    assert (await detail.json())["dead_from"] == ["orders.a"]
    # A redrive to their origins moves only the dead letters it may produce back.
    redriven = await guarded.post("/channels/orders.dead/redrive", headers=mine)
    assert await redriven.json() == {"moved": 1}
    everything = await guarded.get("/channels/orders.dead/stats?detail", headers=headers)
    assert (await everything.json())["dead_from"] == ["billing.secret"]


def test_the_client_is_the_hop_before_the_trusted_proxies() -> None:
    trusted = networks("127.0.0.1,10.0.0.0/8")

    def sender(peer: str, *forwarded: str) -> str:
        request = make_mocked_request(
            "GET", "/", headers=CIMultiDict(("X-Forwarded-For", f) for f in forwarded)
        )
        request._transport_peername = (peer, 1234)
        return client(request, trusted)

    assert sender("203.0.113.5", "1.2.3.4") == "203.0.113.5"  # not through a proxy
    assert sender("127.0.0.1", "1.2.3.4, 198.51.100.7") == "198.51.100.7"
    assert sender("127.0.0.1", "1.2.3.4", "198.51.100.7") == "198.51.100.7"  # two lines
    assert sender("127.0.0.1", "198.51.100.7, 10.1.2.3") == "198.51.100.7"  # two proxies
    assert sender("127.0.0.1", "198.51.100.7, junk") == "127.0.0.1"
    assert budget_key("2001:db8::1") == budget_key("2001:db8::ffff") == "2001:db8::/64"
    assert budget_key("x" * 9000) == "x" * 64


async def test_health_is_open_to_any_method(guarded: Client) -> None:
    assert (await guarded.head("/health")).status == 405
    assert (await guarded.get("/ready")).status == 200
