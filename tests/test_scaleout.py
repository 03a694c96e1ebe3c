"""Several Linger processes on one database: wake-ups, exactly-once draining, the mark,
listings, the listener's reconnection, --workers, and nginx in front."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import sqlalchemy as sa

from .pgcluster import asyncpg_dsn
from .processes import Server, free_port, start_server, until

HEADERS = {"Content-Type": "text/plain"}


async def _json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        assert response.status == 200
        return await response.json()


async def _add(
    session: aiohttp.ClientSession, server: Server, channel: str, body: bytes = b"m"
) -> int:
    async with session.post(
        f"{server.base}/channels/{channel}", data=body, headers=HEADERS
    ) as response:
        assert response.status == 202, await response.text()
        return int((await response.json())["id"])


async def _poll_wakeup(
    session: aiohttp.ClientSession, consumer: Server, producer: Server, channel: str
) -> float:
    """Seconds from an add through ``producer`` to its delivery by ``consumer``."""

    async def consume() -> tuple[int, float]:
        async with session.get(f"{consumer.base}/channels/{channel}") as response:
            await response.read()
            assert response.status == 200
            return int(response.headers["x-linger-msg-id"]), time.perf_counter()

    waiting = asyncio.create_task(consume())
    await consumer.until_waiting(session, 1)
    sent = time.perf_counter()
    message_id = await _add(session, producer, channel)
    got_id, received = await asyncio.wait_for(waiting, 5)
    assert got_id == message_id
    return received - sent


@pytest.fixture
async def pair(servers: list[Server], server_args: list[str]) -> list[Server]:
    """Two server processes on the test's database; their fallback poll is slow (5 s), so
    that quick cross-process deliveries on PostgreSQL prove the notifications work."""
    return [await start_server(servers, *server_args, "--poll-interval", "5") for _ in range(2)]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.mark.postgres
async def test_cross_process_wakeup_p99_under_100ms(
    pair: list[Server], session: aiohttp.ClientSession, backend: str
) -> None:
    a, b = pair
    latencies = sorted([await _poll_wakeup(session, a, b, "x") for _ in range(100)])
    p99 = latencies[98]
    print(f"\ncross-process wake-up: p50 {latencies[49] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    assert p99 < 0.1


@pytest.mark.sqlite
async def test_shared_sqlite_file_wakes_other_process_by_polling(
    servers: list[Server],
    server_args: list[str],
    session: aiohttp.ClientSession,
    backend: str,
) -> None:
    a, b = [await start_server(servers, *server_args, "--poll-interval", "0.1") for _ in range(2)]
    for _ in range(5):
        assert await _poll_wakeup(session, a, b, "shared") < 2.0  # polled every 0.1 s


async def test_sixteen_consumers_over_two_processes_drain_each_message_once(
    pair: list[Server], session: aiohttp.ClientSession, database_url: str, backend: str
) -> None:
    total = 5000 if backend == "postgresql" else 2000
    produced = await asyncio.gather(
        *(_add(session, pair[i % 2], "work", f"m{i}".encode()) for i in range(200))
    )
    await _bulk_insert(database_url, "work", total - len(produced))
    received: list[int] = []
    redelivered: list[int] = []

    async def consumer(server: Server) -> None:
        while True:
            async with session.get(f"{server.base}/channels/work?nowait") as response:
                await response.read()
                if response.status == 204:
                    return
                received.append(int(response.headers["x-linger-msg-id"]))
                if response.headers["x-linger-delivered"] != "1":
                    redelivered.append(received[-1])
            async with session.delete(f"{server.base}/messages/{received[-1]}") as deleted:
                assert deleted.status == 204

    started = time.monotonic()
    await asyncio.gather(*(consumer(pair[i % 2]) for i in range(16)))
    assert time.monotonic() - started < 30  # no visibility timeout (30 s) ran out
    assert len(received) == total
    assert len(set(received)) == total
    assert redelivered == []
    assert set(produced) <= set(received)


async def _bulk_insert(database_url: str, channel: str, count: int) -> None:
    """Queue ``count`` messages directly in the database (test set-up only)."""
    rows = [(channel, 0, 30, 0, 0, "", "text/plain", b"bulk", 0, 0, None, 0)] * count
    sql = (
        "INSERT INTO messages (channel, priority, timeout, deliver, linger, topic, "
        "content_type, body, created_at, visible_at, dead_at, deliveries) VALUES "
    )
    if sa.make_url(database_url).get_backend_name() == "sqlite":
        import sqlite3

        path = str(sa.make_url(database_url).database)

        def insert() -> None:
            with sqlite3.connect(path, timeout=30) as conn:
                conn.executemany(sql + "(?,?,?,?,?,?,?,?,?,?,?,?)", rows)

        await asyncio.to_thread(insert)
        return
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.executemany(sql + "($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)", rows)
    finally:
        await conn.close()


async def test_high_level_mark_is_exact_across_processes(
    servers: list[Server], server_args: list[str], session: aiohttp.ClientSession
) -> None:
    a, b = [await start_server(servers, *server_args, "--hlm", "10") for _ in range(2)]

    async def post(server: Server, i: int) -> int:
        async with session.post(
            f"{server.base}/channels/capped", data=f"m{i}".encode(), headers=HEADERS
        ) as response:
            await response.read()
            return response.status

    statuses = await asyncio.gather(*(post((a, b)[i % 2], i) for i in range(60)))
    assert sorted(statuses) == [202] * 10 + [507] * 50
    for server in (a, b):
        assert await _json(session, f"{server.base}/channels/capped/stats") == {
            "ready": 10,
            "hidden": 0,
        }


async def test_every_process_gives_the_same_answers(
    pair: list[Server], session: aiohttp.ClientSession
) -> None:
    a, b = pair
    waiting = asyncio.create_task(session.get(f"{a.base}/channels/polled"))

    async def listed() -> bool:
        return "polled" in (await _json(session, f"{b.base}/channels"))["channels"]

    await until(listed)
    await _add(session, b, "busy")
    async with session.put(f"{b.base}/channels/sub/topics/t") as response:
        assert response.status == 204
    expected = ["busy", "polled", "sub"]
    for server in pair:
        assert (await _json(session, f"{server.base}/channels"))["channels"] == expected
        assert (await _json(session, f"{server.base}/topics"))["topics"] == ["t"]
    ids = {(await _json(session, f"{server.base}/"))["id"] for server in pair}
    assert len(ids) == 1
    stats = [await _json(session, f"{server.base}/stats") for server in pair]
    for key in (
        "current-channels",
        "current-messages",
        "msg-max-id",
        "current-subscriptions",
        "id",
    ):
        assert stats[0][key] == stats[1][key], key
    waiting.cancel()


@pytest.mark.postgres
async def test_killed_listener_connection_is_reestablished(
    pair: list[Server], session: aiohttp.ClientSession, database_url: str
) -> None:
    a, b = pair
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:

        async def listening() -> bool:
            count = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'linger-listener'"
            )
            return bool(count == 2) and all(
                [(await _json(session, f"{s.base}/stats"))["listener-connected"] for s in pair]
            )

        await until(listening, 10)  # each process connects its listener after it starts
        killed = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'linger-listener'"
        )
        assert len(killed) == 2
        await until(listening, 10)
    finally:
        await conn.close()
    for _ in range(5):
        assert await _poll_wakeup(session, a, b, "after") < 0.5


async def _worker_pids(server: Server, count: int) -> set[int]:
    pids: set[int] = set()
    deadline = time.monotonic() + 10
    while len(pids) < count:
        assert time.monotonic() < deadline, "requests never reached every worker"
        async with aiohttp.ClientSession() as fresh:  # a new connection each time
            pids.add((await _json(fresh, f"{server.base}/stats"))["pid"])
    return pids


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_workers_stop_when_their_supervisor_is_killed(
    servers: list[Server], server_args: list[str]
) -> None:
    server = await start_server(servers, *server_args, "--workers", "2")
    pids = await _worker_pids(server, 2)
    server.signal(signal.SIGKILL)

    async def stopped() -> bool:
        return all(_gone(pid) for pid in pids)

    await until(stopped, 10)


async def test_workers_share_one_port_and_stop_gracefully(
    servers: list[Server], server_args: list[str], session: aiohttp.ClientSession
) -> None:
    server = await start_server(servers, *server_args, "--workers", "2")
    await _worker_pids(server, 2)
    message_id = await _add(session, server, "w")
    waiting = [
        asyncio.create_task(session.get(f"{server.base}/channels/idle{i}")) for i in range(4)
    ]

    async def all_polling() -> bool:
        # A long-poll marks its channel polled in the claim it runs before waiting, in
        # the database every worker reads, so this holds whichever worker answers.
        listed = set((await _json(session, f"{server.base}/channels"))["channels"])
        return listed >= {f"idle{i}" for i in range(4)}

    await until(all_polling, 10)
    server.signal(signal.SIGTERM)
    responses = await asyncio.wait_for(asyncio.gather(*waiting), 10)
    assert [r.status for r in responses] == [204] * 4
    assert await asyncio.to_thread(server.wait, 15) == 0
    restarted = await start_server(servers, *server_args)
    async with session.get(f"{restarted.base}/channels/w?nowait") as response:
        assert response.headers["x-linger-msg-id"] == str(message_id)


# -- nginx -------------------------------------------------------------------------------


def _nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None
    )


@pytest.fixture
def nginx(pair: list[Server]) -> Any:
    binary = _nginx_binary()
    if binary is None:
        if os.environ.get("LINGER_TEST_REQUIRE_TOOLS") == "1":
            pytest.fail("nginx is required but not installed")
        pytest.skip("nginx not installed")
    conf = (Path(__file__).parent.parent / "deploy" / "nginx.conf").read_text()
    port = free_port()
    upstreams = "".join(f"        server 127.0.0.1:{s.port};\n" for s in pair)
    prefix = Path(tempfile.mkdtemp(prefix="linger-nginx-"))
    conf = (
        conf.replace(
            "pid /run/nginx.pid;",
            f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\ndaemon off;",
        )
        .replace("        server 127.0.0.1:8989;\n        server 127.0.0.1:8990;\n", upstreams)
        .replace("listen 80;", f"listen 127.0.0.1:{port};")
        .replace(
            "http {",
            f"http {{\n    client_body_temp_path {prefix}/body;\n"
            f"    proxy_temp_path {prefix}/proxy;",
        )
    )
    if os.geteuid() == 0:
        conf = "user root;\n" + conf
    (prefix / "nginx.conf").write_text(conf)
    process = subprocess.Popen(
        [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield f"http://127.0.0.1:{port}", process
    process.send_signal(signal.SIGQUIT)
    process.wait(10)
    shutil.rmtree(prefix, ignore_errors=True)


@pytest.mark.postgres
async def test_nginx_in_front_of_two_processes(
    nginx: Any, pair: list[Server], session: aiohttp.ClientSession
) -> None:
    base, process = nginx

    async def up() -> bool:
        assert process.poll() is None, "nginx exited"
        try:
            async with session.get(base + "/") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    await until(up, 10)
    async with session.post(
        f"{base}/channels/via", data=b"through nginx", headers=HEADERS
    ) as response:
        assert response.status == 202
        message_id = (await response.json())["id"]
    async with session.get(f"{base}/channels/via?nowait") as response:
        assert await response.read() == b"through nginx"
        assert response.headers["x-linger-msg-id"] == str(message_id)
    async with session.delete(f"{base}/messages/{message_id}") as response:
        assert response.status == 204
    # A long-poll answered through nginx, the message added through nginx too.
    waiting = asyncio.create_task(session.get(f"{base}/channels/lp"))
    await asyncio.sleep(0.3)
    started = time.perf_counter()
    async with session.post(f"{base}/channels/lp", data=b"late", headers=HEADERS) as posted:
        assert posted.status == 202
    response = await asyncio.wait_for(waiting, 5)
    assert response.status == 200
    assert await response.read() == b"late"
    assert time.perf_counter() - started < 1
    # Over --max-size: Linger's 413; far over it: nginx's own, both JSON.
    async with session.post(
        f"{base}/channels/big", data=io.BytesIO(b"x" * 300_000), headers=HEADERS
    ) as response:
        assert response.status == 413
        assert await response.json() == {"error": "Message is larger than 262144 bytes."}
    async with session.post(
        f"{base}/channels/big", data=io.BytesIO(b"x" * 2_000_000), headers=HEADERS
    ) as response:
        assert response.status == 413
        assert "error" in await response.json(content_type=None)
    # Request ids: the client's passes through, else nginx makes one; /metrics is served
    # to this machine, /ready and /health to anyone.
    async with session.get(f"{base}/ready", headers={"X-Request-Id": "edge-7"}) as response:
        assert response.status == 200
        assert response.headers["X-Request-Id"] == "edge-7"
    async with session.get(f"{base}/health") as response:
        assert response.status == 200
        assert len(response.headers["X-Request-Id"]) == 32  # nginx's $request_id
    async with session.get(f"{base}/metrics") as response:
        assert response.status == 200
        assert "linger_messages_added_total" in await response.text()


async def test_rolling_restart_under_load_fails_no_request(
    servers: list[Server], server_args: list[str]
) -> None:
    """Three SIGHUPs while clients cycle on keep-alive connections: the workers share one
    listening socket and a stopping one closes each connection after its response, so no
    request is refused, reset or cut off."""
    server = await start_server(servers, *server_args, "--workers", "2")
    await _worker_pids(server, 2)
    failures: list[str] = []
    added: set[int] = set()
    consumed: set[int] = set()
    stop = asyncio.Event()

    async def client() -> None:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as own:
            while not stop.is_set():
                try:
                    message_id = await _add(own, server, "hup")
                    added.add(message_id)
                    async with own.get(f"{server.base}/channels/hup?nowait") as response:
                        await response.read()
                        if response.status == 200:
                            got = int(response.headers["x-linger-msg-id"])
                            async with own.delete(f"{server.base}/messages/{got}") as deleted:
                                assert deleted.status == 204
                            consumed.add(got)
                except (aiohttp.ClientError, AssertionError) as failure:
                    failures.append(repr(failure))

    clients = [asyncio.create_task(client()) for _ in range(6)]
    for _ in range(3):
        before = await _worker_pids(server, 2)
        server.signal(signal.SIGHUP)

        async def replaced(old: set[int] = before) -> bool:
            return not (await _worker_pids(server, 2)) & old

        await until(replaced, 30)
    stop.set()
    await asyncio.gather(*clients)
    assert failures == []
    assert len(added) > 50
    leftover = set()
    async with aiohttp.ClientSession() as own:
        while True:
            async with own.get(f"{server.base}/channels/hup?nowait") as response:
                await response.read()
                if response.status == 204:
                    break
                leftover.add(int(response.headers["x-linger-msg-id"]))
    assert consumed | leftover == added


@pytest.mark.postgres
async def test_listener_connects_with_the_urls_driver_options(
    servers: list[Server], session: aiohttp.ClientSession, database_url: str, backend: str
) -> None:
    """TLS and statement-cache options in the URL apply to the LISTEN connection too, so
    that cross-process wake-ups come through NOTIFY, not the (here 5 s) poll."""
    url = f"{database_url}?ssl=require&prepared_statement_cache_size=50"
    a, b = [await start_server(servers, "--db", url, "--poll-interval", "5") for _ in range(2)]

    async def listening() -> bool:
        return all(
            [(await _json(session, f"{s.base}/stats"))["listener-connected"] for s in (a, b)]
        )

    await until(listening, 10)
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        tls = await conn.fetchval(
            "SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) "
            "WHERE application_name = 'linger-listener'"
        )
    finally:
        await conn.close()
    assert tls is True
    for _ in range(3):
        assert await _poll_wakeup(session, a, b, "tls") < 0.5


@pytest.mark.postgres
async def test_stats_and_log_hide_a_password_in_the_url_query(
    servers: list[Server], session: aiohttp.ClientSession, database_url: str, backend: str
) -> None:
    url = f"{database_url}?password=s3cret-in-query"
    server = await start_server(servers, "--db", url)
    shown = (await _json(session, f"{server.base}/stats"))["db-file"]
    assert "s3cret" not in shown
    assert "password=***" in shown
    assert "s3cret" not in server.stderr()


@pytest.mark.postgres
def test_url_option_the_driver_refuses_is_a_one_line_error(database_url: str, backend: str) -> None:
    url = f"{database_url}?sslpassword=s3cret&no_such_option=1"
    command = [sys.executable, "-m", "linger", "--port", str(free_port()), "--db", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith("linger: the database URL is not usable"), result.stderr
    assert "Traceback" not in result.stderr
    assert "s3cret" not in result.stderr


async def _waiting_get(
    session: aiohttp.ClientSession, server: Server, channel: str
) -> asyncio.Task[tuple[int, str]]:
    async def consume() -> tuple[int, str]:
        async with session.get(f"{server.base}/channels/{channel}") as response:
            await response.read()
            assert response.status == 200
            return int(response.headers["x-linger-msg-id"]), response.headers["x-linger-lease"]

    task = asyncio.create_task(consume())
    await server.until_waiting(session, 1)
    return task


@pytest.mark.postgres
async def test_release_and_redrive_wake_consumers_of_other_processes(
    pair: list[Server], session: aiohttp.ClientSession, backend: str
) -> None:
    """Through NOTIFY: the fallback poll of these processes is 5 s."""
    a, b = pair
    async with session.post(
        f"{b.base}/channels/lc?dead=lc.dead", data=b"m", headers=HEADERS
    ) as response:
        message_id = int((await response.json())["id"])
    async with session.get(f"{b.base}/channels/lc?nowait") as response:
        lease = response.headers["x-linger-lease"]
    async with session.post(f"{b.base}/messages/{message_id}/reject?lease={lease}") as response:
        assert response.status == 204
    for action in ("redrive", "release"):
        waiting = await _waiting_get(session, a, "lc")
        started = time.perf_counter()
        if action == "redrive":
            url = f"{b.base}/channels/lc.dead/redrive"
        else:
            url = f"{b.base}/messages/{message_id}/release?lease={lease}"
        async with session.post(url) as response:
            assert response.status in (200, 204)
        got_id, lease = await asyncio.wait_for(waiting, 5)
        assert got_id == message_id
        assert time.perf_counter() - started < 0.5, action


@pytest.mark.postgres
async def test_a_batch_wakes_as_many_consumers_of_another_process(
    pair: list[Server], session: aiohttp.ClientSession, backend: str
) -> None:
    """One counted notification for a batch of three: three consumers waiting in the other
    process get one message each, long before its 5 s fallback poll."""
    a, b = pair

    async def consume() -> int:
        async with session.get(f"{a.base}/channels/many") as response:
            await response.read()
            assert response.status == 200
            return int(response.headers["x-linger-msg-id"])

    waiting = [asyncio.create_task(consume()) for _ in range(3)]
    await a.until_waiting(session, 3)
    items = json.dumps([{"body": str(i)} for i in range(3)])
    headers = {"Content-Type": "application/json"}
    started = time.perf_counter()
    async with session.post(f"{b.base}/channels/many/messages", data=items, headers=headers) as r:
        assert r.status == 202
        ids = (await r.json())["ids"]
    got = await asyncio.wait_for(asyncio.gather(*waiting), 4)
    assert sorted(got) == ids
    assert time.perf_counter() - started < 1.0
