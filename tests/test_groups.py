"""Group commit under stress: no write is stranded, one failing operation fails alone,
concurrent groups never deadlock, and an exhausted pool is a prompt 503."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import pytest

from linger.http.keys import BROKER
from linger.store.db import POSTGRES_POOL_OVERFLOW, POSTGRES_POOL_SIZE
from linger.store.records import Options

from .conftest import ClientFactory, NoDeadlocks
from .helpers import (
    Client,
    add,
    connection,
    error,
    get,
    json_body_of,
    raw_request,
    stats,
    status_of,
)
from .test_topics import _DROP_TRIGGER, _FAIL_TRIGGER, _execute

QUIET = {"sweep_interval": 60.0, "poll_interval": 60.0}


async def test_write_right_after_a_write_is_not_stranded(make_client: ClientFactory) -> None:
    """A write submitted in the step in which the committer finished used to wait for some
    other write (for ever on an idle server); here nothing else writes."""
    client = await make_client(**QUIET)
    messages = client.app[BROKER].storage.messages
    for _ in range(20):
        async with asyncio.timeout(2):
            await messages.add("c", b"first", "text/plain", Options())
            await messages.add("c", b"second", "text/plain", Options())
    assert (await stats(client, "c"))["ready"] == 40


async def test_drain_of_several_batches_finishes_with_no_other_traffic(
    make_client: ClientFactory,
) -> None:
    """A drain writes batch after batch, each right after the previous one committed."""
    client = await make_client(**QUIET)
    messages = client.app[BROKER].storage.messages
    await asyncio.gather(*(messages.add("deep", b"m", "t/p", Options()) for _ in range(2500)))
    async with asyncio.timeout(10):
        response = await client.delete("/channels/deep")
    assert response.status == 204
    assert await stats(client, "deep") == {"ready": 0, "hidden": 0}


@pytest.mark.parametrize("content_type", [b"text/\xff\xfeplain", b"application/json; x=\xc3"])
@pytest.mark.parametrize("path", [b"/channels/c", b"/topics/t"])
async def test_unstorable_content_type_is_400(
    client: Client, content_type: bytes, path: bytes
) -> None:
    answer = await raw_request(
        client,
        b"POST "
        + path
        + b" HTTP/1.1\r\nHost: x\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    assert status_of(answer) == 400, answer
    assert b'{"error": "Invalid content type."}' in answer
    assert (await stats(client, "c")) == {"ready": 0, "hidden": 0}


async def test_an_empty_content_type_is_kept_as_the_default(client: Client) -> None:
    """Found by schemathesis: a message posted with an empty (or blank) Content-Type was
    delivered with an empty, malformed one. It is text/plain, as with none; a batch item's
    blank one is its encoding's default."""
    for blank in (b"", b"   "):
        answer = await raw_request(
            client,
            b"POST /channels/c HTTP/1.1\r\nHost: x\r\nContent-Type: " + blank
            + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        )  # fmt: skip
        assert status_of(answer) == 202, answer
        response = await get(client, "c")
        assert response.headers["Content-Type"].startswith("text/plain"), response.headers
    items = [{"body": "aGk=", "encoding": "base64", "content_type": " "}]
    added = await client.post("/channels/c/messages", json=items)
    assert added.status == 202
    response = await get(client, "c")
    assert response.headers["Content-Type"] == "application/octet-stream"


async def test_control_character_in_a_header_is_a_json_400(client: Client) -> None:
    answer = await raw_request(
        client,
        b"POST /channels/c HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain; x=\x01\r\n"
        b"Content-Length: 2\r\n\r\nhi",
    )
    assert status_of(answer) == 400, answer
    assert "error" in json_body_of(answer)
    assert b"\r\nServer: Linger\r\n" in answer


async def test_failing_operation_fails_alone_in_its_group(
    client: Client, database_url: str, backend: str
) -> None:
    """An unexpected database error in one add (a trigger refusing channel c13) fails that
    add alone: the adds committed with it in the same group all stand, once each."""
    await _execute(database_url, _FAIL_TRIGGER[backend])
    try:
        for _ in range(3):
            responses = await asyncio.gather(
                *(
                    client.post(f"/channels/c{i}", data=b"m", headers={"Content-Type": "t/p"})
                    for i in range(8, 18)
                )
            )
            for i, response in zip(range(8, 18), responses, strict=True):
                if i == 13:
                    await error(response, 500, "Internal database error.")
                else:
                    assert response.status == 202, await response.text()
    finally:
        await _execute(database_url, _DROP_TRIGGER[backend])
    for i in range(8, 18):
        assert (await stats(client, f"c{i}"))["ready"] == (0 if i == 13 else 3)


async def test_adds_at_a_mark_on_shared_channels_never_deadlock(
    make_client: ClientFactory, no_deadlocks: NoDeadlocks | None
) -> None:
    """16 clients adding to 4 channels in different orders (while others consume), with a
    high-level mark: every group updates several channels' counts, all in one order."""
    client = await make_client(hlm=100_000)
    statuses: list[int] = []
    added = itertools.count()

    async def producer(offset: int) -> None:
        for k in range(25):
            response = await client.post(
                f"/channels/m{(offset + k) % 4}", data=b"m", headers={"Content-Type": "t/p"}
            )
            statuses.append(response.status)
            next(added)

    async def consumer(channel: str) -> None:
        for _ in range(25):
            got = await get(client, channel)
            statuses.append(got.status)
            if got.status == 200:
                deleted = await client.delete(f"/messages/{got.headers['x-linger-msg-id']}")
                statuses.append(deleted.status)

    await asyncio.gather(
        *(producer(i) for i in range(16)), *(consumer(f"m{i % 4}") for i in range(8))
    )
    assert set(statuses) <= {200, 202, 204}, sorted(set(statuses))
    remaining = [await stats(client, f"m{i}") for i in range(4)]
    consumed = statuses.count(200)
    assert sum(s["ready"] + s["hidden"] for s in remaining) == next(added) - consumed
    if no_deadlocks is not None:
        await no_deadlocks.check()


async def test_drains_racing_consumers_never_deadlock(
    client: Client, no_deadlocks: NoDeadlocks | None
) -> None:
    """Drains of a channel while consumers delete its messages by id in other groups."""
    statuses: list[int] = []
    stop = time.monotonic() + 2.0

    async def producer() -> None:
        while time.monotonic() < stop:
            await asyncio.gather(*(add(client, "race", "m") for _ in range(8)))

    async def consumer() -> None:
        while time.monotonic() < stop:
            got = await get(client, "race")
            statuses.append(got.status)
            if got.status == 200:
                deleted = await client.delete(f"/messages/{got.headers['x-linger-msg-id']}")
                statuses.append(deleted.status)

    async def drainer() -> None:
        while time.monotonic() < stop:
            statuses.append((await client.delete("/channels/race")).status)
            await asyncio.sleep(0.01)

    await asyncio.gather(producer(), drainer(), drainer(), *(consumer() for _ in range(8)))
    # A delete may lose to a drain (404); nothing else but success.
    assert set(statuses) <= {200, 204, 404}, sorted(set(statuses))
    if no_deadlocks is not None:
        await no_deadlocks.check()


async def test_exhausted_pool_is_a_prompt_503(client: Client, backend: str) -> None:
    """Every pooled connection held elsewhere (a locked table, piled-up reads): a request
    gets 503 with Retry-After within seconds, never a 500 and never a long hang."""
    size = POSTGRES_POOL_SIZE + POSTGRES_POOL_OVERFLOW if backend == "postgresql" else 8
    async with contextlib.AsyncExitStack() as held:
        for _ in range(size):
            await held.enter_async_context(connection(client))
        started = time.monotonic()
        read = await client.get("/channels/c/stats")
        write = await client.post("/channels/c", data=b"m", headers={"Content-Type": "t/p"})
        for response in (read, write):
            await error(response, 503, "The database is busy, try again later.")
            assert response.headers["Retry-After"] == "1"
        assert time.monotonic() - started < 9
    assert (
        await client.post("/channels/c", data=b"m", headers={"Content-Type": "t/p"})
    ).status == 202
