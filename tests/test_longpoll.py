"""Long-polling consumers: wake-ups, deadlines, fairness, disconnects and shutdown."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from linger.store.sweep import REQUEUE_AFTER_MS

from .conftest import ClientFactory, Clock
from .helpers import Client, add, get, server_stats, stats


async def _waiters(client: Client, count: int) -> None:
    """Wait until ``count`` consumers are long-polling."""
    deadline = asyncio.get_running_loop().time() + 3
    while (await server_stats(client))["current-waiters"] < count:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)


async def test_waiting_consumer_gets_message_added_later(make_client: ClientFactory) -> None:
    client = await make_client(poll_interval=5.0)  # the wake-up, not the poller, delivers
    waiting = asyncio.create_task(get(client, "c", wait=True))
    await _waiters(client, 1)
    started = asyncio.get_running_loop().time()
    message_id = await add(client, "c", "hello")
    response = await asyncio.wait_for(waiting, 1)
    assert asyncio.get_running_loop().time() - started < 0.5
    assert response.status == 200
    assert response.headers["x-linger-msg-id"] == str(message_id)


async def test_long_poll_ends_with_204_after_poll_max(make_client: ClientFactory) -> None:
    client = await make_client(poll_max=0.3)
    started = asyncio.get_running_loop().time()
    response = await get(client, "c", wait=True)
    elapsed = asyncio.get_running_loop().time() - started
    assert response.status == 204
    assert response.headers["x-linger-channel"] == "c"
    assert 0.25 < elapsed < 2


async def test_nowait_values(make_client: ClientFactory) -> None:
    client = await make_client(poll_max=0.3)
    for value in ("", "1", "true", "yes", "anything"):
        started = asyncio.get_running_loop().time()
        response = await client.get("/channels/c", params={"nowait": value})
        assert response.status == 204
        assert asyncio.get_running_loop().time() - started < 0.25, value
    for value in ("0", "false", "no", "False"):
        started = asyncio.get_running_loop().time()
        response = await client.get("/channels/c", params={"nowait": value})
        assert response.status == 204
        assert asyncio.get_running_loop().time() - started >= 0.25, value


async def test_waiters_are_served_oldest_first(make_client: ClientFactory) -> None:
    client = await make_client(poll_interval=5.0)
    first = asyncio.create_task(get(client, "c", wait=True))
    await _waiters(client, 1)
    second = asyncio.create_task(get(client, "c", wait=True))
    await _waiters(client, 2)
    one = await add(client, "c", "one")
    assert (await asyncio.wait_for(first, 1)).headers["x-linger-msg-id"] == str(one)
    assert not second.done()
    two = await add(client, "c", "two")
    assert (await asyncio.wait_for(second, 1)).headers["x-linger-msg-id"] == str(two)


async def test_each_add_wakes_one_waiter(make_client: ClientFactory) -> None:
    client = await make_client(poll_interval=5.0)
    tasks = [asyncio.create_task(get(client, "c", wait=True)) for _ in range(5)]
    await _waiters(client, 5)
    ids = {await add(client, "c", f"m{i}") for i in range(5)}
    responses = await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert {int(r.headers["x-linger-msg-id"]) for r in responses} == ids


async def _timed_out_message_reaches_waiter(client: Client, within: float) -> None:
    """A message delivered with a 1 s timeout reaches a consumer long-polling for it
    within ``within`` seconds, as its second delivery."""
    message_id = await add(client, "c", "m", timeout=1)
    assert (await get(client, "c")).status == 200
    started = asyncio.get_running_loop().time()
    response = await asyncio.wait_for(get(client, "c", wait=True), within + 2)
    elapsed = asyncio.get_running_loop().time() - started
    assert response.headers["x-linger-msg-id"] == str(message_id)
    assert response.headers["x-linger-delivered"] == "2"
    assert elapsed < within


async def test_expired_visibility_timeout_reaches_waiter_within_a_second(
    make_client: ClientFactory,
) -> None:
    # Visible after 1 s, delivered at once (the poller wakes right then).
    await _timed_out_message_reaches_waiter(await make_client(poll_interval=1.0), 1.5)


async def test_requeue_by_the_sweep_wakes_the_waiter(make_client: ClientFactory) -> None:
    # The poller is far off; the sweep that puts the due message back in the queue (1 s
    # after it became due) wakes its waiter: on PostgreSQL, the requeue locks the row
    # for a moment, and a claim racing it skips the message, so the wake-up must follow
    # that statement.
    client = await make_client(poll_interval=30.0, sweep_interval=0.05, poll_max=10.0)
    await _timed_out_message_reaches_waiter(client, 1 + REQUEUE_AFTER_MS / 1000 + 0.5)


async def test_long_polled_channel_is_listed_for_180_seconds(
    make_client: ClientFactory, clock: Clock
) -> None:
    client = await make_client(poll_max=0.1)
    assert (await get(client, "idle", wait=True)).status == 204
    assert (await (await client.get("/channels")).json())["channels"] == ["idle"]
    clock.advance(179)
    assert (await (await client.get("/channels")).json())["channels"] == ["idle"]
    clock.advance(2)
    assert (await (await client.get("/channels")).json())["channels"] == []


async def test_channels_are_listed_sorted(client: Client) -> None:
    for channel in ("b", "a", "C", "a%20b", "%C3%A9"):
        await add(client, channel, "m")
    names = (await (await client.get("/channels")).json())["channels"]
    assert names == ["C", "a", "a b", "b", "é"]


def _raw_request(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


async def test_disconnected_waiter_loses_no_message(make_client: ClientFactory) -> None:
    client = await make_client(poll_interval=0.05)
    assert client.port is not None
    sock = _raw_request(client.port, "/channels/c")
    await _waiters(client, 1)
    sock.close()
    await asyncio.sleep(0.1)  # the poller notices the closed connection
    message_id = await add(client, "c", "kept")
    response = await get(client, "c")
    assert response.status == 200
    assert response.headers["x-linger-msg-id"] == str(message_id)
    assert response.headers["x-linger-delivered"] == "1"


async def test_disconnected_waiter_passes_its_wake_up_on(make_client: ClientFactory) -> None:
    client = await make_client(poll_interval=5.0)
    assert client.port is not None
    sock = _raw_request(client.port, "/channels/c")
    await _waiters(client, 1)
    behind = asyncio.create_task(get(client, "c", wait=True))
    await _waiters(client, 2)
    sock.close()
    await asyncio.sleep(0.05)
    message_id = await add(client, "c", "m")
    response = await asyncio.wait_for(behind, 1)
    assert response.headers["x-linger-msg-id"] == str(message_id)


async def test_shutdown_answers_waiters_with_204(make_client: ClientFactory) -> None:
    client = await make_client(poll_max=30.0)
    waiting: list[asyncio.Task[Any]] = [
        asyncio.create_task(get(client, f"c{i}", wait=True)) for i in range(3)
    ]
    await _waiters(client, 3)
    started = asyncio.get_running_loop().time()
    await client.app.shutdown()
    responses = await asyncio.wait_for(asyncio.gather(*waiting), 2)
    assert [r.status for r in responses] == [204, 204, 204]
    assert asyncio.get_running_loop().time() - started < 1


async def test_waiting_holds_no_database_connection(make_client: ClientFactory) -> None:
    # The in-memory database has one connection: waiters must not keep it.
    client = await make_client(db="sqlite+aiosqlite://", poll_max=5.0)
    tasks = [asyncio.create_task(get(client, f"w{i}", wait=True)) for i in range(20)]
    await _waiters(client, 20)
    message_id = await add(client, "other", "m")
    assert (await asyncio.wait_for(stats(client, "other"), 1))["ready"] == 1
    for i in range(20):
        await add(client, f"w{i}", "m")
    responses = await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert all(r.status == 200 for r in responses)
    assert message_id > 0
