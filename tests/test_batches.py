"""Batches: add, publish, receive and acknowledge many messages per request, through the
HTTP app."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linger.http.budget import Budget, Share
from linger.http.keys import BROKER
from linger.store import driver as driver_module

from .conftest import ClientFactory, Clock, NoDeadlocks
from .helpers import Client, Probe, add, error, get, raw, raw_request, stats, status_of
from .processes import until
from .test_lifecycle import detail
from .test_topics import subscribe

JSON = {"Content-Type": "application/json"}
NDJSON = {"Content-Type": "application/x-ndjson"}


async def add_many(client: Client, channel: str, items: list[Any], **query: Any) -> list[int]:
    response = await client.post(
        raw(f"/channels/{channel}/messages"),
        data=io.BytesIO(json.dumps(items).encode()),
        headers=JSON,
        params={k: str(v) for k, v in query.items()},
    )
    assert response.status == 202, await response.text()
    ids: list[int] = (await response.json())["ids"]
    return ids


async def receive(client: Client, channel: str, n: int = 10, **query: Any) -> list[dict[str, Any]]:
    params = {"n": str(n), **{k: str(v) for k, v in query.items()}}
    if "wait" not in query:
        params["nowait"] = ""
    response = await client.get(raw(f"/channels/{channel}/messages"), params=params)
    assert response.status == 200, await response.text()
    found: list[dict[str, Any]] = (await response.json())["messages"]
    return found


async def acknowledge(client: Client, action: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(f"/messages/{action}", data=json.dumps(body), headers=JSON)
    assert response.status == 200, await response.text()
    answer: dict[str, Any] = await response.json()
    return answer


async def test_add_many_then_receive_in_delivery_order(client: Client) -> None:
    items = [
        {"body": "low"},
        {"body": base64.b64encode(b"\xff\x00bin").decode(), "encoding": "base64"},
        {"body": "urgent", "priority": -5, "content_type": "application/json"},
        {"body": "ünïcode"},
    ]
    ids = await add_many(client, "b", items)
    assert ids == sorted(ids)
    assert len(set(ids)) == 4
    got = await receive(client, "b", 10)
    assert [m["id"] for m in got] == [ids[2], ids[0], ids[1], ids[3]]
    urgent, low, binary, text = got
    assert urgent["priority"] == -5
    assert urgent["content_type"] == "application/json"
    assert binary["encoding"] == "base64"
    assert base64.b64decode(binary["body"]) == b"\xff\x00bin"
    assert binary["content_type"] == "application/octet-stream"
    assert text["body"] == "ünïcode"
    assert text["encoding"] == "utf-8"
    assert low["content_type"] == "text/plain"
    for m in got:
        assert m["lease"].startswith(f"{m['id']}.")
        assert m["channel"] == "b"
        assert m["delivered"] == 1
        assert m["timeout"] == 30
        assert m["dead_from"] is None
        assert m["topic"] == ""
    assert await stats(client, "b") == {"ready": 0, "hidden": 4}


async def test_ndjson_lines_and_query_defaults(client: Client) -> None:
    lines = [{"body": "a"}, {"body": "b", "priority": 2, "timeout": 9}, {"body": "c"}]
    body = "\n".join(json.dumps(line) for line in lines) + "\n\n"
    response = await client.post(
        raw("/channels/nd/messages"), data=body, headers=NDJSON, params={"priority": "1"}
    )
    assert response.status == 202
    ids = (await response.json())["ids"]
    got = await receive(client, "nd", 3)
    assert [(m["id"], m["priority"], m["timeout"]) for m in got] == [
        (ids[0], 1, 30),
        (ids[2], 1, 30),
        (ids[1], 2, 9),
    ]


async def test_single_get_and_batch_receive_share_the_queue(client: Client) -> None:
    ids = await add_many(client, "mix", [{"body": str(i)} for i in range(5)])
    single = await get(client, "mix")
    assert int(single.headers["x-linger-msg-id"]) == ids[0]
    assert [m["id"] for m in await receive(client, "mix", 3)] == ids[1:4]
    assert [m["id"] for m in await receive(client, "mix", 3)] == ids[4:]
    assert await receive(client, "mix", 3) == []


async def test_batch_past_the_mark_stores_nothing(make_client: ClientFactory) -> None:
    client = await make_client(hlm=5)
    await add_many(client, "full", [{"body": "m"}] * 3)
    response = await client.post(
        "/channels/full/messages", data=json.dumps([{"body": "m"}] * 3), headers=JSON
    )
    # The count the batch met: the 3 stored, not the 5 the refused batch would have made.
    text = "Channel full cannot take 3 more messages: it is at the high-level mark with 3 messages"
    await error(response, 507, text)
    assert await stats(client, "full") == {"ready": 3, "hidden": 0}
    await add_many(client, "full", [{"body": "m"}] * 2)
    assert await stats(client, "full") == {"ready": 5, "hidden": 0}


async def test_delays_and_dead_letters_in_batches(client: Client, clock: Clock) -> None:
    ids = await add_many(
        client,
        "life",
        [{"body": "later", "delay": 60}, {"body": "now", "dead": "life.dead", "deliver": 1}],
        timeout=5,
    )
    got = await receive(client, "life", 10)
    assert [m["id"] for m in got] == [ids[1]]
    assert (await detail(client, "life"))["delayed"] == 1
    answer = await acknowledge(client, "reject", {"leases": [got[0]["lease"]]})
    assert answer == {"done": [ids[1]], "stale": [], "missing": []}
    dead = await receive(client, "life.dead")
    assert [(m["id"], m["dead_from"], m["dead_reason"]) for m in dead] == [
        (ids[1], "life", "rejected")
    ]
    clock.advance(61)
    assert [m["id"] for m in await receive(client, "life")] == [ids[0]]


async def test_acknowledgements_report_done_stale_and_missing(client: Client, clock: Clock) -> None:
    ids = await add_many(client, "ack", [{"body": str(i)} for i in range(6)], timeout=5)
    first = await receive(client, "ack", 6)
    leases = [m["lease"] for m in first]
    clock.advance(6)  # every lease ran out; two messages are delivered again
    again = await receive(client, "ack", 2)
    assert [m["id"] for m in again] == ids[:2]
    unknown = "999999.1"
    answer = await acknowledge(client, "touch", {"leases": [*leases[:3], unknown], "timeout": 60})
    # The first two were delivered again (stale); the third's lease ran out, not current
    # enough to touch (it is not hidden).
    assert answer == {"done": [], "stale": leases[:3], "missing": [unknown]}
    answer = await acknowledge(client, "touch", {"leases": [m["lease"] for m in again]})
    assert answer["done"] == ids[:2]
    answer = await acknowledge(client, "delete", {"leases": [*leases, unknown]})
    # A lease that ran out but was not replaced still deletes (as for a single delete).
    assert answer == {"done": ids[2:], "stale": leases[:2], "missing": [unknown]}
    answer = await acknowledge(client, "release", {"leases": [again[0]["lease"]], "delay": 30})
    assert answer["done"] == [ids[0]]
    assert await detail(client, "ack") == {
        "ready": 0,
        "hidden": 1,
        "delayed": 1,
        "oldest_ready_age": 0,
        "dead_from": [],
    }
    answer = await acknowledge(client, "reject", {"leases": [again[1]["lease"]]})
    assert answer["done"] == [ids[1]]  # no dead channel: discarded
    answer = await acknowledge(client, "delete", {"ids": [ids[0], ids[1]]})
    assert answer == {"done": [ids[0]], "stale": [], "missing": [ids[1]]}
    assert await stats(client, "ack") == {"ready": 0, "hidden": 0}


async def test_publish_many_copies_each_message_to_every_channel(client: Client) -> None:
    for channel in ("s1", "s2"):
        await subscribe(client, channel, "t", priority=3)
    long = "x" * 5000  # stored once, shared by both copies
    response = await client.post(
        "/topics/t/messages", data=json.dumps([{"body": "p1"}, {"body": long}]), headers=JSON
    )
    assert response.status == 202
    published = (await response.json())["messages"]
    assert [sorted(p) for p in published] == [["s1", "s2"], ["s1", "s2"]]
    for channel in ("s1", "s2"):
        got = await receive(client, channel)
        assert [m["id"] for m in got] == [p[channel] for p in published]
        assert [m["body"] for m in got] == ["p1", long]
        assert {(m["topic"], m["priority"]) for m in got} == {("t", 3)}


async def test_batch_add_wakes_as_many_waiters(make_client: ClientFactory) -> None:
    client = await make_client(poll_interval=30.0)  # no poller to help
    waiting = [asyncio.create_task(get(client, "w", wait=True)) for _ in range(3)]
    batch_waiter = asyncio.create_task(receive(client, "w2", 5, wait=2))
    await asyncio.sleep(0.1)
    await add_many(client, "w", [{"body": str(i)} for i in range(3)])
    await add_many(client, "w2", [{"body": str(i)} for i in range(4)])
    responses = await asyncio.wait_for(asyncio.gather(*waiting), 1.5)
    assert sorted(r.status for r in responses) == [200, 200, 200]
    assert len(await asyncio.wait_for(batch_waiter, 1.5)) == 4


async def test_receive_many_waits_and_ends_empty(client: Client) -> None:
    assert await receive(client, "empty", 5, wait=1) == []


async def test_receive_stops_at_the_batch_byte_budget(make_client: ClientFactory) -> None:
    client = await make_client(max_size=1000, max_batch_bytes=2500)
    for _ in range(5):
        await add(client, "big", "x" * 1000)
    assert len(await receive(client, "big", 10)) == 3  # 0, 1000, 2000 bytes before each
    assert len(await receive(client, "big", 10)) == 2


async def test_large_responses_stream(make_client: ClientFactory) -> None:
    client = await make_client(max_size=300_000)
    body = "y" * 300_000
    await add_many(client, "large", [{"body": body}] * 6)
    got = await receive(client, "large", 10)
    assert [m["body"] for m in got] == [body] * 6


_BAD: list[tuple[str, bytes | str, dict[str, str], int, str]] = [
    ("empty array", "[]", JSON, 400, "No messages."),
    ("not an array", '{"body": "x"}', JSON, 400, "Invalid batch: expected a JSON array."),
    ("truncated", '[{"body": "x"}, {"body": ', JSON, 400, "Item 1: Invalid JSON."),
    ("garbage after", '[{"body": "x"}] [', JSON, 400, "Invalid batch: text after the JSON array."),
    ("bad separator", '[{"body": "x"} {"body": "y"}]', JSON, 400, "Item 1: Invalid JSON."),
    ("not an object", '[{"body": "x"}, 7]', JSON, 400, "Item 1: An item must be a JSON object."),
    ("no body", '[{"priority": 1}]', JSON, 400, "Item 0: An item needs a body (a string)."),
    ("body not text", '[{"body": 12}]', JSON, 400, "Item 0: An item needs a body (a string)."),
    ("empty body", '[{"body": ""}]', JSON, 400, "Item 0: Message is empty."),
    ("unknown field", '[{"body": "x", "bdy": 1}]', JSON, 400, 'Item 0: Unknown field "bdy".'),
    ("encoding", '[{"body": "x", "encoding": "utf-16"}]', JSON, 400, "Item 0: Invalid encoding."),
    ("base64", '[{"body": "!!", "encoding": "base64"}]', JSON, 400, "Item 0: Invalid base64."),
    ("surrogate", '[{"body": "\\ud800"}]', JSON, 400, "Item 0: Invalid UTF-8 in the body."),
    ("bad utf-8", b'[{"body": "\xff"}]', JSON, 400, "Invalid UTF-8 in the batch."),
    (
        "priority",
        '[{"body": "x"}, {"body": "x", "priority": 1.5}]',
        JSON,
        400,
        "Item 1: Invalid message priority.",
    ),
    (
        "bool timeout",
        '[{"body": "x", "timeout": true}]',
        JSON,
        400,
        "Item 0: Invalid message visibility timeout.",
    ),
    (
        "huge int",
        '[{"body": "x", "deliver": 99999999999999999999}]',
        JSON,
        400,
        "Item 0: Invalid message delivery limit.",
    ),
    (
        "dead self",
        '[{"body": "x", "dead": "bad"}]',
        JSON,
        400,
        "Item 0: Invalid dead-letter channel.",
    ),
    (
        "content type",
        '[{"body": "x", "content_type": "a\\u0000b"}]',
        JSON,
        400,
        "Item 0: Invalid content type.",
    ),
    ("ndjson line", '{"body": "x"}\n\n{"body": y}\n', NDJSON, 400, "Line 3: Invalid JSON."),
    ("ndjson item", '{"body": "x"}\n[]\n', NDJSON, 400, "Line 2: An item must be a JSON object."),
    ("too many", json.dumps([{"body": "x"}] * 6), JSON, 400, "Too many items."),
    (
        "oversized item",
        json.dumps([{"body": "x"}, {"body": "x" * 101}]),
        JSON,
        413,
        "Item 1: Message is larger than 100 bytes.",
    ),
    (
        "oversized body",
        json.dumps([{"body": "x" * 90}] * 5),
        JSON,
        413,
        "Request body is larger than 400 bytes.",
    ),
    (
        "media type",
        "[]",
        {"Content-Type": "text/plain"},
        415,
        "Unsupported content type: send application/json or application/x-ndjson.",
    ),
]


_OPTION_CASES = ("priority", "bool timeout", "huge int", "dead self")


@pytest.mark.parametrize("case", _BAD, ids=[case[0] for case in _BAD])
async def test_bad_batches_change_nothing(
    make_client: ClientFactory, case: tuple[str, bytes | str, dict[str, str], int, str]
) -> None:
    name, body, headers, status, text = case
    client = await make_client(max_batch=5, max_size=100, max_batch_bytes=400)
    await error(
        await client.post("/channels/bad/messages", data=body, headers=headers), status, text
    )
    if name not in _OPTION_CASES:  # a publish ignores the items' options
        response = await client.post("/topics/bad/messages", data=body, headers=headers)
        await error(response, status, text)
    assert await stats(client, "bad") == {"ready": 0, "hidden": 0}


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ("[]", "Invalid JSON: expected an object."),
        ("{", "Invalid JSON."),
        ('{"leases": "1.2"}', 'Invalid batch: "leases" must be a list.'),
        ('{"leases": []}', "No messages."),
        ('{"leases": ["1.2", 5]}', "Item 1: Invalid lease."),
        ('{"leases": ["1.2", "1"]}', "Item 1: Invalid lease."),
        ('{"leases": ["99999999999999999999.1"]}', "Item 0: Invalid lease."),
        ('{"leases": ["1.2", "1.3"]}', "Item 1: Message 1 is named twice."),
        ('{"leases": ["1.2", "2.2", "3.2", "4.2"]}', "Too many items."),
        ('{"leases": ["1.2"], "timeout": 0}', "Invalid message visibility timeout."),
        ('{"leases": ["1.2"], "delay": -1}', "Invalid message delay."),
        ('{"ids": [1, -1]}', "Item 1: Invalid message id."),
    ],
)
async def test_bad_acknowledgements_change_nothing(
    make_client: ClientFactory, body: str, text: str
) -> None:
    client = await make_client(max_batch=3)
    message_id = await add(client, "keep", "m")
    got = await receive(client, "keep", 1)
    lease = got[0]["lease"]
    body = body.replace('"1.2"', json.dumps(lease)).replace('"1.3"', f'"{message_id}.3"')
    action = "touch" if "timeout" in body else "release" if "delay" in body else "delete"
    response = await client.post(f"/messages/{action}", data=body, headers=JSON)
    await error(response, 400, text.replace("Message 1 ", f"Message {message_id} "))
    assert await stats(client, "keep") == {"ready": 0, "hidden": 1}


async def test_bad_batch_sizes(client: Client) -> None:
    for n in ("0", "-1", "1001", "x", "1.5"):
        response = await client.get("/channels/c/messages", params={"n": n, "nowait": ""})
        await error(response, 400, "Invalid batch size.")


async def test_hostile_batches_do_not_hold_up_other_clients(make_client: ClientFactory) -> None:
    """Large, deeply escaped, endless and malformed batch bodies, while a probe measures
    the other clients' wait."""
    client = await make_client()
    escaped = json.dumps([{"body": "\u0001" * 200_000}] * 40)  # ~48 MB of escapes
    one_long_string = '[{"body": "' + "a" * 3_000_000
    deep = "[" * 100_000
    many_lines = '{"body": "x"}\n' * 5000
    async with Probe(client) as probe:
        for body, headers in (
            (escaped, JSON),
            (one_long_string, JSON),
            (deep, JSON),
            (many_lines, NDJSON),
        ):
            data = io.BytesIO(body.encode())
            response = await client.post("/channels/h/messages", data=data, headers=headers)
            assert response.status in (400, 413), response.status
            assert "error" in await response.json()
    assert probe.worst < 0.25, probe.worst
    assert await stats(client, "h") == {"ready": 0, "hidden": 0}


async def test_concurrent_large_batches_share_the_memory_budget(
    make_client: ClientFactory,
) -> None:
    """Many batches at once, each nearly the whole budget: they wait for each other and
    all get stored."""
    client = await make_client(max_batch_bytes=64 * 1024, max_size=8 * 1024)
    item = {"body": "z" * 7000}
    results = await asyncio.gather(*(add_many(client, "mem", [item] * 8) for _ in range(12)))
    assert sum(len(ids) for ids in results) == 96
    assert await stats(client, "mem") == {"ready": 96, "hidden": 0}


async def test_concurrent_batch_consumers_never_share_a_message(
    client: Client, no_deadlocks: NoDeadlocks | None
) -> None:
    """Producers add in batches and singly while 8 batch consumers and 2 single ones
    receive and delete by lease: every message is delivered once and deleted once."""
    total_batches, size = 20, 25
    produced: list[int] = []
    delivered: list[int] = []
    done = asyncio.Event()
    rng = random.Random(5)

    async def producer() -> None:
        for _ in range(total_batches // 2):
            produced.extend(await add_many(client, "work", [{"body": "m"}] * size, timeout=60))
            produced.append(await add(client, "work", "single", timeout=60))

    async def consumer(n: int) -> None:
        while not done.is_set():
            got = await receive(client, "work", n)
            if not got:
                await asyncio.sleep(0.01)
                continue
            delivered.extend(m["id"] for m in got)
            leases = [m["lease"] for m in got]
            rng.shuffle(leases)
            answer = await acknowledge(client, "delete", {"leases": leases})
            assert len(answer["done"]) == len(got), answer

    consumers = [asyncio.create_task(consumer(n)) for n in (10,) * 8 + (1, 1)]
    await asyncio.gather(producer(), producer())
    expected = len(produced)

    async def drained() -> bool:
        return len(delivered) >= expected

    await until(drained, 20)
    done.set()
    await asyncio.gather(*consumers)
    assert sorted(delivered) == sorted(produced)
    assert len(set(delivered)) == len(delivered)
    assert await stats(client, "work") == {"ready": 0, "hidden": 0}
    if no_deadlocks is not None:
        await no_deadlocks.check()


_ITEMS = st.lists(
    st.one_of(
        st.text(min_size=1, max_size=50).map(lambda t: ("text", t)),
        st.binary(min_size=1, max_size=50).map(lambda b: ("binary", b)),
    ),
    min_size=1,
    max_size=20,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(items=_ITEMS, priorities=st.lists(st.integers(-3, 3), min_size=20, max_size=20))
async def test_any_batch_comes_back_as_sent_in_delivery_order(
    client: Client, items: list[tuple[str, Any]], priorities: list[int]
) -> None:
    channel = f"prop-{random.getrandbits(48)}"
    sent = []
    for (kind, value), priority in zip(items, priorities, strict=False):
        if kind == "text":
            sent.append({"body": value, "priority": priority})
        else:
            sent.append(
                {
                    "body": base64.b64encode(value).decode(),
                    "encoding": "base64",
                    "priority": priority,
                }
            )
    ids = await add_many(client, channel, sent)
    got = await receive(client, channel, len(sent))
    expected = sorted(zip(priorities, ids, sent, strict=False), key=lambda t: (t[0], t[1]))
    assert [m["id"] for m in got] == [e[1] for e in expected]
    for message, (_priority, _id, item) in zip(got, expected, strict=True):
        if item.get("encoding") == "base64":
            original = base64.b64decode(item["body"])
        else:
            original = item["body"].encode("utf-8")
        shown = message["body"]
        actual = base64.b64decode(shown) if message["encoding"] == "base64" else shown.encode()
        assert actual == original


async def test_stalled_batches_hold_no_budget(make_client: ClientFactory) -> None:
    """Clients that declare large batch bodies (chunked or not) and send nothing hold
    nothing of the budget, which counts what arrives, and not even room for a chunk:
    another batch of the whole --max-batch-bytes is stored while sixteen of them are
    still waiting (their body deadline then ends them with a 408)."""
    client = await make_client(max_batch_bytes=64 * 1024, body_timeout=1.5)
    heads = [
        b"POST /channels/stall/messages HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 65536\r\n\r\n[",
        b"POST /channels/stall/messages HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n[\r\n",
    ]
    stalled = [asyncio.create_task(raw_request(client, heads[i % 2])) for i in range(16)]
    await asyncio.sleep(0.1)
    ids = await add_many(client, "stall", [{"body": "m" * 6000}] * 10)  # 60 KB
    assert len(ids) == 10
    assert not any(task.done() for task in stalled)
    for answer in await asyncio.gather(*stalled):
        assert status_of(answer) == 408


async def test_batches_waiting_for_room_all_finish(make_client: ClientFactory) -> None:
    """Twelve batches trickled in at once, each nearly the whole budget of four: each
    takes bytes as they come, those that find it spent wait, and the oldest one being
    read never does, so none is left waiting for room that another waiting one holds:
    all are stored."""
    client = await make_client(max_batch_bytes=16 * 1024, max_size=4 * 1024)
    payload = json.dumps([{"body": "q" * 3500}] * 4).encode()

    async def trickled() -> list[int]:
        async def pieces() -> Any:
            for start in range(0, len(payload), 1024):
                yield payload[start : start + 1024]
                await asyncio.sleep(0.001)

        response = await client.post("/channels/room/messages", data=pieces(), headers=JSON)
        assert response.status == 202, await response.text()
        ids: list[int] = (await response.json())["ids"]
        return ids

    results = await asyncio.gather(*(trickled() for _ in range(12)))
    assert sum(len(ids) for ids in results) == 48
    assert (await stats(client, "room"))["ready"] == 48


async def test_a_publish_to_many_subscribers_keeps_others_responsive(client: Client) -> None:
    """A batch published to 300 subscribed channels writes 6,000 copies in one
    transaction; another client's requests are answered meanwhile (on the in-memory
    database the write runs off the event loop)."""
    for i in range(300):
        response = await client.put(f"/channels/sub{i}/topics/wide")
        assert response.status == 204
    items = json.dumps([{"body": f"m{i}"} for i in range(20)])
    async with Probe(client) as probe:
        response = await client.post(
            "/topics/wide/messages", data=items, headers={"Content-Type": "application/json"}
        )
        assert response.status == 202
    assert probe.worst < 0.5, probe.worst
    assert (await stats(client, "sub7"))["ready"] == 20


async def _publish_items(client: Client, topic: str, count: int) -> Any:
    items = json.dumps([{"body": f"m{i}"} for i in range(count)])
    return await client.post(f"/topics/{topic}/messages", data=items, headers=JSON)


async def test_a_publish_past_max_copies_stores_nothing(make_client: ClientFactory) -> None:
    """--max-copies bounds a batch publish's messages times its subscribed channels,
    counted before anything is written; a batch of one, like a single publish, is never
    refused."""
    client = await make_client(max_copies=50)
    for i in range(10):
        await subscribe(client, f"cap{i}", "capped")
    response = await _publish_items(client, "capped", 6)
    refusal = "Batch would write 60 copies (6 messages to 10 channels); at most 50."
    await error(response, 413, refusal)
    assert [await stats(client, f"cap{i}") for i in range(10)] == [{"ready": 0, "hidden": 0}] * 10
    response = await _publish_items(client, "capped", 5)  # exactly 50
    assert response.status == 202
    for i in range(10, 60):
        await subscribe(client, f"cap{i}", "capped")
    response = await _publish_items(client, "capped", 1)  # 60 copies of one message
    assert response.status == 202
    assert len((await response.json())["messages"][0]) == 60
    response = await client.post("/topics/capped", data={"msg": "single"})
    assert response.status == 202
    assert (await stats(client, "cap0"))["ready"] == 7
    assert (await stats(client, "cap59"))["ready"] == 2


async def test_refused_publishes_race_subscribes_and_adds(
    make_client: ClientFactory, no_deadlocks: NoDeadlocks | None
) -> None:
    """Batch publishes near the bound while channels subscribe and other clients add:
    each publish stores a copy of every message in every channel it answers with, or
    (413) nothing at all, and the adds that share its write group are kept."""
    client = await make_client(max_copies=120)
    for i in range(8):
        await subscribe(client, f"race{i}", "near")

    async def publishing() -> list[Any]:
        response = await _publish_items(client, "near", 10)
        assert response.status in (202, 413), await response.text()
        return (await response.json())["messages"] if response.status == 202 else []

    async def adding(worker: int) -> list[int]:
        return [await add(client, "plain", f"{worker}.{i}") for i in range(3)]

    published: list[dict[str, int]] = []
    added: list[int] = []
    for step in range(16):  # a channel joins during each round of publishes
        _, first, second, ids = await asyncio.gather(
            subscribe(client, f"race{8 + step}", "near"),
            publishing(),
            publishing(),
            adding(step),
        )
        for answer in (first, second):  # every message of a publish in the same channels
            assert len({tuple(sorted(copies)) for copies in answer}) <= 1, answer
            published += answer
        added += ids
    assert 0 < len(published) < 320  # the first rounds fitted (12 channels), the last not
    per_channel: dict[str, list[int]] = {}
    for copies in published:
        assert len(copies) <= 12  # at most 120 copies of 10 messages
        for channel, message_id in copies.items():
            per_channel.setdefault(channel, []).append(message_id)
    for i in range(24):
        channel = f"race{i}"
        stored = [m["id"] for m in await receive(client, channel, 1000)]
        assert sorted(stored) == sorted(per_channel.get(channel, [])), channel
    assert len(set(added)) == 48
    assert (await stats(client, "plain"))["ready"] == 48
    if no_deadlocks is not None:
        await no_deadlocks.check()


async def test_a_publish_of_200000_copies_is_refused_at_once(client: Client) -> None:
    """1,000 messages to 200 channels would be 200,000 copies in one transaction, holding
    every other client's writes for seconds: refused (default --max-copies) before any is
    written, while others are answered."""
    await asyncio.gather(*(subscribe(client, f"wide{i}", "huge") for i in range(200)))
    items = json.dumps([{"body": "x" * 100} for _ in range(1000)])
    async with Probe(client) as probe:
        answers = await asyncio.gather(
            *(client.post("/topics/huge/messages", data=items, headers=JSON) for _ in range(4))
        )
        assert [answer.status for answer in answers] == [413] * 4
        assert await add(client, "elsewhere", "kept")
    assert probe.worst < 0.5, probe.worst
    await error(answers[0], 413)
    assert "would write 200000 copies" in (await answers[0].json())["error"]
    assert (await stats(client, "wide0"))["ready"] == 0
    assert (await stats(client, "elsewhere"))["ready"] == 1


@pytest.mark.parametrize("kind", ["json", "ndjson"])
async def test_items_trickled_in_tiny_chunks_come_out_whole(client: Client, kind: str) -> None:
    """Items split anywhere (inside strings, escapes, multi-byte characters, between
    items) by a client sending a few bytes at a time: each comes out as sent. A long item
    in small pieces is joined once per attempt at it, not once per piece."""
    bodies = ["a", "é🙂" * 3, '\\n\\u0001 quoted "x"', "y" * 60_000, "z"]
    items = [{"body": body} for body in bodies]
    if kind == "json":
        payload = json.dumps(items).encode()
    else:
        payload = b"\n".join(json.dumps(item).encode() for item in items) + b"\n"

    async def trickle() -> Any:
        start = 0
        while start < len(payload):
            size = 7 if start < 200 else 509  # tiny pieces, then the long body's
            yield payload[start : start + size]
            start += size
            await asyncio.sleep(0)

    async with Probe(client) as probe:
        response = await client.post(
            "/channels/trickled/messages",
            data=trickle(),
            headers=NDJSON if kind == "ndjson" else JSON,
        )
        assert response.status == 202, await response.text()
    assert probe.worst < 0.5, probe.worst
    got = await receive(client, "trickled", 10)
    assert [m["body"] for m in got] == bodies


async def test_a_batch_publish_copies_every_message_to_the_same_channels(
    make_client: ClientFactory, no_deadlocks: NoDeadlocks | None
) -> None:
    """Channels subscribing and unsubscribing while a batch of 200 is published: every
    message of it goes to the same channels (on PostgreSQL each statement would see the
    subscriptions committed since the one before), and never more copies than counted
    against --max-copies."""
    client = await make_client(max_copies=2_000)
    for i in range(10):
        await subscribe(client, f"pin{i}", "pinned")

    async def changing() -> None:
        await asyncio.sleep(0.005)
        for i in range(10, 60):
            await subscribe(client, f"pin{i}", "pinned")
            if i % 10 == 0:
                response = await client.delete(f"/channels/pin{i // 10}/topics/pinned")
                assert response.status == 204

    changes = asyncio.create_task(changing())
    answers = []
    while not changes.done():
        response = await _publish_items(client, "pinned", 200)
        assert response.status in (202, 413), await response.text()
        if response.status == 202:
            answers.append((await response.json())["messages"])
    await changes
    assert answers
    for copies in answers:
        assert len({tuple(sorted(one)) for one in copies}) == 1
        assert len(copies) * len(copies[0]) <= 2_000
    if no_deadlocks is not None:
        await no_deadlocks.check()


async def test_no_group_holds_more_rows_than_its_bound(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 publishes at once to a topic of 300 channels (a single publish is never
    refused): group commit used to put them in one transaction of 4,800 copies, which
    held every other write until it committed. A group now stops at GROUP_ROWS rows (here
    1,000): each publish runs in a group of at most three; all copies are kept."""
    client = await make_client()
    monkeypatch.setattr(driver_module, "GROUP_ROWS", 1_000)
    for i in range(300):
        await subscribe(client, f"fan{i}", "wide16")
    await client.post("/topics/wide16", data=b"first")  # learns the fan-out
    sizes: list[tuple[int, int]] = []
    store = client.app[BROKER].storage.driver
    next_group = store._next_group

    def recording() -> Any:
        group, inline = next_group()
        sizes.append((len(group), sum(p.rows or 0 for p in group)))
        return group, inline

    monkeypatch.setattr(store, "_next_group", recording)
    answers = await asyncio.gather(
        *(client.post("/topics/wide16", data=f"m{i}".encode()) for i in range(16))
    )
    assert [answer.status for answer in answers] == [202] * 16
    assert sizes
    assert all(rows <= 1_000 or count == 1 for count, rows in sizes), sizes
    assert max(count for count, _rows in sizes) <= 3
    assert (await stats(client, "fan7"))["ready"] == 17


async def test_writes_go_between_heavy_groups(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishes that each exceed GROUP_ROWS (here 200 rows for 300 copies) run alone;
    writes queued behind them go right after the heavy group under way, not after all of
    them: each waits for one heavy group at most."""
    client = await make_client()
    monkeypatch.setattr(driver_module, "GROUP_ROWS", 200)
    for i in range(300):
        await subscribe(client, f"heavy{i}", "wide300")
    await client.post("/topics/wide300", data=b"first")  # learns the fan-out
    store = client.app[BROKER].storage.driver
    next_group = store._next_group
    groups: list[list[int | None]] = []

    def recording() -> Any:
        group, inline = next_group()
        groups.append([p.rows for p in group])
        return group, inline

    monkeypatch.setattr(store, "_next_group", recording)

    async def publishing(i: int) -> int:
        return (await client.post("/topics/wide300", data=f"m{i}".encode())).status

    results = await asyncio.gather(
        *(publishing(i) for i in range(8)), add(client, "light", "m"), add(client, "light")
    )
    assert results[:8] == [202] * 8
    heavy = [i for i, rows in enumerate(groups) if rows == [300]]
    light = [i for i, rows in enumerate(groups) if rows and max(r or 0 for r in rows) <= 1]
    assert len(heavy) == 8, groups
    assert light, groups
    assert light[0] <= heavy[1], groups  # behind one heavy group at most
    assert (await stats(client, "light"))["ready"] == 2


async def test_the_budget_is_never_overdrawn_by_more_than_the_oldest_batch() -> None:
    """Twelve bodies of random sizes taken in random pieces from a budget of 100 bytes at
    once: the free bytes and those held always add up to the budget, the budget is
    overdrawn only by the oldest body under way, and every body finishes."""
    budget = Budget(100)
    rng = random.Random(11)
    shares: list[Share] = []

    def check() -> None:
        held = sum(share.held for share in shares)
        assert budget._free + held == 100
        if held > 100:
            assert held - shares[0].held <= 100

    async def body(size: int) -> None:
        share = budget.open()
        shares.append(share)
        taken = 0
        while taken < size:
            piece = min(size - taken, rng.randint(1, 40))
            await share.take(piece)
            taken += piece
            check()
            await asyncio.sleep(rng.random() / 1000)
        shares.remove(share)
        share.close()
        check()

    await asyncio.wait_for(asyncio.gather(*(body(rng.randint(1, 100)) for _ in range(12))), 10)
    assert budget._free == 100
