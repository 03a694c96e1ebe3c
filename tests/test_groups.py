"""Group commit under stress: no write is stranded, one failing operation fails alone,
concurrent groups never deadlock, and an exhausted pool is a prompt 503."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from typing import Any

import pytest
import sqlalchemy as sa

from linger.http.keys import BROKER
from linger.store import driver
from linger.store.db import POSTGRES_POOL_OVERFLOW, POSTGRES_POOL_SIZE, bodies
from linger.store.db import messages as m
from linger.store.records import Options

from .conftest import ClientFactory, Clock, NoDeadlocks
from .helpers import (
    Client,
    Probe,
    add,
    connection,
    error,
    get,
    json_body_of,
    raw_request,
    stats,
    status_of,
)
from .test_batches import acknowledge, add_many, receive
from .test_counts import _actual, _counted, _rows
from .test_topics import _DROP_TRIGGER, _FAIL_TRIGGER, _execute, publish, subscribe

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


class _Routed:
    """Counts the runs of ``Messages``' transactional add and delete: on PostgreSQL a
    write alone in its group runs as one statement instead (``Driver.write``'s
    ``lone``), and these run only in groups of several, with a mark, or when it
    declined."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, client: Client) -> None:
        self.runs = {"add": 0, "delete": 0}
        storage = client.app[BROKER].storage.messages
        for name in self.runs:
            original = getattr(storage, f"_{name}_operation")

            def counted(*args: Any, _name: str = name, _original: Any = original) -> Any:
                self.runs[_name] += 1
                return _original(*args)

            monkeypatch.setattr(storage, f"_{name}_operation", counted)


async def test_a_write_alone_keeps_the_counts_in_one_statement(
    make_client: ClientFactory, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request at a time: each add and delete is alone in its group; the counts stay
    exact whichever way it ran, and on PostgreSQL it ran as one statement unless it had to
    take the transaction (a mark to check, a shared body to release)."""
    client = await make_client(**QUIET)
    routed = _Routed(monkeypatch, client)
    ids = [await add(client, "c") for _ in range(5)]
    assert await _counted(client) == await _actual(client) == {"c": 5}
    for message_id in ids[:3]:
        assert (await client.delete(f"/messages/{message_id}")).status == 204
    assert await _counted(client) == await _actual(client) == {"c": 2}
    lone = backend == "postgresql"
    assert routed.runs == ({"add": 0, "delete": 0} if lone else {"add": 5, "delete": 3})
    # A body shared by a publish: the delete declines and the transaction releases it.
    for name in ("s1", "s2"):
        await subscribe(client, name, "t")
    await publish(client, "t", b"x" * 5000)
    got = await get(client, "s1")
    assert (await client.delete(f"/messages/{got.headers['x-linger-msg-id']}")).status == 204
    assert routed.runs["delete"] == (1 if lone else 4)
    assert await _rows(client, sa.select(bodies.c.refs)) == [(1,)]
    got = await get(client, "s2")
    assert (await client.delete(f"/messages/{got.headers['x-linger-msg-id']}")).status == 204
    assert await _rows(client, sa.select(bodies.c.id)) == []
    assert await _counted(client) == await _actual(client) == {"c": 2}


async def test_a_write_alone_with_a_mark_checks_it_in_the_transaction(
    make_client: ClientFactory, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client(hlm=2, **QUIET)
    routed = _Routed(monkeypatch, client)
    await add(client, "c")
    await add(client, "c")
    response = await client.post("/channels/c", data=b"m", headers={"Content-Type": "t/p"})
    await error(response, 507, "Channel c is at the high-level mark with 2 messages")
    assert routed.runs["add"] == 3
    assert await _counted(client) == await _actual(client) == {"c": 2}


async def test_a_delete_alone_that_fails_says_why_and_changes_nothing(
    client: Client, backend: str
) -> None:
    """The lone delete's refusals (explained in its own statement) are the
    transaction's: gone, a stale lease, each a JSON error; the count is untouched. A
    scoped token's refusal (403) is in test_auth."""
    message_id = await add(client, "c")
    got = await get(client, "c")
    lease = got.headers["x-linger-lease"]
    stale = f"{message_id}.{int(lease.split('.')[1]) ^ 1}"
    await error(
        await client.delete(f"/messages/{message_id}", params={"lease": stale}),
        409,
        "Lease is stale.",
    )
    await error(await client.delete("/messages/999999"), 404, "Message not found.")
    assert await _counted(client) == await _actual(client) == {"c": 1}
    response = await client.delete(f"/messages/{message_id}", params={"lease": lease})
    assert response.status == 204
    await error(await client.delete(f"/messages/{message_id}"), 404, "Message not found.")
    assert await _counted(client) == await _actual(client) == {}


async def test_lone_and_grouped_writes_racing_keep_every_count(
    make_client: ClientFactory,
    database_url: str,
    backend: str,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    no_deadlocks: NoDeadlocks | None,
) -> None:
    """Two apps on one database (one app in memory), producers and consumers at a pace
    that leaves many writes alone in their groups and puts others together: single and
    batch adds, publishes sharing bodies, deletes (two racing for one message across the
    apps), touches, releases, rejects to a dead-letter channel, batch acknowledgements,
    drains, and the clock moving so that leases end and sweeps move and delete. No 5xx,
    a message deleted at most once, each channel's kept count equal to its rows at the
    end, shared bodies referenced; on PostgreSQL both ways were taken and no deadlock."""
    first = await make_client(**QUIET)
    apps = [first, first if database_url == "sqlite+aiosqlite://" else await make_client(**QUIET)]
    for name in "abc":
        await subscribe(first, name, "t")
    routed = _Routed(monkeypatch, first)
    rng = random.Random(5)
    statuses: list[int] = []
    deleted: list[str] = []
    singles = itertools.count()
    stop = time.monotonic() + 2.5

    def note(*responses: Any) -> None:
        for response in responses:
            statuses.append(response.status)
            assert response.status < 500, response.status

    async def producer(k: int) -> None:
        while time.monotonic() < stop:
            app, roll, channel = apps[k % 2], rng.random(), rng.choice("abc")
            if roll < 0.15:
                note(await app.post("/topics/t", data=b"y" * rng.choice([10, 5000])))
            elif roll < 0.25:
                note(await app.post(f"/channels/{channel}/messages", json=[{"body": "b"}] * 3))
            else:
                options = {"deliver": "1", "dead": "dlq"} if rng.random() < 0.3 else {}
                if rng.random() < 0.2:
                    options["linger"] = "1"
                note(
                    await app.post(
                        f"/channels/{channel}",
                        data=b"m",
                        params=options,
                        headers={"Content-Type": "t/p"},
                    )
                )
            await asyncio.sleep(rng.choice([0, 0.001, 0.005]))

    async def delete(app: Client, message_id: str, **params: str) -> Any:
        response = await app.delete(f"/messages/{message_id}", params=params)
        if response.status == 204:
            deleted.append(message_id)
        next(singles)
        return response

    async def consumer(k: int) -> None:
        while time.monotonic() < stop:
            app, other = apps[k % 2], apps[(k + 1) % 2]
            got = await get(app, rng.choice(["a", "b", "c", "dlq"]))
            if got.status != 200:
                await asyncio.sleep(0.002)
                continue
            message_id, lease = got.headers["x-linger-msg-id"], got.headers["x-linger-lease"]
            roll = rng.random()
            if roll < 0.35:
                note(await delete(app, message_id, lease=lease))
            elif roll < 0.45:  # two deletes of one message, one per app
                one, two = await asyncio.gather(
                    delete(app, message_id), delete(other, message_id, lease=lease)
                )
                note(one, two)
                assert sorted([one.status, two.status]) in ([204, 404], [204, 409], [404, 404])
            elif roll < 0.55:
                note(await app.post(f"/messages/{message_id}/touch", params={"lease": lease}))
                note(await delete(other, message_id, lease=lease))
            elif roll < 0.7:
                note(await app.post(f"/messages/{message_id}/release", params={"lease": lease}))
            elif roll < 0.8:
                note(await app.post(f"/messages/{message_id}/reject", params={"lease": lease}))
            elif roll < 0.9:
                note(await app.post("/messages/delete", json={"leases": [lease]}))
            else:  # a delete while a release and a touch race it
                note(
                    *await asyncio.gather(
                        delete(app, message_id, lease=lease),
                        other.post(f"/messages/{message_id}/release", params={"lease": lease}),
                        app.post(f"/messages/{message_id}/touch", params={"lease": lease}),
                    )
                )

    async def mover() -> None:
        sweep = first.app[BROKER].sweep
        while time.monotonic() < stop:
            await asyncio.sleep(0.3)
            clock.advance(2)  # leases and lingers end: the sweep moves and deletes
            await sweep()
            if rng.random() < 0.3:
                note(await apps[rng.randrange(2)].delete(f"/channels/{rng.choice('abc')}"))

    await asyncio.gather(
        *(producer(k) for k in range(4)), *(consumer(k) for k in range(8)), mover()
    )
    assert len(deleted) == len(set(deleted)) > 20
    left = await _actual(first)
    assert await _counted(first) == {name: count for name, count in left.items() if count}
    refs = await _rows(first, sa.select(bodies.c.refs))
    assert all(count > 0 for (count,) in refs)
    if backend == "postgresql":  # lone deletes and deletes in groups, in this app alone
        assert 0 < routed.runs["delete"] < next(singles) // 2
    if no_deadlocks is not None:
        await no_deadlocks.check()


async def test_shared_bodies_are_read_whole_while_their_last_copies_go(
    make_client: ClientFactory, backend: str, no_deadlocks: NoDeadlocks | None
) -> None:
    """Publishes sharing bodies, received one at a time and in batches (outside the groups
    on PostgreSQL) and peeked, while drains and deletes by id remove the copies, so that
    the last copy of a body and the body itself go just as a claim or a peek reads it:
    never a 5xx, every body delivered whole, no delivery twice, counts and references
    exact at the end, and no deadlock."""
    client = await make_client(**QUIET)
    names = ("a", "b", "c")
    for name in names:
        await subscribe(client, name, "t")
    rng = random.Random(11)
    published: set[str] = set()
    delivered: list[int] = []
    stop = time.monotonic() + 1.5

    def whole(body: str) -> None:
        assert body in published, body[:40]

    async def producer() -> None:
        for k in itertools.count():
            if time.monotonic() > stop:
                return
            body = f"{k:08d}" * 200  # 1,600 bytes: stored once, shared by the copies
            published.add(body)
            await publish(client, "t", body.encode())

    async def consumer(k: int) -> None:
        while time.monotonic() < stop:
            channel = names[k % 3]
            if k % 2:
                got = await receive(client, channel, 20)
                for message in got:
                    whole(message["body"])
                delivered.extend(message["id"] for message in got)
            else:
                response = await get(client, channel)
                assert response.status in (200, 204), await response.text()
                if response.status == 200:
                    whole((await response.read()).decode())
                    delivered.append(int(response.headers["x-linger-msg-id"]))
            await asyncio.sleep(0)

    async def remover() -> None:
        while time.monotonic() < stop:
            channel = rng.choice(names)
            state = rng.choice(["ready", "hidden"])
            response = await client.get(f"/channels/{channel}/peek", params={"state": state})
            assert response.status == 200, await response.text()
            seen = (await response.json())["messages"]
            for message in seen:
                whole(message["body"])
            if seen and rng.random() < 0.7:
                doomed = rng.choice(seen)["id"]
                response = await client.delete(f"/messages/{doomed}")
                assert response.status in (204, 404), await response.text()
            else:
                assert (await client.delete(f"/channels/{channel}")).status == 204

    await asyncio.gather(
        producer(), producer(), *(consumer(k) for k in range(6)), remover(), remover()
    )
    assert len(delivered) == len(set(delivered)) > 20
    left = await _actual(client)
    assert await _counted(client) == {name: count for name, count in left.items() if count}
    referring = await _rows(
        client,
        sa.select(m.c.body_id, sa.func.count())
        .where(m.c.body_id.is_not(None))
        .group_by(m.c.body_id),
    )
    assert sorted(await _rows(client, sa.select(bodies.c.id, bodies.c.refs))) == sorted(
        tuple(row) for row in referring
    )
    if no_deadlocks is not None:
        await no_deadlocks.check()


async def test_hostile_deletes_alone_get_json_4xx_and_others_are_served(
    client: Client,
) -> None:
    """Deletes by ids and leases that cannot match (out of range, malformed, another
    message's lease, ids of nothing), one after another and 200 at once: each a JSON 4xx,
    nothing deleted, a probe answered promptly throughout."""
    kept = [await add(client, "c") for _ in range(3)]
    got = await get(client, "c")
    lease = got.headers["x-linger-lease"]
    values = [
        (str(kept[-1] + 1000), {}),
        ("-1", {}),
        (str(2**63), {}),
        ("abc", {}),
        (str(kept[1]), {"lease": lease}),
        (str(kept[0]), {"lease": "x.y"}),
        (str(kept[0]), {"lease": f"{kept[0]}.{2**62}"}),
        (str(kept[0]), {"lease": f"{kept[0]}.0"}),
        ("0", {"lease": "\udcff"}),
    ]
    async with Probe(client, "/health") as probe:
        for path, params in values:
            response = await client.delete(f"/messages/{path}", params=params)
            assert 400 <= response.status < 500, (path, params, response.status)
            assert "error" in await response.json()
        responses = await asyncio.gather(
            *(client.delete(f"/messages/{10**6 + i}") for i in range(200))
        )
        for response in responses:
            await error(response, 404, "Message not found.")
    assert probe.answered > 0
    assert probe.worst < 0.5, probe.worst
    assert (await stats(client, "c")) == {"ready": 2, "hidden": 1}
    assert await _counted(client) == await _actual(client) == {"c": 3}


class _Claims:
    """Counts ``Messages``' claims, those of them run outside the groups (``Driver.write``'s
    ``direct``), the most of those at once, and the listing marks written."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, client: Client) -> None:
        self.claims = self.direct = self.running = self.most = self.marks = 0
        messages = client.app[BROKER].storage.messages
        claim, polled, run_direct = (
            messages._claim_operation,
            messages.polled,
            messages._driver._run_direct,
        )

        def claimed(*args: Any) -> Any:
            self.claims += 1
            return claim(*args)

        async def marked(channel: str) -> None:
            self.marks += 1
            await polled(channel)

        async def direct(factory: Any) -> Any:
            self.direct += 1
            self.running += 1
            self.most = max(self.most, self.running)
            try:
                return await run_direct(factory)
            finally:
                self.running -= 1

        monkeypatch.setattr(messages, "_claim_operation", claimed)
        monkeypatch.setattr(messages, "polled", marked)
        monkeypatch.setattr(messages._driver, "_run_direct", direct)


async def test_batch_consumers_claim_outside_the_groups_and_never_share_a_message(
    make_client: ClientFactory,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
    no_deadlocks: NoDeadlocks | None,
) -> None:
    """Twelve long-polling batch consumers and two producers on one channel, with at most
    three claims outside the groups at once: on PostgreSQL the others join the groups.
    Every message is received once and deleted once, the counts stay exact, the channel
    is listed, and no deadlock."""
    monkeypatch.setattr(driver, "_DIRECT_LIMIT", 3)
    client = await make_client(**QUIET)
    counted = _Claims(monkeypatch, client)
    produced: list[int] = []
    for start in range(0, 600, 100):
        produced += await add_many(
            client, "c", [{"body": f"m{i}"} for i in range(start, start + 100)]
        )
    received: list[int] = []
    deleted: list[int] = []

    async def consumer(**query: Any) -> None:
        while got := await receive(client, "c", 25, **query):
            received.extend(m["id"] for m in got)
            answer = await acknowledge(client, "delete", {"leases": [m["lease"] for m in got]})
            assert sorted(answer["done"]) == sorted(m["id"] for m in got), answer
            deleted.extend(answer["done"])

    async def producer() -> None:
        for _ in range(4):
            produced.extend(await add_many(client, "c", [{"body": "p"}] * 50))

    await asyncio.gather(*(consumer(wait=1) for _ in range(12)), producer(), producer())
    await consumer()  # what came after the others stopped (nowait)
    assert len(received) == len(set(received))
    assert sorted(received) == sorted(deleted) == sorted(produced)
    assert await _counted(client) == await _actual(client)
    listed = await (await client.get("/channels")).json()
    assert "c" in listed["channels"]
    if backend == "postgresql":
        assert 0 < counted.direct < counted.claims
        assert counted.most == 3
        assert counted.marks < counted.claims / 2
        assert no_deadlocks is not None
        await no_deadlocks.check()
    else:
        assert counted.direct == 0


async def test_a_claim_of_many_lists_its_channel_once_a_second(
    make_client: ClientFactory, backend: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a long-polled claim of many writes the channel's listing mark at
    most once a second (the claim itself runs outside the groups); claims of a few, and
    every claim on SQLite, mark it in their own group as before."""
    client = await make_client(**QUIET)
    counted = _Claims(monkeypatch, client)
    await add_many(client, "c", [{"body": "m"}] * 100)
    for _ in range(3):
        assert len(await receive(client, "c", 20, wait=1)) == 20
    marks = 1 if backend == "postgresql" else 0
    assert counted.marks == marks
    clock.advance(1.5)
    assert len(await receive(client, "c", 20, wait=1)) == 20
    assert counted.marks == 2 * marks
    assert len(await receive(client, "c", 5, wait=1)) == 5  # a few: in its group
    assert counted.marks == 2 * marks
    assert counted.direct == (4 if backend == "postgresql" else 0)
    listed = await (await client.get("/channels")).json()
    assert "c" in listed["channels"]


async def test_a_storm_of_claims_of_many_leaves_room_for_writes_and_others(
    client: Client, backend: str, no_deadlocks: NoDeadlocks | None
) -> None:
    """200 claims of up to 1,000 at once (far more than may run outside the groups), bad
    batch sizes among them, while a producer adds: every claim is answered (the extra ones
    in groups), the adds still commit, the bad sizes get a JSON 400, no message is claimed
    twice, and a probe is answered promptly throughout."""
    await add_many(client, "s", [{"body": "m"}] * 500)

    async def claim(n: str) -> Any:
        response = await client.get("/channels/s/messages", params={"n": n, "nowait": ""})
        return response.status, await response.json()

    async with Probe(client, "/health") as probe:
        sizes = ["1000", "0", "-5", "1001", "9" * 30, "x", "1e3"] + ["1000"] * 193
        answers, added = await asyncio.gather(
            asyncio.gather(*(claim(n) for n in sizes)),
            asyncio.gather(*(add_many(client, "s", [{"body": "p"}] * 10) for _ in range(20))),
        )
    claimed = [m["id"] for status, body in answers if status == 200 for m in body["messages"]]
    for n, (status, body) in zip(sizes, answers, strict=True):
        if n == "1000":
            assert status == 200, body
        else:
            assert status == 400, (n, body)
            assert body == {"error": "Invalid batch size."}
    assert len(claimed) == len(set(claimed))
    assert len(claimed) >= 500  # those there before; the adds' maybe too
    assert sum(len(ids) for ids in added) == 200
    assert probe.answered > 0
    assert probe.worst < 0.5, probe.worst
    assert (await stats(client, "s"))["hidden"] == len(claimed)
    if no_deadlocks is not None:
        await no_deadlocks.check()
