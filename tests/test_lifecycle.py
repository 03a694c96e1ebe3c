"""The message lifecycle: leases, touch, release, reject, delays, dead letters, redrive,
detail stats and peek, through the HTTP app."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from .conftest import ClientFactory, Clock, NoDeadlocks
from .helpers import Client, Probe, add, error, get, raw, server_stats, stats
from .processes import until
from .test_topics import publish


async def deliver(client: Client, channel: str) -> tuple[int, str, Any]:
    """GET ?nowait that must deliver: (id, lease, response)."""
    response = await get(client, channel)
    assert response.status == 200, response.status
    return int(response.headers["x-linger-msg-id"]), response.headers["x-linger-lease"], response


async def detail(client: Client, channel: str) -> dict[str, Any]:
    response = await client.get(raw(f"/channels/{channel}/stats"), params={"detail": ""})
    assert response.status == 200
    result: dict[str, Any] = await response.json()
    return result


async def peek(client: Client, channel: str, **params: Any) -> list[dict[str, Any]]:
    response = await client.get(
        raw(f"/channels/{channel}/peek"), params={k: str(v) for k, v in params.items()}
    )
    assert response.status == 200, await response.text()
    result: list[dict[str, Any]] = (await response.json())["messages"]
    return result


async def act(client: Client, message_id: int, action: str, **params: Any) -> Any:
    path = f"/messages/{message_id}" + ("" if action == "delete" else f"/{action}")
    method = client.delete if action == "delete" else client.post
    return await method(path, params={k: str(v) for k, v in params.items()})


async def test_every_delivery_has_its_own_lease(client: Client, clock: Clock) -> None:
    message_id = await add(client, "c", "m", timeout=5)
    first_id, first, _response = await deliver(client, "c")
    assert first_id == message_id
    assert first.isascii()
    assert 0 < len(first) <= 64
    clock.advance(6)
    _id, second, _response = await deliver(client, "c")
    assert second != first
    for action in ("delete", "touch", "release", "reject"):
        await error(await act(client, message_id, action, lease=first), 409, "Lease is stale.")
    assert (await act(client, message_id, "touch", lease=second)).status == 204
    assert (await act(client, message_id, "delete", lease=second)).status == 204
    await error(await act(client, message_id, "delete", lease=second), 404, "Message not found.")


async def test_a_late_consumer_may_delete_when_nobody_else_got_it(
    client: Client, clock: Clock
) -> None:
    message_id = await add(client, "c", "m", timeout=5)
    _id, lease, _response = await deliver(client, "c")
    clock.advance(6)  # its timeout ran out, nobody claimed it since
    await error(await act(client, message_id, "touch", lease=lease), 409, "Message is not hidden.")
    assert (await act(client, message_id, "delete", lease=lease)).status == 204


async def test_touch_with_a_timeout_restarts_the_lease_for_that_long(
    client: Client, clock: Clock
) -> None:
    message_id = await add(client, "c", "m", timeout=5)
    _id, lease, _response = await deliver(client, "c")
    assert (await act(client, message_id, "touch", lease=lease, timeout=100)).status == 204
    clock.advance(50)
    assert await stats(client, "c") == {"ready": 0, "hidden": 1}
    clock.advance(51)
    assert await stats(client, "c") == {"ready": 1, "hidden": 0}
    # Without a lease: 1.0.1's touch, with the optional timeout.
    _id, _lease, _response = await deliver(client, "c")
    assert (await act(client, message_id, "touch", timeout=7)).status == 204
    clock.advance(8)
    assert (await get(client, "c")).headers["x-linger-delivered"] == "3"


async def test_release_gives_it_back_now_or_after_a_delay(client: Client, clock: Clock) -> None:
    message_id = await add(client, "c", "m")
    _id, lease, _response = await deliver(client, "c")
    assert (await act(client, message_id, "release", lease=lease)).status == 204
    _id, lease, again = await deliver(client, "c")
    assert again.headers["x-linger-delivered"] == "2"
    assert (await act(client, message_id, "release", lease=lease, delay=60)).status == 204
    assert (await get(client, "c")).status == 204
    assert await stats(client, "c") == {"ready": 0, "hidden": 1}
    assert (await detail(client, "c"))["delayed"] == 1
    clock.advance(60.5)  # due, and taken by the claim before the sweep would requeue it
    assert (await deliver(client, "c"))[0] == message_id
    # Without a lease, a release needs a hidden message.
    clock.advance(31)
    await error(await act(client, message_id, "release"), 409, "Message is not hidden.")


async def test_release_wakes_a_waiting_consumer(client: Client) -> None:
    message_id = await add(client, "c", "m")
    _id, lease, _response = await deliver(client, "c")
    waiting = asyncio.create_task(get(client, "c", wait=True))
    await until(lambda: _waiting(client, 1))
    assert (await act(client, message_id, "release", lease=lease)).status == 204
    response = await asyncio.wait_for(waiting, 1.0)  # at once, not at the next poll
    assert response.headers["x-linger-msg-id"] == str(message_id)


async def _waiting(client: Client, count: int) -> bool:
    return bool((await server_stats(client))["current-waiters"] == count)


async def test_delayed_message_is_counted_hidden_until_due_then_delivered(
    make_client: ClientFactory, clock: Clock
) -> None:
    client = await make_client(poll_max=5.0)
    message_id = await add(client, "c", "later", delay=30)
    assert (await get(client, "c")).status == 204
    assert await stats(client, "c") == {"ready": 0, "hidden": 1}
    assert await detail(client, "c") == {
        "ready": 0,
        "hidden": 0,
        "delayed": 1,
        "oldest_ready_age": 0,
        "dead_from": [],
    }
    assert [m["id"] for m in await peek(client, "c", state="delayed")] == [message_id]
    waiting = asyncio.create_task(get(client, "c", wait=True))
    await until(lambda: _waiting(client, 1))
    clock.advance(31)  # it comes due: the poller wakes the waiting consumer
    response = await asyncio.wait_for(waiting, 3.0)
    assert response.status == 200
    assert response.headers["x-linger-msg-id"] == str(message_id)


async def test_exhausted_message_moves_to_its_dead_channel_with_its_identity(
    client: Client, clock: Clock
) -> None:
    message_id = await add(
        client, "work", "payload", deliver=2, dead="dead", priority=-3, timeout=5
    )
    for _ in range(2):
        await deliver(client, "work")
        clock.advance(6)
    # Used up: delivered nowhere, not even before the sweep moved it.
    assert (await get(client, "work")).status == 204
    await until(lambda: _ready_in(client, "dead", 1))
    dead_id, _lease, response = await deliver(client, "dead")
    assert dead_id == message_id
    assert await response.read() == b"payload"
    assert response.headers["Content-Type"] == "text/plain"
    assert response.headers["x-linger-dead-from"] == "work"
    assert response.headers["x-linger-dead-reason"] == "deliveries"
    assert response.headers["x-linger-priority"] == "-3"
    # No delivery limit and no retention in the dead channel.
    assert (response.headers["x-linger-deliver"], response.headers["x-linger-linger"]) == ("0", "0")
    clock.advance(6)
    assert (await deliver(client, "dead"))[0] == message_id
    counters = await server_stats(client)
    assert counters["msg-dead"] >= 1


async def _ready_in(client: Client, channel: str, count: int) -> bool:
    return (await stats(client, channel))["ready"] == count


async def test_reject_moves_at_once_or_discards(client: Client) -> None:
    kept = await add(client, "work", "bad", dead="dead")
    _id, lease, _response = await deliver(client, "work")
    assert (await act(client, kept, "reject", lease=lease)).status == 204
    assert await stats(client, "dead") == {"ready": 1, "hidden": 0}
    dead = (await peek(client, "dead"))[0]
    assert (dead["id"], dead["dead_from"], dead["dead_reason"]) == (kept, "work", "rejected")
    dropped = await add(client, "work", "worse")
    _id, lease, _response = await deliver(client, "work")
    assert (await act(client, dropped, "reject", lease=lease)).status == 204
    await error(await client.delete(f"/messages/{dropped}"), 404)
    assert await stats(client, "work") == {"ready": 0, "hidden": 0}


async def test_dead_letter_survives_the_mark_of_its_dead_channel(
    make_client: ClientFactory,
) -> None:
    client = await make_client(hlm=1)
    await add(client, "dead")
    message_id = await add(client, "work", dead="dead")
    _id, lease, _response = await deliver(client, "work")
    assert (await act(client, message_id, "reject", lease=lease)).status == 204
    assert await stats(client, "dead") == {"ready": 2, "hidden": 0}


async def test_redrive_of_a_thousand_dead_letters_restores_them(client: Client) -> None:
    for i in range(1000):
        await client.post(
            "/channels/work",
            data=f"m{i}".encode(),
            params={"dead": "dead", "deliver": "3", "linger": "3600", "priority": str(i % 3)},
            headers={"Content-Type": "text/plain"},
        )
    rejected = 0
    while (got := await get(client, "work")).status == 200:
        message_id = int(got.headers["x-linger-msg-id"])
        lease = got.headers["x-linger-lease"]
        assert (await act(client, message_id, "reject", lease=lease)).status == 204
        rejected += 1
    assert rejected == 1000
    assert (await detail(client, "dead"))["dead_from"] == ["work"]
    response = await client.post("/channels/dead/redrive")
    assert response.status == 200
    assert await response.json() == {"moved": 1000}
    assert await stats(client, "dead") == {"ready": 0, "hidden": 0}
    assert await stats(client, "work") == {"ready": 1000, "hidden": 0}
    got = await get(client, "work")
    assert got.headers["x-linger-delivered"] == "1"
    assert (got.headers["x-linger-deliver"], got.headers["x-linger-linger"]) == ("3", "3600")
    assert "x-linger-dead-from" not in got.headers
    assert (await server_stats(client))["msg-redriven"] == 1000


async def test_redrive_n_to_another_channel_wakes_its_consumer(client: Client) -> None:
    ids = []
    for i in range(3):
        ids.append(await add(client, "work", f"m{i}", dead="dead"))
        _id, lease, _response = await deliver(client, "work")
        assert (await act(client, ids[-1], "reject", lease=lease)).status == 204
    waiting = asyncio.create_task(get(client, "retry", wait=True))
    await until(lambda: _waiting(client, 1))
    response = await client.post("/channels/dead/redrive", params={"to": "retry", "n": "2"})
    assert await response.json() == {"moved": 2}
    got = await asyncio.wait_for(waiting, 1.0)
    assert got.headers["x-linger-msg-id"] == str(ids[0])
    assert await stats(client, "dead") == {"ready": 1, "hidden": 0}


async def test_topic_copies_take_the_subscriptions_delay_and_dead_channel(
    client: Client, clock: Clock
) -> None:
    response = await client.put(
        "/channels/sub/topics/t", params={"deliver": "1", "dead": "graveyard", "delay": "10"}
    )
    assert response.status == 204
    ids = await publish(client, "t")
    assert (await get(client, "sub")).status == 204  # delayed
    clock.advance(11)
    _id, _lease, _response = await deliver(client, "sub")
    clock.advance(31)
    await until(lambda: _ready_in(client, "graveyard", 1))
    assert (await peek(client, "graveyard"))[0]["id"] == ids["sub"]


async def test_detail_and_peek_show_each_state(client: Client, clock: Clock) -> None:
    ready = [await add(client, "c", f"r{i}", priority=p) for i, p in enumerate([2, 1, 3])]
    hidden = await add(client, "c", "h", priority=0)
    _id, _lease, _response = await deliver(client, "c")  # the priority 0 one
    delayed = await add(client, "c", "d", delay=100)
    clock.advance(7)
    shown = await detail(client, "c")
    assert shown == {"ready": 3, "hidden": 1, "delayed": 1, "oldest_ready_age": 7, "dead_from": []}
    assert [m["id"] for m in await peek(client, "c")] == [ready[1], ready[0], ready[2]]
    assert [m["id"] for m in await peek(client, "c", n=1)] == [ready[1]]
    assert [m["id"] for m in await peek(client, "c", state="hidden")] == [hidden]
    assert [m["id"] for m in await peek(client, "c", state="delayed")] == [delayed]
    first = (await peek(client, "c"))[0]
    assert first == {
        "id": ready[1],
        "channel": "c",
        "priority": 1,
        "timeout": 30,
        "deliver": 0,
        "delivered": 0,
        "received": 7,
        "linger": 0,
        "topic": "",
        "content_type": "text/plain",
        "body": "r1",
        "encoding": "utf-8",
        "dead_from": None,
        "dead_reason": None,
    }
    # Peeking leases and counts nothing.
    assert await stats(client, "c") == {"ready": 3, "hidden": 2}


async def test_peek_shows_binary_bodies_as_base64(client: Client) -> None:
    await client.post("/channels/c", data=b"\xff\x00\xfe", headers={"Content-Type": "a/b"})
    shown = (await peek(client, "c"))[0]
    assert (shown["body"], shown["encoding"]) == ("/wD+", "base64")


async def test_wait_bounds_the_long_poll(make_client: ClientFactory) -> None:
    client = await make_client(poll_max=3.0)
    started = asyncio.get_running_loop().time()
    response = await client.get("/channels/c", params={"wait": "1"})
    assert response.status == 204
    assert 0.9 < asyncio.get_running_loop().time() - started < 2.5
    assert (await client.get("/channels/c", params={"wait": "0"})).status == 204


@pytest.mark.parametrize(
    ("method", "path", "query", "text"),
    [
        ("post", "/channels/c", {"delay": "-1"}, "Invalid message delay."),
        ("post", "/channels/c", {"delay": "1.5"}, "Invalid message delay."),
        ("post", "/channels/c", {"dead": "c"}, "Invalid dead-letter channel."),
        ("post", "/channels/c", {"dead": ""}, "Invalid dead-letter channel."),
        ("post", "/channels/c", {"dead": "x" * 251}, "Invalid dead-letter channel."),
        ("post", "/channels/c", {"dead": "a\nb"}, "Invalid dead-letter channel."),
        ("put", "/channels/c/topics/t", {"dead": "c"}, "Invalid dead-letter channel."),
        ("put", "/channels/c/topics/t", {"delay": "x"}, "Invalid message delay."),
        ("get", "/channels/c", {"wait": "-1"}, "Invalid wait."),
        ("get", "/channels/c", {"wait": "99999"}, "Invalid wait."),
        ("get", "/channels/c", {"wait": "1.5"}, "Invalid wait."),
        ("get", "/channels/c/peek", {"n": "0"}, "Invalid batch size."),
        ("get", "/channels/c/peek", {"n": "1001"}, "Invalid batch size."),
        ("get", "/channels/c/peek", {"state": "gone"}, "Invalid state."),
        ("post", "/channels/d/redrive", {"to": "d"}, "Invalid redrive target."),
        ("post", "/channels/d/redrive", {"n": "0"}, "Invalid batch size."),
    ],
)
async def test_bad_lifecycle_parameters_are_400(
    client: Client, method: str, path: str, query: dict[str, str], text: str
) -> None:
    kwargs: dict[str, Any] = {"params": query}
    if method == "post" and path == "/channels/c":
        kwargs.update(data=b"m", headers={"Content-Type": "t/p"})
    response = await getattr(client, method)(path, **kwargs)
    await error(response, 400, text)
    assert await stats(client, "c") == {"ready": 0, "hidden": 0}


async def test_dead_channel_name_that_is_not_utf8_is_400(client: Client) -> None:
    response = await client.post(
        raw("/channels/c?dead=%FF"), data=b"m", headers={"Content-Type": "t/p"}
    )
    await error(response, 400, "Invalid dead-letter channel.")


@pytest.mark.parametrize(
    "lease",
    ["", "x", "1", "1.", ".1", "1.2.3", "1.-2", "1.99999999999999999999", "é.1", "2.5", " 1.5"],
)
async def test_lease_that_cannot_be_this_messages_is_400(client: Client, lease: str) -> None:
    message_id = await add(client, "c")
    assert message_id == 1
    _id, current, _response = await deliver(client, "c")
    for action in ("delete", "touch", "release", "reject"):
        await error(await act(client, 1, action, lease=lease), 400, "Invalid lease.")
    assert await stats(client, "c") == {"ready": 0, "hidden": 1}
    assert (await act(client, 1, "delete", lease=current)).status == 204


async def test_bad_timeout_and_delay_on_lease_routes_are_400(client: Client) -> None:
    message_id = await add(client, "c")
    _id, lease, _response = await deliver(client, "c")
    response = await act(client, message_id, "touch", lease=lease, timeout=0)
    await error(response, 400, "Invalid message visibility timeout.")
    response = await act(client, message_id, "release", lease=lease, delay=-5)
    await error(response, 400, "Invalid message delay.")
    await error(await act(client, 99, "release"), 404, "Message not found.")


async def test_a_flood_of_forged_leases_changes_nothing_and_holds_nobody_up(
    client: Client,
) -> None:
    ids = [await add(client, "c", f"m{i}") for i in range(20)]
    held = [await deliver(client, "c") for _ in ids]
    rng = random.Random(3)
    async with Probe(client) as probe:
        responses = await asyncio.gather(
            *(
                act(
                    client,
                    rng.choice(ids),
                    rng.choice(["delete", "touch", "release", "reject"]),
                    lease=f"{rng.choice(ids)}.{rng.getrandbits(62)}",
                )
                for _ in range(400)
            )
        )
    assert {r.status for r in responses} <= {400, 409}
    # The probe queues behind the 400 requests sent at once from the same event loop
    # (~0.2 s here); a server frozen by them would take seconds.
    assert probe.worst < 1.0, probe.worst
    assert await stats(client, "c") == {"ready": 0, "hidden": 20}
    for message_id, lease, _response in held:
        assert (await act(client, message_id, "delete", lease=lease)).status == 204


async def test_racing_release_delete_and_timeout_never_leave_two_current_leases(
    client: Client, clock: Clock, no_deadlocks: NoDeadlocks | None
) -> None:
    """Consumers claim, release, delete and let time out one message at once: whatever
    wins, at most one lease is current (accepted) per delivery, and a delete succeeds at
    most once."""
    rng = random.Random(11)
    for _round in range(30):
        message_id = await add(client, "race", "m", timeout=5)
        holders: list[str] = []

        async def consumer(holders: list[str] = holders) -> None:
            got = await get(client, "race")
            if got.status == 200:
                holders.append(got.headers["x-linger-lease"])

        await asyncio.gather(*(consumer() for _ in range(4)))
        assert len(holders) == 1  # one delivery at a time
        lease = holders[0]
        clock.advance(rng.choice([0, 6]))
        responses = await asyncio.gather(
            act(client, message_id, "release", lease=lease),
            act(client, message_id, "delete", lease=lease),
            consumer(),
            act(client, message_id, "touch", lease=lease),
        )
        statuses = [r.status for r in responses if r is not None]
        assert set(statuses) <= {204, 404, 409}, statuses  # 404: after the delete won
        assert statuses.count(204) >= 1 or 404 not in statuses
        # Of every lease handed out for the message, one at most is still current: a
        # delete by each of them succeeds once at most.
        rng.shuffle(holders)
        deleted = [(await act(client, message_id, "delete", lease=h)).status for h in holders]
        assert deleted.count(204) <= 1, deleted
        assert set(deleted) <= {204, 404, 409}, deleted
        await client.delete(f"/messages/{message_id}")
    if no_deadlocks is not None:
        await no_deadlocks.check()


async def test_eight_consumers_never_share_a_message_while_it_is_leased(
    client: Client, no_deadlocks: NoDeadlocks | None
) -> None:
    ids = set()
    for i in range(300):
        ids.add(await add(client, "many", f"m{i}"))
    delivered: list[int] = []
    deleted: set[int] = set()
    rng = random.Random(5)

    async def consumer() -> None:
        while True:
            got = await get(client, "many")
            if got.status == 204:
                return
            message_id = int(got.headers["x-linger-msg-id"])
            lease = got.headers["x-linger-lease"]
            delivered.append(message_id)
            if rng.random() < 0.2:
                assert (await act(client, message_id, "release", lease=lease)).status == 204
                continue
            assert (await act(client, message_id, "delete", lease=lease)).status == 204
            deleted.add(message_id)

    await asyncio.gather(*(consumer() for _ in range(8)))
    assert deleted == ids
    assert len(delivered) - len(set(delivered)) == len(delivered) - len(ids)
    if no_deadlocks is not None:
        await no_deadlocks.check()
