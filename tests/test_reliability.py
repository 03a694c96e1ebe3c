"""Overload, a full database and database outages: clear 4xx/5xx answers, never a 500 or
a hang, and service that resumes by itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sqlite3
import struct
import time
from functools import partial
from typing import Any

import aiohttp
import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from linger.http.keys import BROKER
from linger.store import db
from linger.store import driver as driver_module

from .conftest import ClientFactory, NoDeadlocks, _admin
from .helpers import Client, Probe, add, connection, error, get, server_stats, stats
from .pgcluster import Cluster, asyncpg_dsn
from .processes import Server, start_server
from .test_batches import add_many, receive


async def test_waiters_beyond_the_cap_get_503(make_client: ClientFactory) -> None:
    client = await make_client(max_waiters=2, poll_max=5.0)
    waiting = [asyncio.create_task(get(client, f"w{i}", wait=True)) for i in range(2)]
    deadline = asyncio.get_running_loop().time() + 3
    while (await server_stats(client))["current-waiters"] < 2:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    response = await client.get("/channels/w9")
    await error(response, 503, "Too many consumers are waiting, try again later.")
    assert response.headers["Retry-After"] == "1"
    # A message that is there is still delivered at once, cap or not.
    message_id = await add(client, "ready", "m")
    got = await get(client, "ready", wait=True)
    assert got.headers["x-linger-msg-id"] == str(message_id)
    for i, task in enumerate(waiting):
        await add(client, f"w{i}", "m")
        assert (await asyncio.wait_for(task, 2)).status == 200


@pytest.mark.sqlite
async def test_full_sqlite_database_is_507_and_keeps_what_it_has(
    make_client: ClientFactory, backend: str
) -> None:
    client = await make_client(db="sqlite+aiosqlite://")
    kept = await add(client, "c", "kept")
    async with connection(client) as conn:  # the in-memory database's only connection
        pages = (await conn.exec_driver_sql("PRAGMA page_count")).scalar_one()
        await conn.exec_driver_sql(f"PRAGMA max_page_count = {pages + 2}")
    statuses = []
    for _ in range(20):
        response = await client.post(
            "/channels/c", data=b"x" * 20_000, headers={"Content-Type": "text/plain"}
        )
        statuses.append(response.status)
        if response.status == 507:
            await error(response, 507, "The database is out of space: nothing was stored.")
            break
    assert statuses[-1] == 507
    assert set(statuses) <= {202, 507}
    stored = statuses.count(202)
    assert (await server_stats(client))["current-messages"] == 1 + stored
    assert (await get(client, "c")).headers["x-linger-msg-id"] == str(kept)


@pytest.mark.postgres
async def test_killed_pool_connections_give_503_then_recover(
    client: Client, database_url: str, backend: str
) -> None:
    kept = await add(client, "c", "kept")
    await asyncio.gather(*(add(client, f"warm{i}", "m") for i in range(8)))  # fill the pool
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        killed = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert killed
    finally:
        await conn.close()
    statuses = []
    started = time.monotonic()
    while True:
        response = await client.post(
            "/channels/c", data=b"m", headers={"Content-Type": "text/plain"}
        )
        statuses.append(response.status)
        if response.status == 503:
            await error(response, 503)
            assert response.headers["Retry-After"] == "1"
        if response.status == 202:
            break
        assert response.status == 503, await response.text()
        assert time.monotonic() - started < 5, statuses
    got = await get(client, "c")
    assert got.headers["x-linger-msg-id"] == str(kept)


class _Forgetful:
    """A TCP proxy in front of PostgreSQL that, once told to ``forget``, resets each
    connection it carried until then at the next byte sent through it (or, with
    ``silently``, drops every byte of it): a firewall or NAT that dropped the flows while
    they were idle, which neither end was told of."""

    def __init__(self, url: str) -> None:
        self._target = sa.make_url(url)
        self._forget = False
        self._silently = False
        self._writers: list[asyncio.StreamWriter] = []
        self._carrying: set[asyncio.Task[Any]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._carry, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return self._target.set(port=port).render_as_string(hide_password=False)

    def forget(self, *, silently: bool = False) -> None:
        self._forget = True
        self._silently = silently

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._carrying.add(task)
        target = self._target
        up_reader, up_writer = await asyncio.open_connection(target.host, target.port)
        self._writers += [writer, up_writer]
        born_forgotten = self._forget

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    if self._forget and not born_forgotten and self._silently:
                        continue
                    if self._forget and not born_forgotten:
                        # A reset (SO_LINGER 0), not a close: the client learns on reading.
                        linger = struct.pack("ii", 1, 0)
                        writer.get_extra_info("socket").setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, linger
                        )
                        writer.close()
                        up_writer.close()
                        return
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._carrying, return_exceptions=True)


@pytest.mark.postgres
@pytest.mark.parametrize(
    "action",
    ["add", "add at a mark", "claim", "claim of many", "delete", "touch", "release", "stats"],
)
async def test_pooled_connections_dropped_while_idle_are_replaced_unseen(
    make_client: ClientFactory, database_url: str, action: str
) -> None:
    """Every pooled connection is dropped by the network while idle (no FIN, no RST until
    it is used): the next request of each kind is served, on a new connection, without a
    503. A connection idle for a moment is pinged before it is lent again; without that,
    a write alone in its group (no BEGIN to fail first) could only answer 503."""
    proxy = _Forgetful(database_url)
    url = await proxy.start()
    try:
        client = await make_client(
            db=url,
            hlm=1000 if action == "add at a mark" else 0,
            sweep_interval=60.0,
            poll_interval=60.0,
        )
        await asyncio.gather(*(add(client, "c") for _ in range(6)))
        got = await get(client, "c")
        message_id, lease = got.headers["x-linger-msg-id"], got.headers["x-linger-lease"]
        proxy.forget()
        await asyncio.sleep(driver_module._PING_AFTER + 0.1)
        if action.startswith("add"):
            response = await client.post("/channels/c", data=b"m", headers={"Content-Type": "t/p"})
        elif action == "claim":
            response = await get(client, "c")
        elif action == "claim of many":  # outside the groups (Driver.write's direct)
            response = await client.get("/channels/c/messages", params={"n": "20", "wait": "1"})
        elif action == "delete":
            response = await client.delete(f"/messages/{message_id}", params={"lease": lease})
        elif action == "stats":
            response = await client.get("/channels/c/stats")
        else:
            response = await client.post(
                f"/messages/{message_id}/{action}", params={"lease": lease}
            )
        assert response.status < 300, await response.text()
        await client.close()
    finally:
        await proxy.close()


@pytest.mark.postgres
async def test_dead_idle_connections_cost_one_ping_and_no_place(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle connections whose flows a network drops without a word: one borrow pings the
    most recent, finds it dead and drops the older ones unpinged (one ping timeout, not
    one per connection); a borrower cancelled while a dead one is being dropped loses no
    place of the lender's (a lost place would end, after ``limit`` of them, in every
    request waiting for the pool and a 503)."""
    monkeypatch.setattr(driver_module, "_PING_AFTER", 0.0)
    monkeypatch.setattr(driver_module, "_PING_TIMEOUT", 0.5)
    proxy = _Forgetful(database_url)
    engine = db.create_engine(await proxy.start())
    lender = driver_module._Lender(engine, limit=4, keep=4, ping=True)
    try:
        lent = [await lender.borrow() for _ in range(3)]
        for each in lent:
            await lender.give_back(each)
        proxy.forget(silently=True)
        started = time.monotonic()
        fresh = await lender.borrow()
        assert time.monotonic() - started < 2.0
        assert (await fresh[1].fetchval("SELECT 1")) == 1
        await lender.give_back(fresh)
        # The same again (a new dead flow), cancelled while the dead one is dropped.
        proxy._forget, proxy._silently = False, False
        lent = [await lender.borrow() for _ in range(2)]
        for each in lent:
            await lender.give_back(each)
        proxy.forget(silently=True)
        dropping = asyncio.Event()
        invalidate = AsyncConnection.invalidate

        async def slow_invalidate(conn: AsyncConnection, *args: Any) -> None:
            dropping.set()
            await asyncio.sleep(0.2)
            await invalidate(conn, *args)

        monkeypatch.setattr(AsyncConnection, "invalidate", slow_invalidate)
        borrowing = asyncio.create_task(lender.borrow())
        await dropping.wait()
        borrowing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await borrowing
        monkeypatch.setattr(AsyncConnection, "invalidate", invalidate)
        proxy._forget = False
        held = [await asyncio.wait_for(lender.borrow(), 2.0) for _ in range(4)]
        assert [await conn.fetchval("SELECT 1") for _, conn in held] == [1] * 4
        for each in held:
            await lender.give_back(each)
    finally:
        await lender.close()
        await engine.dispose()
        await proxy.close()


OUTAGE_SECONDS = float(os.environ.get("LINGER_TEST_OUTAGE_SECONDS", "3"))


@pytest.mark.postgres
async def test_postgres_outage_is_503_then_service_resumes(
    servers: list[Server], backend: str
) -> None:
    """PostgreSQL stops under load (LINGER_TEST_OUTAGE_SECONDS, 3 s in CI, 10 s for the full
    run): requests get 503 with Retry-After, never a 500 or a hang; a long-poll waits
    through it; when PostgreSQL is back, service resumes without restarting Linger."""
    cluster = Cluster()
    url = await asyncio.to_thread(cluster.start)
    try:
        server = await start_server(servers, "--db", url, "--migrate", "--poll-max", "60")
        async with aiohttp.ClientSession() as session:
            waiting = asyncio.create_task(session.get(f"{server.base}/channels/through"))
            await server.until_waiting(session, 1)
            await asyncio.to_thread(cluster.stop_server)
            statuses = await _load_during(session, server, OUTAGE_SECONDS)
            assert statuses, "no request was made during the outage"
            assert set(statuses) <= {503}, statuses
            await asyncio.to_thread(cluster.start_server)
            resumed = await _until_accepted(session, server, 5.0)
            response = await asyncio.wait_for(waiting, 10)
            assert response.status == 200
            assert response.headers["x-linger-msg-id"] == str(resumed)
    finally:
        await asyncio.to_thread(cluster.stop)


async def _load_during(session: aiohttp.ClientSession, server: Server, seconds: float) -> list[int]:
    statuses = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        async with session.post(
            f"{server.base}/channels/other", data=b"m", headers={"Content-Type": "text/plain"}
        ) as response:
            body: Any = await response.json(content_type=None)
            statuses.append(response.status)
            if response.status == 503:
                assert response.headers["Retry-After"] == "1"
                assert "error" in body
        assert time.monotonic() - started < 6, "a request hung"
        await asyncio.sleep(0.1)
    return statuses


async def _until_accepted(session: aiohttp.ClientSession, server: Server, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while True:
        async with session.post(
            f"{server.base}/channels/through", data=b"after", headers={"Content-Type": "text/plain"}
        ) as response:
            if response.status == 202:
                return int((await response.json())["id"])
            assert response.status == 503, await response.text()
        assert time.monotonic() < deadline, "service did not resume"
        await asyncio.sleep(0.1)


async def test_trickled_body_does_not_stall_other_clients(client: Client) -> None:
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    body = b"x" * 40
    writer.write(
        b"POST /channels/slow HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    for index, byte in enumerate(body):
        writer.write(bytes([byte]))
        await writer.drain()
        if index % 8 == 0:  # meanwhile, everybody else is served at once
            started = time.monotonic()
            await add(client, "fast", "m")
            assert (await get(client, "fast")).status == 200
            assert time.monotonic() - started < 0.5
        await asyncio.sleep(0.01)
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 202")
    assert (await get(client, "slow")).status == 200


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /channels/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n",
        b"GET /stats HTTP/1.1\r\nHost: x\r\n" + b"X-Many: y\r\n" * 200 + b"\r\n",
    ],
)
async def test_oversized_request_head_is_4xx(client: Client, request_head: bytes) -> None:
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(request_head)
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4")), status_line
    assert (await client.get("/stats")).status == 200


@pytest.mark.sqlite
async def test_sqlite_file_locked_by_another_process_is_503_then_works(
    make_client: ClientFactory, database_url: str, backend: str
) -> None:
    client = await make_client(sqlite_busy_timeout=0.2)
    kept = await add(client, "c", "kept")
    path = database_url.split("///", 1)[1]
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        started = time.monotonic()
        response = await client.post("/channels/c", data=b"m", headers={"Content-Type": "t/p"})
        await error(response, 503, "The database is busy, try again later.")
        assert response.headers["Retry-After"] == "1"
        assert time.monotonic() - started < 2
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert (
        await client.post("/channels/c", data=b"m", headers={"Content-Type": "t/p"})
    ).status == 202
    assert (await get(client, "c")).headers["x-linger-msg-id"] == str(kept)


# PostgreSQL statements that make UPDATEs and DELETEs of messages lose races on purpose
# (SQLSTATE 40P01, as a deadlock victim does): the first ``first`` of them from now, then
# each with probability ``chance``. The sequence counts the statements tried.
_LOSING = [
    "CREATE SEQUENCE races",
    "CREATE TABLE losing (first bigint NOT NULL, chance float8 NOT NULL)",
    "INSERT INTO losing VALUES (0, 0)",
    "CREATE FUNCTION lose_a_race() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "DECLARE tried bigint := nextval('races'); odds losing; BEGIN "
    "SELECT * INTO odds FROM losing; "
    "IF tried <= odds.first OR random() < odds.chance THEN "
    "RAISE EXCEPTION 'a race lost on purpose' USING ERRCODE = 'deadlock_detected'; "
    "END IF; RETURN NULL; END $$",
    "CREATE TRIGGER lose_a_race BEFORE UPDATE OR DELETE ON messages "
    "FOR EACH STATEMENT EXECUTE FUNCTION lose_a_race()",
]
_FAIR = [
    "DROP TRIGGER lose_a_race ON messages",
    "DROP FUNCTION lose_a_race()",
    "DROP TABLE losing",
    "DROP SEQUENCE races",
]


async def _lose(url: str, first: int = 0, chance: float = 0.0) -> None:
    await _admin(
        url, "ALTER SEQUENCE races RESTART", f"UPDATE losing SET first={first}, chance={chance}"
    )


async def _tried(url: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return int(
            await conn.fetchval("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM races")
        )
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.parametrize("action", ["claim", "claim of many", "delete"])
async def test_a_write_that_loses_a_race_runs_again_then_answers_503(
    make_client: ClientFactory, database_url: str, action: str
) -> None:
    """A write that PostgreSQL picks as a deadlock victim (or that fails serialization) is
    run again, up to ``_RETRY_ATTEMPTS`` times in all, whether it ran in a group or, a
    claim of many, outside them: three losses are unseen, four are a 503 that changed
    nothing and that the unavailability counter counts."""
    client = await make_client(sweep_interval=60.0, poll_interval=60.0)
    await add_many(client, "c", [{"body": f"m{i}"} for i in range(30)])
    leases = [m["lease"] for m in await receive(client, "c", 2)]
    driver = client.app[BROKER].storage.driver

    async def act(lease: str) -> Any:
        if action == "claim":
            return await get(client, "c")
        if action == "claim of many":
            return await client.get("/channels/c/messages", params={"n": "20", "nowait": ""})
        return await client.post("/messages/delete", json={"leases": [lease]})

    await _admin(database_url, *_LOSING)
    try:
        await _lose(database_url, first=driver_module._RETRY_ATTEMPTS - 1)
        response = await act(leases[0])
        assert response.status == 200, await response.text()
        assert await _tried(database_url) == driver_module._RETRY_ATTEMPTS
        before = await stats(client, "c")
        unavailable = driver.unavailable
        await _lose(database_url, first=1000)
        await error(await act(leases[1]), 503)
        assert await _tried(database_url) == driver_module._RETRY_ATTEMPTS
        assert driver.unavailable == unavailable + 1
    finally:
        await _admin(database_url, *_FAIR)
    assert await stats(client, "c") == before
    response = await act(leases[1])
    assert response.status == 200, await response.text()


@pytest.mark.postgres
async def test_consumers_losing_races_at_random_lose_and_repeat_nothing(
    make_client: ClientFactory,
    database_url: str,
    no_deadlocks: NoDeadlocks | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fifth of the UPDATEs and DELETEs of messages lose a race, while eight consumers
    receive one at a time and in batches (in groups and outside them) and acknowledge by
    lease, and two producers add: every message is received once and deleted once, a
    503 is the worst any of them sees (it tries again), another client is answered
    promptly throughout, and PostgreSQL reports no real deadlock."""
    caplog.set_level(logging.INFO, "linger.store.driver")
    client = await make_client(sweep_interval=60.0, poll_interval=60.0)
    produced = await add_many(client, "c", [{"body": f"m{i}"} for i in range(300)])
    received: list[int] = []
    deleted: list[int] = []

    async def answered(request: Any) -> Any:
        while True:
            response = await request()
            if response.status != 503:
                assert response.status < 300, await response.text()
                return response
            await error(response, 503)  # given up after four losses: try again

    async def consumer(n: int) -> None:
        while True:
            response = await answered(
                lambda: client.get("/channels/c/messages", params={"n": str(n), "nowait": ""})
            )
            got = (await response.json())["messages"]
            if not got:
                return
            received.extend(message["id"] for message in got)
            leases = [message["lease"] for message in got]
            done = await answered(partial(client.post, "/messages/delete", json={"leases": leases}))
            deleted.extend((await done.json())["done"])

    async def producer() -> None:
        for _ in range(5):
            response = await answered(
                lambda: client.post("/channels/c/messages", json=[{"body": "p"}] * 20)
            )
            produced.extend((await response.json())["ids"])

    await _admin(database_url, *_LOSING)
    try:
        await _lose(database_url, chance=0.2)
        async with Probe(client, "/stats") as probe:
            await asyncio.gather(
                *(consumer(n) for n in (1, 1, 5, 5, 20, 20, 50, 50)), producer(), producer()
            )
    finally:
        await _admin(database_url, *_FAIR)
    await consumer(50)  # what the producers added after the others stopped
    assert len(received) == len(set(received))
    assert sorted(received) == sorted(deleted) == sorted(produced)
    lost = [record for record in caplog.records if "lost a race" in record.getMessage()]
    assert len(lost) >= 3
    assert probe.worst < 0.5, probe.worst
    assert no_deadlocks is not None
    await no_deadlocks.check()


@pytest.mark.postgres
async def test_closing_waits_for_a_claim_of_many_in_flight(
    make_client: ClientFactory, database_url: str
) -> None:
    """A claim of many runs outside the groups, in its request's task: stopping the
    storage waits for it too, so that it is answered and its connection is given back
    before the pool closes (none left lent)."""
    client = await make_client(sweep_interval=60.0, poll_interval=60.0)
    await add_many(client, "c", [{"body": f"m{i}"} for i in range(30)])
    storage = client.app[BROKER].storage
    await _admin(
        database_url,
        "CREATE FUNCTION slow_claims() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$",
        "CREATE TRIGGER slow_claims BEFORE UPDATE ON messages "
        "FOR EACH STATEMENT EXECUTE FUNCTION slow_claims()",
    )
    try:
        claiming = asyncio.create_task(
            client.get("/channels/c/messages", params={"n": "20", "nowait": ""})
        )
        deadline = time.monotonic() + 2
        while not storage.driver._direct:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await storage.driver.close()
        assert storage.driver._direct == 0
        assert storage.driver._lender._taken == 0
        response = await claiming
        assert response.status == 200
        assert len((await response.json())["messages"]) == 20
    finally:
        await _admin(
            database_url, "DROP TRIGGER slow_claims ON messages", "DROP FUNCTION slow_claims()"
        )
