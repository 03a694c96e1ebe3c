"""Invariants of batches at their edges, through the HTTP app on every backend: every
column of every row at the SQLite multi-row INSERT's chunk boundaries, the high-level mark
refusing whole batches, per-item options against the query string's, UTF-8 JSON answers
(small and streamed), and claims on PostgreSQL racing a delivery and release of the
message they are taking (it must still be claimed, in order), as well as a redrive racing
the same."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import random
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa

from linger.http.keys import BROKER
from linger.store import driver
from linger.store.records import Options

from .conftest import ClientFactory, Clock, NoDeadlocks
from .helpers import Client, Probe, connection, error, raw, stats
from .pgcluster import asyncpg_dsn
from .processes import until
from .test_batches import acknowledge, add_many, receive
from .test_topics import publish, subscribe

JSON = {"Content-Type": "application/json"}
NDJSON = {"Content-Type": "application/x-ndjson"}
MEMORY = "sqlite+aiosqlite://"
QUIET = {"sweep_interval": 60.0, "poll_interval": 60.0}
_UTF8_JSON = "application/json; charset=utf-8"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def post_batch(
    client: Client,
    channel: str,
    items: list[Any],
    query: dict[str, str] | None = None,
    headers: dict[str, str] = JSON,
) -> Any:
    return await client.post(
        raw(f"/channels/{channel}/messages"),
        data=io.BytesIO(json.dumps(items).encode()),
        headers=headers,
        params=query or {},
    )


async def peek(client: Client, channel: str, state: str = "ready", n: int = 1000) -> Any:
    response = await client.get(
        raw(f"/channels/{channel}/peek"), params={"n": str(n), "state": state}
    )
    assert response.status == 200, await response.text()
    return response


async def rows_of(client: Client, channel: str) -> list[dict[str, Any]]:
    """Every stored column of ``channel``'s messages, in id order."""
    async with connection(client) as conn:
        result = await conn.execute(
            sa.text(
                "SELECT id, channel, priority, timeout, deliver, linger, topic, content_type,"
                " body, created_at, visible_at, dead_at, deliveries, body_id, lease, dead,"
                " dead_from, dead_reason FROM messages WHERE channel = :c ORDER BY id"
            ),
            {"c": channel},
        )
        return [dict(row._mapping) for row in result]


async def count_rows(client: Client) -> int:
    async with connection(client) as conn:
        return int((await conn.execute(sa.text("SELECT count(*) FROM messages"))).scalar_one())


# --- Items with every kind of per-item content: the expected row of each ----------------

_DEFAULTS = {"priority": "5", "timeout": "7", "deliver": "2", "linger": "900", "dead": "dq"}


def _item(i: int) -> dict[str, Any]:
    """Item ``i`` of a batch: plain ones (the batch's options) and ones with their own."""
    kind = i % 7
    if kind == 0:
        return {"body": f"plain-{i}"}
    if kind == 1:
        return {"body": _b64(bytes([i % 256, 0, 255, 10])), "encoding": "base64"}
    if kind == 2:
        return {"body": f"ct-{i}-é", "content_type": f"application/x-{i}", "encoding": "utf-8"}
    if kind == 3:
        return {
            "body": f"opt-{i}",
            "priority": -i,
            "timeout": 1 + i,
            "deliver": i % 5,
            "linger": 100 + i,
        }
    if kind == 4:
        return {"body": f"delay-{i}", "delay": 10 + i, "dead": f"dl-{i % 3}", "priority": None}
    if kind == 5:
        return {
            "body": "😀" * (i % 4 + 1),
            "content_type": "text/x; charset=utf-8",
            "dead": f"dl{i}",
        }
    return {"body": f"zero-{i}", "priority": 0, "timeout": 1, "deliver": 0, "linger": 0, "delay": 0}


def _expected(
    item: dict[str, Any], defaults: dict[str, str], channel: str, now: int
) -> dict[str, Any]:
    def option(key: str, default: int) -> int:
        value = item.get(key)
        if value is None:
            return int(defaults.get(key, default))
        return int(value)

    encoding = item.get("encoding", "utf-8")
    body = base64.b64decode(item["body"]) if encoding == "base64" else item["body"].encode()
    kind = item.get("content_type") or (
        "application/octet-stream" if encoding == "base64" else "text/plain"
    )
    delay, linger = option("delay", 0), option("linger", 0)
    return {
        "channel": channel,
        "priority": option("priority", 0),
        "timeout": option("timeout", 30),
        "deliver": option("deliver", 0),
        "linger": linger,
        "topic": "",
        "content_type": kind,
        "body": body,
        "created_at": now,
        "visible_at": now + delay * 1000 if delay else 0,
        "dead_at": now + linger * 1000 if linger else None,
        "deliveries": 0,
        "body_id": None,
        "lease": None,
        "dead": item.get("dead") if item.get("dead") is not None else defaults.get("dead"),
        "dead_from": None,
        "dead_reason": None,
    }


async def _check_batch(
    client: Client, channel: str, size: int, defaults: dict[str, str]
) -> list[int]:
    """Add a batch of ``size`` varied items; every stored column of every row is the one
    its item (and the batch's defaults) asked for, and the ids answered are the rows'."""
    items = [_item(i) for i in range(size)]
    before = int(time.time() * 1000)
    response = await post_batch(client, channel, items, defaults)
    after = int(time.time() * 1000)
    assert response.status == 202, await response.text()
    ids: list[int] = (await response.json())["ids"]
    assert len(ids) == size
    assert ids == sorted(ids)
    assert len(set(ids)) == size
    rows = await rows_of(client, channel)
    assert [row["id"] for row in rows] == ids
    now = rows[0]["created_at"]
    assert before - 1 <= now <= after + 1
    for index, (item, row) in enumerate(zip(items, rows, strict=True)):
        stored = {key: value for key, value in row.items() if key != "id"}
        stored["body"] = bytes(stored["body"])
        assert stored == _expected(item, defaults, channel, now), (size, index, item)
    return ids


_SIZES = (1, 7, 8, 9, 63, 64, 65, 72, 73, 100)


async def test_every_column_of_every_row_at_every_chunk_boundary(client: Client) -> None:
    last = 0
    for size in _SIZES:
        for defaults in ({}, _DEFAULTS):
            channel = f"chunk-{size}-{len(defaults)}"
            ids = await _check_batch(client, channel, size, defaults)
            assert ids[0] > last  # ids go on ascending from one batch to the next
            last = ids[-1]


@pytest.mark.sqlite
async def test_every_column_on_the_in_memory_database(make_client: ClientFactory) -> None:
    client = await make_client(db=MEMORY)
    for size in _SIZES:
        await _check_batch(client, f"mem-{size}", size, _DEFAULTS if size % 2 else {})


async def test_a_batch_of_max_batch_items(make_client: ClientFactory) -> None:
    client = await make_client(max_batch=1000)
    await _check_batch(client, "thousand", 1000, _DEFAULTS)
    response = await post_batch(client, "thousand2", [{"body": "x"}] * 1001)
    await error(response, 400, "Too many items.")
    assert await stats(client, "thousand2") == {"ready": 0, "hidden": 0}


@pytest.mark.sqlite
async def test_a_batch_of_max_batch_items_in_memory(make_client: ClientFactory) -> None:
    client = await make_client(db=MEMORY, max_batch=1000)
    await _check_batch(client, "thousand", 1000, {})


async def test_items_come_back_as_sent_by_receive(client: Client) -> None:
    """Through a claim too (not only in the table): body, encoding, content type, options
    and order, for a batch of 73 (64 + 8 + 1 rows) with the same priority."""
    items: list[dict[str, Any]] = []
    for i in range(73):
        if i % 3 == 0:
            items.append({"body": _b64(bytes([i, 255 - i, 0xC3])), "encoding": "base64"})
        elif i % 3 == 1:
            items.append({"body": f"t{i}\u2028\u0000\U0001f600", "content_type": f"x/{i}"})
        else:
            items.append({"body": f"o{i}", "timeout": 100 + i, "deliver": i, "linger": 1000 + i})
    ids = await add_many(client, "back", items)
    got = await receive(client, "back", 100)
    assert [m["id"] for m in got] == ids
    for i, (item, message) in enumerate(zip(items, got, strict=True)):
        if i % 3 == 0:
            assert message["encoding"] == "base64"
            assert base64.b64decode(message["body"]) == base64.b64decode(item["body"])
            assert message["content_type"] == "application/octet-stream"
        elif i % 3 == 1:
            assert (message["body"], message["encoding"]) == (item["body"], "utf-8")
            assert message["content_type"] == f"x/{i}"
        else:
            assert (message["timeout"], message["deliver"], message["linger"]) == (
                100 + i,
                i,
                1000 + i,
            )


# --- The high-level mark ------------------------------------------------------------


async def test_the_mark_refuses_a_whole_batch_at_every_chunk_size(
    make_client: ClientFactory,
) -> None:
    client = await make_client(hlm=100)
    assert len(await add_many(client, "hlm", [{"body": "a"}] * 27)) == 27
    for size in (74, 80, 81, 100, 129):  # each one past the mark of 100
        response = await post_batch(client, "hlm", [{"body": "b", "priority": 1}] * size)
        text = (
            f"Channel hlm cannot take {size} more messages: it is at the high-level mark "
            "with 27 messages"
        )
        await error(response, 507, text)
        assert await count_rows(client) == 27
        assert await stats(client, "hlm") == {"ready": 27, "hidden": 0}
    ids = await add_many(client, "hlm", [{"body": "c"}] * 73)  # exactly to the mark
    assert len(ids) == 73
    await error(await post_batch(client, "hlm", [{"body": "d"}]), 507)
    rows = await rows_of(client, "hlm")
    assert len(rows) == 100
    assert [bytes(r["body"]) for r in rows] == [b"a"] * 27 + [b"c"] * 73
    assert [r["id"] for r in rows][27:] == ids


async def test_concurrent_batches_past_the_mark_store_one_whole(
    make_client: ClientFactory,
) -> None:
    """Batches of 64 and 65 rows each fit alone but not together: the ones refused leave
    no row behind, whatever group commit they share."""
    client = await make_client(hlm=130)
    sizes = (64, 65, 64, 65)
    responses = await asyncio.gather(
        *(post_batch(client, "pair", [{"body": str(s)}] * s) for s in sizes)
    )
    accepted = [s for s, r in zip(sizes, responses, strict=True) if r.status == 202]
    # Any two fit (at most 130), no three: the first two the mark meets are stored.
    assert len(accepted) == 2, [r.status for r in responses]
    assert [r.status for r in responses].count(507) == 2
    rows = await rows_of(client, "pair")
    assert len(rows) == sum(accepted) == await count_rows(client)
    assert await stats(client, "pair") == {"ready": sum(accepted), "hidden": 0}
    stored = {int(bytes(r["body"])) for r in rows}
    assert stored <= set(sizes)


# --- Per-batch options of plain items -------------------------------------------------


async def test_plain_items_take_the_query_options_and_others_merge_them(
    client: Client, clock: Clock
) -> None:
    items = [
        {"body": "plain"},
        {"body": "own", "priority": 1},
        {"body": "nulls", "priority": None, "timeout": None, "dead": None},
        {"body": "cp", "content_type": "a/b"},
        {"body": _b64(b"\x00"), "encoding": "base64"},
    ]
    query = {"priority": -4, "timeout": 9, "delay": 1, "dead": "dq", "linger": 50}
    ids = await add_many(client, "opts", items, **query)
    rows = await rows_of(client, "opts")
    assert [r["id"] for r in rows] == ids
    assert [r["priority"] for r in rows] == [-4, 1, -4, -4, -4]
    assert {r["timeout"] for r in rows} == {9}
    assert {r["dead"] for r in rows} == {"dq"}
    assert {r["linger"] for r in rows} == {50}
    assert {r["visible_at"] - r["created_at"] for r in rows} == {1000}
    assert [r["content_type"] for r in rows] == [
        "text/plain",
        "text/plain",
        "text/plain",
        "a/b",
        "application/octet-stream",
    ]
    clock.advance(1.2)
    got = await receive(client, "opts", 10)
    assert [m["id"] for m in got] == [ids[0], ids[2], ids[3], ids[4], ids[1]]


_ITEM_ERRORS: list[tuple[str, int, str]] = [
    ('{"body": "x", "bdy": 1}', 400, 'Item 0: Unknown field "bdy".'),
    ('{"bdy": 1}', 400, 'Item 0: Unknown field "bdy".'),
    ('{"body": "x", "encoding": "utf-8", "zz": null}', 400, 'Item 0: Unknown field "zz".'),
    ('{"encoding": "base64"}', 400, "Item 0: An item needs a body (a string)."),
    ('{"body": null}', 400, "Item 0: An item needs a body (a string)."),
    ('{"body": "x", "encoding": null}', 400, "Item 0: Invalid encoding."),
    ('{"body": "x", "encoding": "UTF-8"}', 400, "Item 0: Invalid encoding."),
    ('{"body": "", "encoding": "base64"}', 400, "Item 0: Message is empty."),
    ('{"body": "x", "content_type": 5}', 400, "Item 0: Invalid content type."),
    ('{"body": "x", "content_type": "a\\u0007"}', 400, "Item 0: Invalid content type."),
    ('{"body": "x", "priority": true}', 400, "Item 0: Invalid message priority."),
    ('{"body": "x", "priority": " 1"}', 400, "Item 0: Invalid message priority."),
    ('{"body": "x", "timeout": 0}', 400, "Item 0: Invalid message visibility timeout."),
    ('{"body": "x", "timeout": 1.0}', 400, "Item 0: Invalid message visibility timeout."),
    ('{"body": "x", "deliver": -1}', 400, "Item 0: Invalid message delivery limit."),
    ('{"body": "x", "linger": false}', 400, "Item 0: Invalid message retention period."),
    ('{"body": "x", "delay": [1]}', 400, "Item 0: Invalid message delay."),
    ('{"body": "x", "delay": -1}', 400, "Item 0: Invalid message delay."),
    ('{"body": "x", "dead": 7}', 400, "Item 0: Invalid dead-letter channel."),
    ('{"body": "x", "dead": "opt-err"}', 400, "Item 0: Invalid dead-letter channel."),
    ('{"body": "x", "dead": ""}', 400, "Item 0: Invalid dead-letter channel."),
    ('{"body": "x", "dead": "a\\u0001"}', 400, "Item 0: Invalid dead-letter channel."),
    ('{"body": "x", "priority": 9223372036854775808}', 400, "Item 0: Invalid message priority."),
]


@pytest.mark.parametrize("with_defaults", [False, True])
async def test_item_errors_are_the_same_with_and_without_query_options(
    client: Client, with_defaults: bool
) -> None:
    """Each bad item is refused with its own text whether or not the query string gives
    options (with them, plain items take the batch's parsed options), as the first item
    or after valid plain ones."""
    query = {"priority": "3", "timeout": "5", "dead": "dq"} if with_defaults else {}
    for item, status, text in _ITEM_ERRORS:
        for before in (0, 3):
            body = "[" + '{"body": "ok"}, ' * before + item + "]"
            response = await client.post(
                "/channels/opt-err/messages", data=body, headers=JSON, params=query
            )
            await error(response, status, text.replace("Item 0", f"Item {before}"))
    # A bad query option is the request's error, for plain items as for any.
    response = await post_batch(client, "opt-err", [{"body": "x"}], {"priority": "x"})
    await error(response, 400, "Invalid message priority.")
    response = await post_batch(client, "opt-err", [{"body": "x"}], {"dead": "opt-err"})
    await error(response, 400, "Invalid dead-letter channel.")
    assert await stats(client, "opt-err") == {"ready": 0, "hidden": 0}


async def test_a_dead_letter_channel_that_is_not_utf8_is_a_400(client: Client) -> None:
    """An item's "dead" with a lone surrogate (valid JSON, "\\ud800") is not a channel
    name: 400 like the same value in the query string, never a 500 (pre-existing: the
    item path checks valid_name only, which lets surrogates through to the database)."""
    for item in ('{"body": "x", "dead": "\\ud800"}', '{"body": "x", "dead": "d\\udcff"}'):
        response = await client.post("/channels/sur/messages", data=f"[{item}]", headers=JSON)
        await error(response, 400, "Item 0: Invalid dead-letter channel.")
        response = await client.post("/channels/sur/messages", data=item + "\n", headers=NDJSON)
        await error(response, 400, "Line 1: Invalid dead-letter channel.")
    assert await stats(client, "sur") == {"ready": 0, "hidden": 0}


# --- JSON answers (orjson) ------------------------------------------------------------


def _strict_json(data: bytes) -> Any:
    """The answer as JSON: valid UTF-8, no NaN or other non-standard constants."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(data.decode("utf-8"), parse_constant=refuse)


_AWKWARD = [
    "\u2028\u2029",
    "\u0000\u001f\u007f",
    "\U0001f600\U00010000",
    '"\\/<script>',
    "\ufeff\ufffe\uffff",
    "é" * 3,
]


@pytest.mark.parametrize("streamed", [False, True])
async def test_batch_and_peek_answers_are_utf8_json_of_what_was_sent(
    make_client: ClientFactory, streamed: bool
) -> None:
    client = await make_client(max_size=300_000)
    pad = "p" * 250_000 if streamed else ""  # 6 x 250 KB: over the 1 MiB of streaming
    items = [{"body": text + pad, "content_type": 'text/x; q="é"'} for text in _AWKWARD]
    items.append({"body": _b64(b"\xff\xfe\x00" + pad.encode()), "encoding": "base64"})
    ids = await add_many(client, "awk", items, priority=-(2**63), timeout=2**63 - 1)
    response = await peek(client, "awk")
    peeked = _strict_json(await response.read())["messages"]
    response = await client.get("/channels/awk/messages", params={"n": "10", "nowait": ""})
    assert response.status == 200
    got = _strict_json(await response.read())["messages"]
    for found in (peeked, got):
        assert [m["id"] for m in found] == ids
        for message, item in zip(found, items, strict=True):
            assert message["body"] == item["body"]
            assert message["priority"] == -(2**63)
            assert message["timeout"] == 2**63 - 1
    assert {m["content_type"] for m in got[:-1]} == {'text/x; q="é"'}
    answer = await acknowledge(client, "delete", {"leases": [m["lease"] for m in got]})
    assert answer == {"done": ids, "stale": [], "missing": []}


@pytest.mark.parametrize("route", ["peek", "messages"])
async def test_streamed_answers_say_they_are_utf8(make_client: ClientFactory, route: str) -> None:
    """API.md: every JSON response is ``application/json; charset=utf-8``. An answer over
    1 MiB (written message by message) says ``application/json`` alone, though its text
    is now raw UTF-8 (orjson); a peek said the charset before it was streamed."""
    client = await make_client()
    await add_many(client, "big", [{"body": "é" * 100_000}] * 6)  # 1.2 MB of UTF-8
    params = {"n": "10"} if route == "peek" else {"n": "10", "nowait": ""}
    response = await client.get(f"/channels/big/{route}", params=params)
    assert response.status == 200
    data = await response.read()
    assert len(_strict_json(data)["messages"]) == 6
    assert response.headers["Content-Type"] == _UTF8_JSON


async def test_small_answers_keep_the_content_type(client: Client) -> None:
    response = await post_batch(client, "ct", [{"body": "ü"}])
    assert response.status == 202
    assert response.headers["Content-Type"] == _UTF8_JSON
    (lease,) = [m["lease"] for m in await receive(client, "ct")]
    for path, body in (
        ("/messages/touch", {"leases": [lease, "99.1"]}),
        ("/messages/delete", {"ids": [123456789, 2**63 - 1]}),
    ):
        response = await client.post(path, data=json.dumps(body), headers=JSON)
        assert response.status == 200
        assert response.headers["Content-Type"] == _UTF8_JSON
        _strict_json(await response.read())
    response = await peek(client, "ct", "hidden")
    assert response.headers["Content-Type"] == _UTF8_JSON


# --- Claims: order, byte budget, races --------------------------------------------------


async def test_claims_follow_priority_then_id_across_queued_and_due_messages(
    client: Client, clock: Clock
) -> None:
    """Claims of every size take messages in (priority, id) order, whether a message is
    queued or parked and due again (its lease ran out, not yet requeued)."""
    rng = random.Random(11)
    items = [{"body": f"m{i}", "priority": rng.randint(-2, 2), "timeout": 5} for i in range(40)]
    ids = await add_many(client, "ord", items)
    priority = {i: item["priority"] for i, item in zip(ids, items, strict=True)}
    # Half of them are delivered and their leases run out: parked, due.
    parked = await receive(client, "ord", 20)
    assert [m["id"] for m in parked] == sorted(ids, key=lambda i: (priority[i], i))[:20]
    clock.advance(5.5)  # due, and the sweeper requeues only 1 s after
    expected = sorted(ids, key=lambda i: (priority[i], i))
    peeked = _strict_json(await (await peek(client, "ord", n=40)).read())["messages"]
    assert [m["id"] for m in peeked] == expected
    taken: list[int] = []
    for n in (1, 3, 7, 9, 20):
        taken.extend(m["id"] for m in await receive(client, "ord", n))
    assert taken == expected


async def test_the_byte_budget_ends_a_claim_across_both_looks(
    make_client: ClientFactory, clock: Clock
) -> None:
    client = await make_client(max_size=1000, max_batch_bytes=2500)
    due = await add_many(client, "bud", [{"body": "a" * 1000, "timeout": 1}])
    first = await receive(client, "bud", 1)
    assert [m["id"] for m in first] == due
    others = await add_many(
        client,
        "bud",
        [
            {"body": "b" * 1000, "priority": 1},
            {"body": "c" * 600, "priority": -1},
            {"body": "d" * 10, "priority": 2},
        ],
    )
    clock.advance(1.3)  # the first one is due again (parked): order c, a, b, d
    got = await receive(client, "bud", 10)  # before each: 0, 600, 1600 (< 2500), 2600
    assert [m["id"] for m in got] == [others[1], due[0], others[0]]
    assert [m["id"] for m in await receive(client, "bud", 10)] == [others[2]]


async def test_racing_consumers_never_share_a_lease_nor_lose_a_message(
    client: Client, no_deadlocks: NoDeadlocks | None
) -> None:
    """Batch and single consumers claim while others release (now or with a delay, so
    that parked messages become due and are requeued by the sweeper), reject to a dead
    channel that a redriver sends back, and delete. No message is delivered while a lease
    of it is current, every release, reject and delete of a current lease is done, and
    every message is deleted exactly once."""
    rng = random.Random(7)
    produced: list[int] = []
    for start in range(0, 240, 60):
        items = [
            {"body": f"r{i}", "priority": rng.randint(-1, 1), "dead": "race.dead"}
            for i in range(start, start + 60)
        ]
        produced.extend(await add_many(client, "race", items, timeout=60))
    held: dict[int, str] = {}
    deleted: list[int] = []
    deliveries = 0
    done = asyncio.Event()

    def delivered(message_id: int, lease: str) -> None:
        nonlocal deliveries
        assert message_id not in held, f"{message_id} delivered while {held[message_id]} is current"
        held[message_id] = lease
        deliveries += 1

    async def act(message_ids: list[int], channel: str) -> None:
        leases = [held.pop(i) for i in message_ids]  # not current once the request goes
        roll = rng.random()
        if channel != "race" and roll >= 0.9:
            roll = 0.0  # a dead letter rejected would be discarded
        if roll < 0.45:
            answer = await acknowledge(client, "delete", {"leases": leases})
            deleted.extend(answer["done"])
        elif roll < 0.75:
            answer = await acknowledge(client, "release", {"leases": leases})
        elif roll < 0.9:
            answer = await acknowledge(client, "release", {"leases": leases, "delay": 1})
        else:
            answer = await acknowledge(client, "reject", {"leases": leases})
        assert sorted(answer["done"]) == sorted(message_ids), answer

    async def batch_consumer(n: int) -> None:
        while not done.is_set():
            channel = "race" if rng.random() < 0.8 else "race.dead"
            got = await receive(client, channel, n)
            if not got:
                await asyncio.sleep(0.01)
                continue
            keys = [(m["priority"], m["id"]) for m in got]
            assert keys == sorted(keys)
            for m in got:
                delivered(m["id"], m["lease"])
            await act([m["id"] for m in got], channel)

    async def single_consumer() -> None:
        while not done.is_set():
            response = await client.get("/channels/race", params={"nowait": ""})
            await response.read()
            if response.status == 204:
                await asyncio.sleep(0.01)
                continue
            assert response.status == 200
            message_id = int(response.headers["x-linger-msg-id"])
            delivered(message_id, response.headers["x-linger-lease"])
            await act([message_id], "race")

    async def redriver() -> None:
        while not done.is_set():
            response = await client.post("/channels/race.dead/redrive", params={"n": "5"})
            assert response.status == 200, await response.text()
            await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(batch_consumer(n)) for n in (30, 9, 7, 4, 2)]
    tasks += [asyncio.create_task(single_consumer()) for _ in range(2)]
    tasks.append(asyncio.create_task(redriver()))

    async def all_deleted() -> bool:
        for task in tasks:
            if task.done():
                task.result()
        return len(deleted) >= len(produced)

    try:
        await until(all_deleted, 25)
    finally:
        done.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        task.result()
    assert sorted(deleted) == sorted(produced)
    assert deliveries > len(produced)
    assert await stats(client, "race") == {"ready": 0, "hidden": 0}
    assert await stats(client, "race.dead") == {"ready": 0, "hidden": 0}
    if no_deadlocks is not None:
        await no_deadlocks.check()


# --- PostgreSQL: a message updated (and left ready) while a claim runs ------------------

_AHEAD = 300_000


@contextlib.asynccontextmanager
async def _rows_held_ahead(
    url: str, channel: str, dead_from: str | None = None
) -> AsyncIterator[Any]:
    """``_AHEAD`` ready messages of ``channel`` ahead of any added later, locked by a
    transaction in flight (as other consumers' claims hold theirs) until the block ends:
    a claim of the channel passes them (SKIP LOCKED) one by one, which takes it a while
    after its snapshot. Yields a connection for other statements."""
    dsn = asyncpg_dsn(url)
    admin, holder = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        await admin.execute(
            "INSERT INTO messages (channel, priority, timeout, deliver, linger, topic,"
            " content_type, body, created_at, visible_at, dead_at, deliveries, dead_from)"
            " SELECT $1::text, 0, 30, 0, 0, '', 'text/plain', 'x', 0, 0, NULL, 0, $2::text"
            " FROM generate_series(1, $3::int)",
            channel,
            dead_from,
            _AHEAD,
        )
        await admin.execute("ANALYZE messages")
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT id FROM messages WHERE channel = $1 FOR UPDATE", channel)
        try:
            yield admin
        finally:
            await transaction.rollback()
    finally:
        await admin.close()
        await holder.close()


async def _delivered_again(admin: Any, message_id: int) -> None:
    """What another consumer's delivery and release of the message leave: one more
    delivery counted, ready, no lease; committed at once (the message is not locked)."""
    await admin.execute(
        "UPDATE messages SET deliveries = deliveries + 1, visible_at = 0, lease = NULL"
        " WHERE id = $1",
        message_id,
    )


@pytest.mark.postgres
@pytest.mark.parametrize("route", ["batch", "single"])
async def test_a_message_released_during_a_claim_is_still_claimed_first(
    client: Client, postgres_url: str, route: str
) -> None:
    """X and Y are ready, X first. While a claim passes the rows others hold, another
    consumer's delivery and release of X commits (X stays ready, unlocked). The claim
    locks X in its new version (SKIP LOCKED follows the update) and must deliver it: found
    again by the ctid of that version, which the statement's snapshot cannot see, X would
    be locked, counted against n and left undelivered (a batch of 2 answering [Y], a
    single GET 204 with two messages ready)."""
    async with _rows_held_ahead(postgres_url, "w") as admin:
        x, y = await add_many(client, "w", [{"body": "X"}, {"body": "Y"}])
        if route == "batch":
            claim = asyncio.create_task(
                client.get("/channels/w/messages", params={"n": "2", "nowait": ""})
            )
        else:
            claim = asyncio.create_task(client.get("/channels/w", params={"nowait": ""}))
        await asyncio.sleep(0.03)  # the claim has its snapshot, and is among the held rows
        assert not claim.done()
        await _delivered_again(admin, x)
        response = await claim
        if route == "batch":
            assert response.status == 200
            got = [m["id"] for m in (await response.json())["messages"]]
            assert got == [x, y]
        else:
            await response.read()
            assert response.status == 200
            assert int(response.headers["x-linger-msg-id"]) == x
            assert response.headers["x-linger-delivered"] == "2"


@pytest.mark.postgres
async def test_a_redrive_of_all_moves_a_dead_letter_released_meanwhile(
    client: Client, postgres_url: str
) -> None:
    """A redrive of all the dead letters of a channel stops at its first batch that moved
    fewer than it chose: a dead letter delivered and released meanwhile (still ready in
    the dead channel) must be moved, not chosen and left alone (see above), or the
    redrive ends with it behind though nobody holds it."""
    async with _rows_held_ahead(postgres_url, "rd.dead", dead_from="rd") as admin:
        async with connection(client) as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO messages (channel, priority, timeout, deliver, linger, topic,"
                    " content_type, body, created_at, visible_at, dead_at, deliveries,"
                    " dead_from, dead_reason) VALUES ('rd.dead', 0, 30, 0, 0, '', 'text/plain',"
                    " 'X', 0, 0, NULL, 1, 'rd', 'rejected'), ('rd.dead', 0, 30, 0, 0, '',"
                    " 'text/plain', 'Y', 0, 0, NULL, 1, 'rd', 'rejected')"
                )
            )
        x, y = [
            int(r[0])
            for r in await admin.fetch(
                "SELECT id FROM messages WHERE channel = 'rd.dead' AND body IN ('X', 'Y')"
                " ORDER BY id"
            )
        ]
        redrive = asyncio.create_task(
            client.post("/channels/rd.dead/redrive", params={"to": "back"})
        )
        await asyncio.sleep(0.03)
        assert not redrive.done()
        await _delivered_again(admin, x)
        response = await redrive
        assert response.status == 200, await response.text()
        assert await response.json() == {"moved": 2}
        moved = await admin.fetch("SELECT id FROM messages WHERE channel = 'back' ORDER BY id")
        assert [r[0] for r in moved] == [x, y]


# Where the in-memory database's write groups run


async def _groups_from_now(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, int]]:
    """Each SQLite write group from now on: (ran on the event loop, its operations).
    The sweep that a server runs as it starts has finished by then."""
    await asyncio.sleep(0.1)
    seen: list[tuple[bool, int]] = []
    for name in ("_sqlite_group", "_sqlite_autocommit"):
        run = getattr(driver, name)

        def recording(conn: Any, factories: list[Any], ledger: Any, run: Any = run) -> Any:
            seen.append((threading.current_thread() is threading.main_thread(), len(factories)))
            return run(conn, factories, ledger)

        monkeypatch.setattr(driver, name, recording)
    return seen


@pytest.mark.sqlite
async def test_in_memory_batches_of_small_bodies_run_on_the_loop_in_bounded_groups(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch adds, receives and deletes of 100 small messages run on the event loop;
    concurrent ones at most LIGHT_ROWS rows a group there (more groups, never a longer
    hold of the loop), and another client is answered meanwhile. Every message is
    delivered once and deleted."""
    client = await make_client(db=MEMORY, **QUIET)
    groups = await _groups_from_now(monkeypatch)
    items = [{"body": "x" * 256}] * 100
    first = await add_many(client, "small", items)
    got = await receive(client, "small", 100)
    answer = await acknowledge(client, "delete", {"leases": [m["lease"] for m in got]})
    assert sorted(answer["done"]) == sorted(first)
    assert groups == [(True, 1)] * 3
    groups.clear()
    async with Probe(client) as probe:
        added = await asyncio.gather(*(add_many(client, "small", items) for _ in range(6)))
        ids = [message_id for batch in added for message_id in batch]
        received = await asyncio.gather(*(receive(client, "small", 100) for _ in range(6)))
        delivered = [m for batch in received for m in batch]
        leases = [m["lease"] for m in delivered]
        chunks = [{"leases": leases[i : i + 100]} for i in range(0, 600, 100)]
        answers = await asyncio.gather(*(acknowledge(client, "delete", c) for c in chunks))
    assert probe.answered > 0
    assert probe.worst < 0.5, probe.worst
    assert sorted(m["id"] for m in delivered) == sorted(ids)
    assert len(set(ids)) == 600
    assert sum(len(answer["done"]) for answer in answers) == 600
    assert await stats(client, "small") == {"ready": 0, "hidden": 0}
    on_loop = [size for inline, size in groups if inline]
    assert on_loop
    assert max(on_loop) <= driver.LIGHT_ROWS // 100


@pytest.mark.sqlite
async def test_in_memory_acknowledgements_weigh_the_bodies_they_rewrite(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release, reject or delete rewrites or frees its messages' bodies: once bodies of
    200,000 bytes are stored, one of 200 leases goes to the thread and single ones run
    on the loop at most two a group (LIGHT_BYTES). Every lease is acted on."""
    client = await make_client(db=MEMORY, **QUIET)
    await add_many(client, "heavy", [{"body": "h" * 200_000}] * 20)
    groups = await _groups_from_now(monkeypatch)
    got = await receive(client, "heavy", 20)
    assert groups.pop() == (False, 1)
    answer = await acknowledge(client, "release", {"leases": [m["lease"] for m in got]})
    assert len(answer["done"]) == 20
    assert groups.pop() == (False, 1)
    got = [m for _ in range(20) for m in await receive(client, "heavy", 1)]
    assert len(got) == 20
    groups.clear()
    responses = await asyncio.gather(
        *(client.delete(f"/messages/{m['id']}", params={"lease": m["lease"]}) for m in got)
    )
    assert [r.status for r in responses] == [204] * 20
    assert groups
    assert max(size for inline, size in groups if inline) <= 2
    assert await stats(client, "heavy") == {"ready": 0, "hidden": 0}


@pytest.mark.sqlite
async def test_in_memory_writes_of_large_bodies_run_off_the_loop(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose bodies pass LIGHT_BYTES goes to aiosqlite's thread; so does, once
    such bodies are stored, a receive of enough messages to read that much back. While a
    receive reads 15 MiB of bodies back, another client is answered."""
    client = await make_client(db=MEMORY, **QUIET)
    groups = await _groups_from_now(monkeypatch)
    await add_many(client, "small", [{"body": "s"}] * 100)
    assert groups.pop() == (True, 1)
    await add_many(client, "big", [{"body": "b" * 200_000}] * 3)  # 600,000 bytes
    assert groups.pop() == (False, 1)
    await receive(client, "big", 1)
    assert groups.pop() == (True, 1)
    # 100 messages of up to 200,000 bytes, as far as the claim can tell.
    assert len(await receive(client, "small", 100)) == 100
    assert groups.pop() == (False, 1)
    largest = "L" * 262_144
    for _ in range(3):
        await add_many(client, "huge", [{"body": largest}] * 20)
    async with Probe(client) as probe:
        got = await receive(client, "huge", 60)
    assert [m["body"] for m in got] == [largest] * 60
    assert groups.pop() == (False, 1)
    assert probe.answered > 0
    assert probe.worst < 0.5, probe.worst


@pytest.mark.sqlite
async def test_in_memory_publishes_run_on_the_loop_once_their_fanout_is_known(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A topic's first publish goes to aiosqlite's thread (how many copies it writes is
    not known); later ones run on the event loop while their copies are few. Subscribing
    many more channels, even while publishes are under way, sends them to the thread
    again; an unsubscribe forgets the topic. Every channel gets every copy."""
    client = await make_client(db=MEMORY, **QUIET)
    for i in range(4):
        await subscribe(client, f"fan{i}", "news")
    groups = await _groups_from_now(monkeypatch)
    assert len(await publish(client, "news")) == 4
    assert groups.pop() == (False, 1)
    assert len(await publish(client, "news")) == 4
    assert groups.pop() == (True, 1)
    many = [subscribe(client, f"fan{i}", "news") for i in range(4, 300)]
    during = [publish(client, "news") for _ in range(3)]
    await asyncio.gather(*many, *during)
    assert len(await publish(client, "news")) == 300
    groups.clear()
    assert len(await publish(client, "news")) == 300
    assert groups == [(False, 1)]
    response = await client.delete(raw("/channels/fan299/topics/news"))
    assert response.status == 204
    assert len(await publish(client, "news")) == 299
    assert groups.pop() == (False, 1)
    for i in range(4, 299):
        response = await client.delete(raw(f"/channels/fan{i}/topics/news"))
        assert response.status == 204
    groups.clear()
    assert len(await publish(client, "news")) == 4
    assert len(await publish(client, "news")) == 4
    assert groups == [(False, 1), (True, 1)]
    assert (await stats(client, "fan0"))["ready"] == 10
    # The 3 publishes made while subscribing reached some of the new channels each.
    assert 2 <= (await stats(client, "fan299"))["ready"] <= 5
    counts = {(await stats(client, f"fan{i}"))["ready"] for i in range(4, 299)}
    assert counts <= {3, 4, 5, 6}


@pytest.mark.sqlite
async def test_in_memory_fanout_bounds_survive_races_with_subscriptions(
    make_client: ClientFactory,
) -> None:
    """The bound of a topic's fan-out is never below its subscriptions, whatever runs
    beside its publishes: subscriptions written after a publish that was under way
    (first publish or not), an unsubscribe during a publish (which must not leave the
    topic remembered), and re-subscriptions (which must not inflate it for good)."""
    client = await make_client(db=MEMORY, **QUIET)
    topics = client.app[BROKER].storage.topics
    options = Options()

    async def publish_beside(topic: str, changes: list[Any]) -> None:
        # The publish's write is queued first; its group runs it before the others.
        publishing = asyncio.create_task(topics.publish(topic, b"m", "text/plain"))
        await asyncio.gather(publishing, *changes)

    await topics.subscribe("r0", "first", options)
    many = [topics.subscribe(f"r{i}", "first", options) for i in range(1, 150)]
    await publish_beside("first", many)
    assert topics._fanout.get("first", 150) >= 150
    await topics.publish("first", b"m", "text/plain")
    assert topics._fanout["first"] == 150

    await topics.subscribe("k0", "known", options)
    await topics.publish("known", b"m", "text/plain")
    assert topics._fanout["known"] == 1
    unsubscribe = topics.unsubscribe("nobody", "known")
    await publish_beside("known", [unsubscribe])
    assert "known" not in topics._fanout
    await publish_beside(
        "known", [topics.subscribe(f"k{i}", "known", options) for i in range(1, 150)]
    )
    assert topics._fanout.get("known", 150) >= 150

    await topics.subscribe("gone", "leak", options)
    await publish_beside("leak", [topics.unsubscribe("gone", "leak")])
    assert "leak" not in topics._fanout

    for _ in range(5):
        await topics.subscribe("k0", "known", options)
    assert topics._fanout.get("known", 155) >= 150
    await topics.publish("known", b"m", "text/plain")
    assert topics._fanout["known"] == 150
    assert (await stats(client, "r149"))["ready"] >= 1
    assert (await stats(client, "k0"))["ready"] == 4
