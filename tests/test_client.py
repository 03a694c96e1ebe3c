"""The Python client against the real server: every method, typed errors, retries, hostile
answers, and the worker loop (on PostgreSQL: several workers, failures, rejects, slow
handlers, a stop mid-run)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from linger.client import (
    AsyncClient,
    BadRequest,
    ChannelDetail,
    ChannelFull,
    ChannelStats,
    ClientClosed,
    Conflict,
    ConnectionFailed,
    InvalidResponse,
    Item,
    LeaseStale,
    LingerError,
    Message,
    NotAllowed,
    NotFound,
    NotHidden,
    Reject,
    Retry,
    ServerError,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from linger.client.retry import retry_after
from linger.store import tokens

from .conftest import ClientFactory
from .helpers import Client, connection

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
QUICK = Retry(attempts=3, base=0.01, cap=0.05)


@contextlib.asynccontextmanager
async def linger(server: Client | TestServer, **options: Any) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(str(server.make_url("/")), **options) as client:
        yield client


@pytest.fixture
async def stub(aiohttp_server: Any) -> Callable[[web.Application], Awaitable[TestServer]]:
    """A tiny server of the test's own, to answer what Linger never would."""

    async def start(app: web.Application) -> TestServer:
        server: TestServer = await aiohttp_server(app)
        return server

    return start


# Every method once, on SQLite


@pytest.mark.sqlite
async def test_messages_round_trip_with_every_field(make_client: ClientFactory) -> None:
    async with linger(await make_client()) as client:
        first = await client.add(
            "jobs", "héllo", priority=-1, timeout=60, deliver=3, linger=3600, dead="jobs.dead"
        )
        second = await client.add("jobs", b'{"n": 2}', content_type="application/json")
        assert await client.channels() == ["jobs"]
        got = await client.receive("jobs", nowait=True)
        assert got is not None
        assert (got.id, got.channel, got.text(), got.body) == (
            first,
            "jobs",
            "héllo",
            "héllo".encode(),
        )
        assert got.content_type == "text/plain; charset=utf-8"
        assert (got.priority, got.timeout, got.deliver, got.delivered, got.linger) == (
            -1, 60, 3, 1, 3600,
        )  # fmt: skip
        assert got.received >= 0
        assert got.lease
        assert got.topic is None
        assert got.dead_from is None
        [other] = await client.receive_many("jobs", 5, nowait=True)
        assert (other.id, other.json(), other.content_type) == (
            second,
            {"n": 2},
            "application/json",
        )
        assert other.to_json()["body"] == '{"n": 2}'
        assert await client.receive("jobs", wait=0) is None
        assert await client.receive_many("jobs", wait=0) == []
        assert [m.id for m in await client.peek("jobs", state="hidden")] == [first, second]
        assert (await client.peek("jobs", state="hidden"))[0].lease is None
        await client.touch(got, timeout=120)
        await client.release(other)
        await client.delete(got)
        with pytest.raises(NotFound) as gone:
            await client.delete(got)
        assert (gone.value.status, gone.value.text) == (404, "Message not found.")
        [again] = await client.receive_many("jobs", nowait=True)
        assert (again.id, again.delivered) == (second, 2)
        await client.reject(again)
        assert await client.channel_stats("jobs") == ChannelStats(0, 0)


@pytest.mark.sqlite
async def test_batches_redrive_stats_and_drain(make_client: ClientFactory) -> None:
    async with linger(await make_client()) as client:
        ids = await client.add_many(
            "jobs",
            ["a", b"\x00\xff", Item("c", content_type="text/csv", priority=-5)],
            dead="jobs.dead",
            timeout=90,
        )
        received = await client.receive_many("jobs", 10, wait=1)
        assert [m.id for m in received] == [ids[2], ids[0], ids[1]]
        assert received[0].content_type == "text/csv"
        assert received[2].body == b"\x00\xff"
        assert received[2].content_type == "application/octet-stream"
        assert {m.timeout for m in received} == {90}
        touched = await client.touch_many(received, timeout=60)
        assert sorted(touched.done) == sorted(ids)
        released = await client.release_many([received[0].lease or ""], delay=0)
        assert released.done == [ids[2]]
        stale = await client.delete_many([received[0]])
        assert (stale.done, stale.stale, stale.missing) == ([], [received[0].lease], [])
        rejected = await client.reject_many(received[1:])
        assert sorted(rejected.done) == sorted(ids[:2])
        detail = await client.channel_detail("jobs.dead")
        assert detail == ChannelDetail(2, 0, 0, detail.oldest_ready_age, ["jobs"])
        dead = await client.peek("jobs.dead")
        assert {(m.dead_from, m.dead_reason) for m in dead} == {("jobs", "rejected")}
        assert await client.redrive("jobs.dead", n=1) == 1
        assert await client.redrive("jobs.dead", to="elsewhere") == 1
        assert (await client.channel_stats("elsewhere")).ready == 1
        by_id = await client.delete_ids([ids[2], 10**9])
        assert (by_id.done, by_id.missing) == ([ids[2]], [10**9])
        await client.drain("jobs")
        await client.drain("elsewhere")
        assert await client.channel_stats("jobs") == ChannelStats(0, 0)
        assert await client.channel_stats("never") == ChannelStats(0, 0)


@pytest.mark.sqlite
async def test_topics_names_and_the_server_routes(make_client: ClientFactory) -> None:
    async with linger(await make_client()) as client:
        await client.subscribe("zürich", "naïve", priority=4, dead="zürich dead")
        await client.subscribe("audit", "naïve")
        assert await client.topics() == ["naïve"]
        assert await client.topic_channels("naïve") == ["audit", "zürich"]
        assert await client.channel_topics("zürich") == ["naïve"]
        copies = await client.publish("naïve", "one")
        assert set(copies) == {"audit", "zürich"}
        many = await client.publish_many("naïve", ["two", b"\x01"])
        assert [set(m) for m in many] == [{"audit", "zürich"}] * 2
        got = await client.receive("zürich", nowait=True)
        assert got is not None
        assert (got.channel, got.topic, got.priority, got.text()) == ("zürich", "naïve", 4, "one")
        await client.reject(got)
        dead = await client.receive("zürich dead", nowait=True)
        assert dead is not None
        assert (dead.dead_from, dead.dead_reason, dead.topic) == ("zürich", "rejected", "naïve")
        copies_left = await client.receive_many("zürich", nowait=True)
        assert [m.body for m in copies_left] == [b"two", b"\x01"]
        await client.reject_many(copies_left)
        dead_batch = await client.receive_many("zürich dead", nowait=True)
        assert {(m.dead_from, m.topic) for m in dead_batch} == {("zürich", "naïve")}
        await client.unsubscribe("audit", "naïve")
        await client.unsubscribe("audit", "naïve")
        assert await client.topic_channels("naïve") == ["zürich"]
        assert (await client.info())["Linger"] == "Welcome"
        stats = await client.stats()
        assert stats["current-subscriptions"] == 1
        assert "publish" in stats
        assert await client.health() is True
        assert await client.ready() is True
        assert "linger_messages" in await client.metrics()


# Typed errors


@pytest.mark.sqlite
async def test_each_refusal_is_its_typed_error_with_the_servers_text(
    make_client: ClientFactory,
) -> None:
    async with linger(await make_client(max_size=10, hlm=2)) as client:
        cases: list[tuple[Awaitable[object], type[LingerError], int, str]] = [
            (client.add("c", "x" * 11), TooLarge, 413, "Message is larger than 10 bytes."),
            (client.add("c", ""), BadRequest, 400, "Message is empty."),
            (client.add("c", "x", timeout=0), BadRequest, 400, "Invalid message visibility timeout."),  # noqa: E501
            (client.delete(12345), NotFound, 404, "Message not found."),
            (client.receive_many("c", 0), BadRequest, 400, "Invalid batch size."),
            (client.peek("c", state="gone"), BadRequest, 400, "Invalid state."),
        ]  # fmt: skip
        for call, kind, status, text in cases:
            with pytest.raises(kind) as raised:
                await call
            assert (type(raised.value), raised.value.status, raised.value.text) == (
                kind, status, text,
            )  # fmt: skip
            assert str(raised.value) == f"{status} {text}"
        message_id = await client.add("c", "one")
        await client.add("c", "two")
        with pytest.raises(ChannelFull) as full:
            await client.add("c", "three")
        assert full.value.status == 507
        assert "high-level mark" in full.value.text
        got = await client.receive("c", nowait=True)
        assert got is not None
        assert got.id == message_id
        with pytest.raises(BadRequest, match=r"Invalid lease\."):
            await client.delete(got, lease="not-a-lease")
        await client.release(got)
        with pytest.raises(LeaseStale) as stale:
            await client.delete(got)
        assert isinstance(stale.value, Conflict)
        assert stale.value.status == 409
        with pytest.raises(NotHidden, match=r"Message is not hidden\."):
            await client.touch(got.id)


@pytest.mark.sqlite
async def test_tokens_are_sent_and_their_refusals_typed(make_client: ClientFactory) -> None:
    server = await make_client(auth=True)
    async with connection(server) as conn:
        _token, secret = await tokens.create(
            conn, "t", ["consume:jobs"], None, int(time.time() * 1000)
        )
    async with linger(server, token=secret) as client:
        assert await client.receive("jobs", nowait=True) is None
        with pytest.raises(NotAllowed) as refused:
            await client.add("jobs", "x")
        assert (refused.value.status, refused.value.text) == (403, "Not allowed.")
    async with linger(server, token="lgr_wrong") as client:
        with pytest.raises(Unauthenticated) as unknown:
            await client.channels()
        assert (unknown.value.status, unknown.value.text) == (401, "Authentication required.")
        consumer = client.consumer("jobs", _never, signals=False)
        with pytest.raises(Unauthenticated):
            await asyncio.wait_for(consumer.run(), 5)


async def _never(message: Message) -> None:
    raise AssertionError("no message can come")


# Retries


@pytest.mark.sqlite
async def test_a_503_then_success_is_retried_for_reads_not_for_adds(stub: ServerFactory) -> None:
    hits: defaultdict[str, int] = defaultdict(int)

    async def flaky(request: web.Request) -> web.Response:
        hits[request.method] += 1
        if hits[request.method] <= 2:
            return web.json_response(
                {"error": "Database unavailable, try again later."},
                status=503,
                headers={"Retry-After": "0"},
            )
        status = 202 if request.method == "POST" else 200
        return web.json_response({"id": 7, "ready": 1, "hidden": 0}, status=status)

    app = web.Application()
    app.router.add_route("*", "/channels/{name}{tail:.*}", flaky)
    async with linger(await stub(app), retry=QUICK) as client:
        assert await client.channel_stats("c") == ChannelStats(1, 0)
        assert hits["GET"] == 3
        with pytest.raises(Unavailable) as refused:
            await client.add("c", "x")
        assert (refused.value.status, refused.value.retry_after) == (503, 0.0)
        assert refused.value.text == "Database unavailable, try again later."
        assert isinstance(refused.value, ServerError)
        assert hits["POST"] == 1
        assert await client.add("c", "x", retry=True) == 7
        assert hits["POST"] == 3


@pytest.mark.sqlite
async def test_too_many_waiters_is_retried_after_the_servers_retry_after(
    make_client: ClientFactory,
) -> None:
    async with linger(await make_client(max_waiters=1, poll_max=5.0)) as client:
        waiting = asyncio.create_task(client.receive("c", wait=1))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        assert await client.receive("c", wait=1) is None  # 503, Retry-After: 1, then a wait
        assert 1.5 < time.monotonic() - started < 4
        assert await waiting is None
    async with linger(await make_client(max_waiters=1), retry=Retry(attempts=1)) as client:
        waiting = asyncio.create_task(client.receive("c", wait=1))
        await asyncio.sleep(0.2)
        with pytest.raises(Unavailable) as refused:
            await client.receive("c", wait=1)
        assert refused.value.retry_after == 1.0
        waiting.cancel()


@pytest.mark.sqlite
async def test_connection_errors_are_retried_then_raised_as_one_error() -> None:
    started = time.monotonic()
    async with AsyncClient("http://127.0.0.1:1", retry=QUICK) as client:
        with pytest.raises(ConnectionFailed) as failed:
            await client.stats()
    assert time.monotonic() - started < 2
    assert failed.value.status == 0
    assert "Cannot connect" in str(failed.value)
    assert "\n" not in str(failed.value)
    for bad in ("", "127.0.0.1:8989", "ftp://host", "http://", "http://h/?q=1"):
        with pytest.raises(ValueError, match="Invalid Linger URL"):
            AsyncClient(bad)


def test_retry_after_reads_seconds_and_dates_and_backoff_is_capped() -> None:
    assert retry_after("3") == 3.0
    assert retry_after(None) is None
    assert retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    policy = Retry(attempts=4, base=1.0, cap=2.0, longest=10.0)
    assert all(0 <= (policy.delay(k, None) or 0) <= min(2.0, 2**k) for k in range(3))
    assert policy.delay(3, None) is None
    assert policy.delay(0, 99999.0) is None
    assert policy.delay(0, 4.0) == 4.0


# Hostile answers


@pytest.mark.sqlite
async def test_garbage_answers_fail_with_typed_errors_and_never_hang(stub: ServerFactory) -> None:
    async def not_json(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    async def bare(request: web.Request) -> web.Response:
        return web.Response(body=b"a message without its headers")

    async def wrong_shape(request: web.Request) -> web.Response:
        return web.json_response({"messages": [{"id": "x", "body": 3}]})

    async def busy_for_a_day(request: web.Request) -> web.Response:
        return web.Response(status=503, reason="Busy", headers={"Retry-After": "86400"})

    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(64):
            await response.write(b"x" * 65536)
        return response

    async def teapot(request: web.Request) -> web.Response:
        return web.Response(status=418, text="short and stout\nhere is my handle")

    app = web.Application()
    app.router.add_get("/stats", not_json)
    app.router.add_get("/channels/bare", bare)
    app.router.add_get("/channels/shape/messages", wrong_shape)
    app.router.add_get("/channels/busy/stats", busy_for_a_day)
    app.router.add_get("/channels/silent/stats", silent)
    app.router.add_get("/metrics", huge)
    app.router.add_get("/topics", teapot)
    server = await stub(app)
    started = time.monotonic()
    async with linger(server, timeout=0.5, retry=QUICK, max_response=1 << 20) as client:
        with pytest.raises(InvalidResponse, match="not a JSON object"):
            await client.stats()
        with pytest.raises(InvalidResponse, match="x-linger-msg-id"):
            await client.receive("bare", nowait=True)
        with pytest.raises(InvalidResponse):
            await client.receive_many("shape", nowait=True)
        with pytest.raises(Unavailable) as busy:
            await client.channel_stats("busy")
        assert (busy.value.retry_after, busy.value.text) == (86400.0, "Busy")
        with pytest.raises(ConnectionFailed, match="No answer"):
            await client.channel_stats("silent")
        with pytest.raises(InvalidResponse, match="larger than"):
            await client.metrics()
        with pytest.raises(LingerError) as teapot_error:
            await client.topics()
        assert teapot_error.value.status == 418
        assert "\n" not in str(teapot_error.value)
    assert time.monotonic() - started < 5


@pytest.mark.sqlite
async def test_a_server_that_speaks_no_http_is_a_typed_error() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"HELLO THERE\r\n\x00\x01\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with AsyncClient(f"http://127.0.0.1:{port}", timeout=1, retry=QUICK) as client:
            with pytest.raises((InvalidResponse, ConnectionFailed)):
                await client.stats()
    finally:
        server.close()
        await server.wait_closed()


# The worker loop, on PostgreSQL


async def _until_empty(client: AsyncClient, channel: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while await client.channel_stats(channel) != ChannelStats(0, 0):
        assert time.monotonic() < deadline, await client.channel_stats(channel)
        await asyncio.sleep(0.05)


@pytest.mark.postgres
async def test_four_workers_process_two_thousand_messages_exactly_once(
    make_client: ClientFactory,
) -> None:
    async with linger(await make_client()) as client:
        ids = []
        for start in (0, 1000):
            bodies = [f"order {n}" for n in range(start, start + 1000)]
            ids += await client.add_many("orders", bodies, timeout=2, dead="orders.dead")
        flaky = set(ids[::7])
        rejects = set(ids[3::13]) - flaky
        slow = set(ids[5::400]) - flaky - rejects
        deliveries: defaultdict[int, list[int]] = defaultdict(list)

        async def handle(message: Message) -> None:
            deliveries[message.id].append(message.delivered)
            if message.id in flaky and message.delivered == 1:
                raise RuntimeError("payment service down")
            if message.id in rejects:
                raise Reject("not an order")
            if message.id in slow:
                await asyncio.sleep(3.2)  # past its 2 s visibility timeout

        consumer = client.consumer(
            "orders", handle, concurrency=4, batch=10, wait=1, retry_delay=0, signals=False
        )
        running = asyncio.create_task(consumer.run())
        await _until_empty(client, "orders")
        consumer.stop()
        counters = await asyncio.wait_for(running, 10)
        assert (counters.processed, counters.failed) == (2000 - len(rejects), len(flaky))
        assert (counters.rejected, counters.lost) == (len(rejects), 0)
        assert {i: deliveries[i] for i in flaky} == {i: [1, 2] for i in flaky}
        assert all(deliveries[i] == [1] for i in set(ids) - flaky), "delivered twice"
        dead = await client.peek("orders.dead", 1000)
        assert {m.id for m in dead} == rejects
        assert {m.dead_reason for m in dead} == {"rejected"}


@pytest.mark.postgres
async def test_stop_mid_run_leaves_hidden_only_what_it_processes(
    make_client: ClientFactory,
) -> None:
    async with linger(await make_client()) as client:
        await client.add_many("jobs", [f"job {n}" for n in range(300)])
        handled: list[int] = []

        async def handle(message: Message) -> None:
            handled.append(message.id)
            if len(handled) == 40:
                consumer.stop()
            await asyncio.sleep(0.02)

        consumer = client.consumer("jobs", handle, concurrency=4, batch=25, signals=False)
        counters = await asyncio.wait_for(consumer.run(), 10)
        assert counters.processed == len(handled) >= 40
        assert len(handled) == len(set(handled))
        assert await client.channel_stats("jobs") == ChannelStats(300 - len(handled), 0)
        remaining = await client.receive_many("jobs", 300, nowait=True)
        assert not {m.id for m in remaining} & set(handled)


async def test_acknowledgements_outlast_a_server_that_is_away_for_a_while(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attacking the loop: a delete or release that failed while the server
    restarted (longer than the client's own retries) lost the acknowledgement, and the
    handled message came back. Now it is tried again, its lease still held, until done."""
    async with linger(await make_client(), retry=QUICK) as client:
        await client.add_many("jobs", [f"job {n}" for n in range(20)])
        away = {"delete_many": 2, "release": 2}  # failures in a row, each past its retries

        def flaky(name: str) -> Callable[..., Awaitable[Any]]:
            real = getattr(client, name)

            async def call(*args: Any, **kwargs: Any) -> Any:
                if away[name] > 0:
                    away[name] -= 1
                    raise ConnectionFailed("Cannot connect to the server (restarting)")
                return await real(*args, **kwargs)

            return call

        monkeypatch.setattr(client, "delete_many", flaky("delete_many"))
        monkeypatch.setattr(client, "release", flaky("release"))
        handled: set[int] = set()
        failed_once: set[int] = set()

        async def handle(message: Message) -> None:
            if message.id % 5 == 0 and message.id not in failed_once:
                failed_once.add(message.id)
                raise RuntimeError("try again")
            handled.add(message.id)
            if len(handled) == 20:
                consumer.stop()

        consumer = client.consumer(
            "jobs", handle, concurrency=4, batch=4, retry_delay=0, wait=1, signals=False
        )
        counters = await asyncio.wait_for(consumer.run(), 20)
        assert counters.lost == 0, counters
        assert counters.processed == 20
        assert await client.channel_stats("jobs") == ChannelStats(0, 0)


@pytest.mark.postgres
async def test_a_handler_past_its_timeout_is_released_and_a_lost_lease_never_acknowledged(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = await make_client()
    async with linger(server) as client, linger(server) as other:
        hung = await client.add("jobs", "hangs once")
        taken = await client.add("jobs", "taken away")
        deliveries: defaultdict[int, int] = defaultdict(int)

        async def handle(message: Message) -> None:
            deliveries[message.id] += 1
            if message.id == hung and message.delivered == 1:
                await asyncio.Event().wait()  # forever
            if message.id == taken:  # another consumer gives it back, for later
                await other.release(message, delay=60)

        consumer = client.consumer(
            "jobs", handle, concurrency=2, handler_timeout=0.5, retry_delay=0, wait=1, signals=False
        )
        running = asyncio.create_task(consumer.run())
        deadline = time.monotonic() + 10
        while consumer.counters.processed < 1 or consumer.counters.lost < 1:
            assert time.monotonic() < deadline, consumer.counters
            await asyncio.sleep(0.05)
        consumer.stop()
        counters = await running
        assert (counters.processed, counters.failed, counters.lost) == (1, 1, 1)
        assert deliveries == {hung: 2, taken: 1}
        assert await client.channel_stats("jobs") == ChannelStats(0, 1)  # delayed, not deleted
        await other.delete(taken)
        assert any(
            r.levelno == logging.WARNING and "lease lost" in r.getMessage() for r in caplog.records
        )
        assert any("ran past 0.5 s" in r.getMessage() for r in caplog.records)


@pytest.mark.sqlite
def test_message_json_and_item_encodings() -> None:
    item = Item(b"\xff", priority=1).to_json()
    assert item == {"body": base64.b64encode(b"\xff").decode(), "encoding": "base64", "priority": 1}
    message = Message(1, None, "c", b"\xff", "x", 0, 30, 0, 0, 0, 0)
    assert message.to_json()["encoding"] == "base64"
    assert "lease" not in message.to_json()


# Found by attacking the client: each test names what went wrong


@pytest.mark.sqlite
async def test_long_polls_never_hold_up_lease_extensions(make_client: ClientFactory) -> None:
    """Long-polls have their own connections: with every pooled one long-polling, the
    lease of a slow handler is still extended and nobody else gets the message."""
    async with linger(await make_client(), connections=2) as client:
        await client.add("slow", "x", timeout=1)
        starts: list[int] = []

        async def handle(message: Message) -> None:
            starts.append(message.delivered)
            await asyncio.sleep(1.3)  # past its 1 s visibility timeout

        consumer = client.consumer("slow", handle, concurrency=6, wait=1, signals=False)
        running = asyncio.create_task(consumer.run())
        deadline = time.monotonic() + 6
        while consumer.counters.processed < 1:
            assert time.monotonic() < deadline, consumer.counters
            await asyncio.sleep(0.05)
        consumer.stop()
        counters = await running
        assert starts == [1]
        assert (counters.processed, counters.failed, counters.lost) == (1, 0, 0)


@pytest.mark.sqlite
async def test_a_handlers_own_cancelled_error_is_a_failure_not_a_dead_worker(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with linger(await make_client()) as client:
        first, second = await client.add_many("cancels", ["first", "second"])
        seen: list[tuple[int, int]] = []

        async def handle(message: Message) -> None:
            seen.append((message.id, message.delivered))
            if message.id == first and message.delivered == 1:
                inner = asyncio.ensure_future(asyncio.sleep(10))
                asyncio.get_running_loop().call_later(0.05, inner.cancel)  # a library's own
                await inner
            if len(seen) == 3:
                consumer.stop()

        consumer = client.consumer(
            "cancels", handle, concurrency=1, retry_delay=0, wait=1, signals=False
        )
        counters = await asyncio.wait_for(consumer.run(), 5)
        assert sorted(seen) == [(first, 1), (first, 2), (second, 1)]
        assert (counters.processed, counters.failed, counters.lost) == (2, 1, 0)
        assert any("raised CancelledError" in r.getMessage() for r in caplog.records)
        assert await client.channel_stats("cancels") == ChannelStats(0, 0)


@pytest.mark.sqlite
async def test_a_server_max_batch_below_the_loops_concurrency(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Receives, extensions and deletes shrink to what the server takes (it has
    --max-batch 2 here; the loop receives 4 at a time and holds 4)."""
    async with linger(await make_client(max_batch=2)) as client:
        await client.add_many("small", ["a", "b"], timeout=1)
        await client.add_many("small", ["c", "d"], timeout=1)
        starts: defaultdict[int, int] = defaultdict(int)

        async def handle(message: Message) -> None:
            starts[message.id] += 1
            await asyncio.sleep(1.2)  # past the timeout: the leases must be extended

        consumer = client.consumer("small", handle, concurrency=4, batch=4, wait=1, signals=False)
        running = asyncio.create_task(consumer.run())
        deadline = time.monotonic() + 8
        while consumer.counters.processed < 4:
            assert time.monotonic() < deadline, consumer.counters
            await asyncio.sleep(0.05)
        consumer.stop()
        counters = await running
        assert list(starts.values()) == [1, 1, 1, 1]
        assert (counters.processed, counters.failed, counters.lost) == (4, 0, 0)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


class SlowLink:
    """A TCP proxy to ``target`` whose answers arrive ``delay`` seconds late."""

    def __init__(self, target: str, delay: float) -> None:
        self.host, port = target.split("//")[1].rstrip("/").rsplit(":", 1)
        self.port = int(port)
        self.delay = delay
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream = await asyncio.open_connection(self.host, self.port)

        async def pipe(source: asyncio.StreamReader, to: asyncio.StreamWriter, late: float) -> None:
            with contextlib.suppress(Exception):
                while data := await source.read(65536):
                    await asyncio.sleep(late)
                    to.write(data)
                    await to.drain()
            to.close()

        await asyncio.gather(pipe(reader, upstream, 0), pipe(upstream_reader, writer, self.delay))


@pytest.mark.sqlite
async def test_a_stop_waits_for_the_receive_on_its_way_back_and_releases_it(
    make_client: ClientFactory,
) -> None:
    server = await make_client()
    async with (
        SlowLink(str(server.make_url("/")), 0.5) as slow,
        AsyncClient(slow) as far,
        linger(server) as client,
    ):
        handled: list[int] = []

        async def handle(message: Message) -> None:
            handled.append(message.id)

        consumer = far.consumer("cut", handle, concurrency=2, batch=5, wait=2, signals=False)
        running = asyncio.create_task(consumer.run())
        await asyncio.sleep(0.3)  # long-polling the empty channel
        await client.add_many("cut", ["a", "b", "c"], timeout=60)
        await asyncio.sleep(0.1)  # leased by the server, the answer still on its way
        consumer.stop()
        await asyncio.wait_for(running, 5)
        assert handled == []
        assert await client.channel_stats("cut") == ChannelStats(3, 0)


@pytest.mark.sqlite
async def test_the_loop_receives_no_more_than_it_can_start(make_client: ClientFactory) -> None:
    """batch=10 with one handler: what is not started was never received, so a stop uses
    up none of their deliveries."""
    async with linger(await make_client()) as client:
        await client.add_many("few", [f"m{n}" for n in range(5)], deliver=2, dead="few.dead")
        stopping: list[Any] = []

        async def handle(message: Message) -> None:
            stopping[-1].stop()
            await asyncio.sleep(0.05)

        for _ in range(2):  # two deploys, say
            stopping.append(client.consumer("few", handle, concurrency=1, batch=10, signals=False))
            counters = await asyncio.wait_for(stopping[-1].run(), 5)
            assert (counters.processed, counters.failed, counters.lost) == (1, 0, 0)
        left = await client.peek("few", 10)
        assert [m.delivered for m in left] == [0, 0, 0]
        assert await client.peek("few.dead") == []


@pytest.mark.sqlite
async def test_a_peeked_message_cannot_be_acted_on_and_a_bare_id_still_can(
    make_client: ClientFactory,
) -> None:
    async with linger(await make_client()) as client:
        await client.add("peeked", "p")
        [peeked] = await client.peek("peeked")
        for act in (client.delete, client.touch, client.release, client.reject):
            with pytest.raises(ValueError, match="has no lease"):
                await act(peeked)
        with pytest.raises(ValueError, match="has no lease"):
            await client.delete_many([peeked])
        assert await client.channel_stats("peeked") == ChannelStats(1, 0)
        await client.delete(peeked.id)
        assert await client.channel_stats("peeked") == ChannelStats(0, 0)


@pytest.mark.sqlite
def test_header_names_decode_only_what_the_server_encodes_and_retry_after_0_backs_off() -> None:
    from linger.client.messages import header_name

    assert header_name("caf%C3%A9") == "café"
    assert header_name("100%41") == "100%41"  # sent as it is: a name's own "%41"
    assert header_name("caf%C3%A9%41") == "café%41"
    assert header_name("bad%FF") == "bad%FF"
    assert Retry(base=1.0, cap=1.0).delay(3, 0.0) is not None
    delays = {Retry(base=1.0, cap=1.0).delay(0, 0.0) for _ in range(20)}
    assert all(d is not None and 0 <= d <= 1.0 for d in delays)
    assert len(delays) > 1


@pytest.mark.sqlite
async def test_an_async_client_refuses_another_event_loop(make_client: ClientFactory) -> None:
    server = await make_client()
    async with linger(server) as client:
        assert await client.health()

        async def elsewhere() -> bool:
            return await client.health()

        with pytest.raises(ClientClosed, match="another event loop"):
            await asyncio.to_thread(asyncio.run, elsewhere())
    with pytest.raises(ClientClosed, match="closed"):
        await client.health()
