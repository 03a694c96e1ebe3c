"""The counters kept beside the rows: channel counts (the high-level mark reads them), shared
published bodies, listing marks; drains and sweeps in batches that let others write."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from linger import errors
from linger.http.keys import BROKER
from linger.queue.notifier import Notifier
from linger.store.db import bodies, channels, messages
from linger.store.records import Options
from linger.store.sql import BATCH

from .conftest import ClientFactory, Clock, NoDeadlocks
from .helpers import Client, add, connection, error, get, raw, server_stats, stats
from .processes import until
from .test_topics import publish, subscribe


async def _rows(client: Client, stmt: Any) -> list[Any]:
    async with connection(client) as conn:
        return list((await conn.execute(stmt)).all())


async def _counted(client: Client) -> dict[str, int]:
    """Each channel's kept count, for channels that have one above zero."""
    rows = await _rows(client, sa.select(channels.c.name, channels.c.messages))
    return {name: count for name, count in rows if count}


async def _actual(client: Client) -> dict[str, int]:
    m = messages
    rows = await _rows(client, sa.select(m.c.channel, sa.func.count()).group_by(m.c.channel))
    return dict(rows)


async def test_mark_is_read_from_the_kept_count(make_client: ClientFactory) -> None:
    """The mark is one row read, not a count of the channel: with the kept count at the
    mark, an add is refused although fewer messages are there."""
    client = await make_client(hlm=5)
    for _ in range(3):
        await add(client, "c")
    async with connection(client) as conn:
        await conn.execute(sa.update(channels).where(channels.c.name == "c").values(messages=5))
    response = await client.post("/channels/c", data=b"m", headers={"Content-Type": "t/p"})
    await error(response, 507, "Channel c is at the high-level mark with 5 messages")
    async with connection(client) as conn:
        await conn.execute(sa.update(channels).where(channels.c.name == "c").values(messages=3))
    await add(client, "c")
    assert (await stats(client, "c"))["ready"] == 4


async def test_mark_does_not_count_dead_rows_waiting_for_the_sweep(
    make_client: ClientFactory, clock: Clock
) -> None:
    client = await make_client(hlm=2, sweep_interval=60.0)
    await add(client, "c", linger=1)
    await add(client, "c", linger=1)
    await error(await client.post("/channels/c", data=b"m", headers={"Content-Type": "t/p"}), 507)
    clock.advance(2)  # both past their retention, not swept yet
    await add(client, "c")
    await add(client, "c")
    assert (await stats(client, "c"))["ready"] == 2


async def test_concurrent_adds_stop_exactly_at_the_mark(make_client: ClientFactory) -> None:
    client = await make_client(hlm=30)
    responses = await asyncio.gather(
        *(client.post("/channels/c", data=b"m", headers={"Content-Type": "t/p"}) for _ in range(60))
    )
    assert sorted(r.status for r in responses) == [202] * 30 + [507] * 30
    assert (await stats(client, "c"))["ready"] == 30
    assert await _counted(client) == {"c": 30}


async def test_concurrent_single_and_batch_adds_stop_exactly_at_the_mark(
    make_client: ClientFactory,
) -> None:
    """Groups mixing batches and single adds near the mark: the channel ends exactly at it
    (the singles alone could fill it), and each refusal names the count it met."""
    client = await make_client(hlm=20)
    await add(client, "c")
    singles = [
        client.post("/channels/c", data=b"m", headers={"Content-Type": "t/p"}) for _ in range(20)
    ]
    batches = [
        client.post(
            "/channels/c/messages",
            data=json.dumps([{"body": "b"}] * 2),
            headers={"Content-Type": "application/json"},
        )
        for _ in range(10)
    ]
    responses = await asyncio.gather(*singles, *batches)
    stored = 1
    for response in responses[:20]:
        if response.status == 202:
            stored += 1
        else:
            await error(response, 507, "Channel c is at the high-level mark with 20 messages")
    for response in responses[20:]:
        if response.status == 202:
            stored += 2
        else:
            assert response.status == 507, await response.text()
            text = (await response.json())["error"]
            assert text in [
                f"Channel c cannot take 2 more messages: it is at the high-level mark with {n} "
                "messages"
                for n in (19, 20)
            ]
    assert stored == 20
    assert (await stats(client, "c"))["ready"] == 20
    assert await _counted(client) == {"c": 20}


async def test_counts_stay_exact_through_every_kind_of_change(
    make_client: ClientFactory, clock: Clock
) -> None:
    """A random mix of adds, publishes, deliveries, deletes, drains, expiries, exhausted
    deliveries and refusals at the mark: each kept count equals the channel's rows."""
    client = await make_client(hlm=12, sweep_interval=60.0)
    sweep = client.app[BROKER].sweep
    rng = random.Random(7)
    names = ["a", "b", "c"]
    for name in names:
        await subscribe(client, name, "t")
    for _ in range(400):
        channel = rng.choice(names)
        action = rng.randrange(9)
        if action < 3:
            await client.post(
                f"/channels/{channel}",
                data=b"m",
                params={"linger": str(rng.choice([0, 0, 1])), "deliver": str(rng.choice([0, 1]))},
                headers={"Content-Type": "t/p"},
            )
        elif action == 3:
            await client.post("/topics/t", data=b"x" * rng.choice([10, 5000]))
        elif action in (4, 5):
            got = await get(client, channel)
            if got.status == 200 and rng.random() < 0.7:
                await client.delete(f"/messages/{got.headers['x-linger-msg-id']}")
        elif action == 6:
            await client.delete(f"/channels/{channel}")
        elif action == 7:
            clock.advance(rng.choice([0.5, 31]))
        else:
            await sweep()
        if rng.random() < 0.1:
            assert await _counted(client) == await _actual(client)
    await sweep()
    assert await _counted(client) == await _actual(client)


async def test_long_published_body_is_stored_once(client: Client) -> None:
    channels_ = [f"s{i:03}" for i in range(200)]
    for name in channels_:
        await subscribe(client, name, "big")
    body = bytes(range(256)) * 1024  # 256 KiB
    ids = await publish(client, "big", body)
    assert sorted(ids) == channels_
    assert await _rows(client, sa.select(bodies.c.refs)) == [(200,)]
    assert await _rows(client, sa.select(sa.func.sum(sa.func.length(messages.c.body)))) == [(0,)]
    for name in channels_[:100]:
        got = await get(client, name)
        assert await got.read() == body
        assert (await client.delete(f"/messages/{got.headers['x-linger-msg-id']}")).status == 204
    assert await _rows(client, sa.select(bodies.c.refs)) == [(100,)]
    for name in channels_[100:150]:
        assert (await client.delete(f"/channels/{name}")).status == 204
    await client.delete("/channels/nobody")
    assert await _rows(client, sa.select(bodies.c.refs)) == [(50,)]
    for name in channels_[150:]:
        await client.delete(f"/channels/{name}")
    assert await _rows(client, sa.select(bodies.c.id)) == []


async def test_published_body_kept_once_dies_with_its_last_copy_by_expiry(
    client: Client, clock: Clock
) -> None:
    for name in ("a", "b"):
        response = await client.put(f"/channels/{name}/topics/t", params={"linger": "5"})
        assert response.status == 204
    await publish(client, "t", b"y" * 4000)
    assert len(await _rows(client, sa.select(bodies.c.id))) == 1
    clock.advance(6)
    await client.app[BROKER].sweep()
    assert await _rows(client, sa.select(bodies.c.id)) == []
    assert (await server_stats(client))["current-messages"] == 0


async def test_publish_without_subscribers_keeps_no_body(client: Client) -> None:
    assert await publish(client, "nobody", b"z" * 5000) == {}
    assert await _rows(client, sa.select(bodies.c.id)) == []


async def test_drain_lets_other_writes_through_between_batches(make_client: ClientFactory) -> None:
    """A drain of many messages is many short transactions: an add submitted while it
    runs is committed before the drain is over."""
    client = await make_client(sweep_interval=60.0)
    messages_ = client.app[BROKER].storage.messages
    count = BATCH * 8
    await asyncio.gather(*(messages_.add("deep", b"m", "t/p", Options()) for _ in range(count)))
    order: list[str] = []

    async def drain() -> None:
        assert await messages_.drain("deep") == count
        order.append("drain")

    async def other() -> None:
        await asyncio.sleep(0)
        await messages_.add("other", b"m", "t/p", Options())
        order.append("add")

    await asyncio.gather(drain(), other())
    assert order == ["add", "drain"]
    assert await stats(client, "deep") == {"ready": 0, "hidden": 0}


async def test_sweep_deletes_in_batches_and_counts_everything(
    make_client: ClientFactory, clock: Clock
) -> None:
    client = await make_client(sweep_interval=60.0)
    messages_ = client.app[BROKER].storage.messages
    count = BATCH * 2 + 17
    await asyncio.gather(
        *(messages_.add("old", b"m", "t/p", Options(linger=1)) for _ in range(count))
    )
    clock.advance(2)
    before = (await server_stats(client))["msg-retention"]
    await client.app[BROKER].sweep()
    assert await stats(client, "old") == {"ready": 0, "hidden": 0}

    # The server's own first sweep may have taken (and still count) some of them.
    async def all_counted() -> bool:
        return bool((await server_stats(client))["msg-retention"] - before == count)

    await until(all_counted)
    assert await _counted(client) == {}


@pytest.mark.postgres
async def test_channel_listing_does_not_read_the_messages(client: Client, backend: str) -> None:
    overview = client.app[BROKER].storage.overview
    async with connection(client) as conn:
        for stmt in (overview._channels, overview._channel_count):
            args = stmt.args({"cutoff": 0})
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            plan = "\n".join(r[0] for r in await raw.fetch("EXPLAIN " + stmt.sql, *args))
            assert " on messages" not in plan, plan


async def test_long_poll_that_ends_early_is_listed_180_s_after_its_end(
    make_client: ClientFactory, clock: Clock
) -> None:
    client = await make_client(poll_max=100.0)
    waiting = asyncio.create_task(get(client, "brief", wait=True))
    await until(lambda: _waiting(client, 1))
    message_id = await add(client, "brief")
    assert (await waiting).status == 200
    assert (await client.delete(f"/messages/{message_id}")).status == 204
    assert "brief" in (await (await client.get("/channels")).json())["channels"]
    clock.advance(181)
    assert "brief" not in (await (await client.get("/channels")).json())["channels"]


async def test_waiter_count_is_kept_not_walked() -> None:
    notifier = Notifier()
    async with notifier.waiter("a", lambda: True), notifier.waiter("b", lambda: True):
        notifier._waiters = _Unwalkable(notifier._waiters)
        assert notifier.count() == 2
        notifier._waiters = dict(notifier._waiters)
    assert notifier.count() == 0


async def _waiting(client: Client, count: int) -> bool:
    return bool((await server_stats(client))["current-waiters"] == count)


class _Unwalkable(dict[str, Any]):
    def values(self) -> Any:
        raise AssertionError("count() walked every waiting channel")


async def test_groups_whose_changes_cancel_out_keep_counts_and_the_mark(
    make_client: ClientFactory,
) -> None:
    """A delete and adds of one channel submitted in one step, so committed in one group
    (a group whose changes cancel out leaves the channel's row alone, unless a mark is to
    be checked on it, as here): the kept count stays exact and the mark is never passed."""
    client = await make_client(hlm=4)
    messages = client.app[BROKER].storage.messages
    for _ in range(4):
        await add(client, "c")
    for round_ in range(30):
        got = await get(client, "c")
        assert got.status == 200
        message_id = int(got.headers["x-linger-msg-id"])
        adds = [messages.add("c", b"m", "t/p", Options(), hlm=4) for _ in range(1 + round_ % 2)]
        deleted, *added = await asyncio.gather(
            messages.delete(message_id), *adds, return_exceptions=True
        )
        assert deleted is None
        assert [isinstance(result, int) for result in added] == [True, False][: len(added)]
        assert all(isinstance(result, int | errors.ChannelFull) for result in added)
        counted = await _counted(client)
        assert counted == await _actual(client) == {"c": 4}


# Names full of what SQL, JSON (SQLite's counts travel as a JSON array) or a URL would
# read as syntax.
_HOSTILE_NAMES = [
    "it's",
    "back\\slash",
    "back\\'quote",
    "$1",
    "$2'); DROP TABLE messages; --",
    "E'x'",
    "ARRAY[1]",
    "ü🙂 ünïcode",
    'dou"ble',
    "x" * 250,
]


async def test_counts_of_any_names_stay_exact_under_concurrent_groups(
    client: Client, no_deadlocks: NoDeadlocks | None
) -> None:
    """With channel names full of quotes, backslashes and placeholders, and 8 clients
    adding (singly and in batches), receiving and deleting at once, every kept count
    equals the channel's rows."""
    encoded = [quote(name, safe="") for name in _HOSTILE_NAMES]

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(30):
            channel = rng.choice(encoded)
            action = rng.randrange(4)
            if action == 0:
                await add(client, channel, b"m")
            elif action == 1:
                items = json.dumps([{"body": "b"}] * rng.randint(1, 5))
                response = await client.post(
                    raw(f"/channels/{channel}/messages"),
                    data=items,
                    headers={"Content-Type": "application/json"},
                )
                assert response.status == 202, await response.text()
            else:
                got = await get(client, channel)
                if got.status == 200:
                    response = await client.delete(f"/messages/{got.headers['x-linger-msg-id']}")
                    assert response.status == 204

    await asyncio.gather(*(worker(seed) for seed in range(8)))
    counted, actual = await _counted(client), await _actual(client)
    assert counted == actual
    assert set(actual) <= set(_HOSTILE_NAMES)
    assert len(actual) > 5
    if no_deadlocks is not None:
        await no_deadlocks.check()
