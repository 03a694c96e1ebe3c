"""Topics and subscriptions: subscribe, publish fan-out, listings and counters."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa

from linger.store import db

from .conftest import ClientFactory
from .helpers import Client, add, connection, error, get, raw, server_stats, stats


async def subscribe(client: Client, channel: str, topic: str, **options: Any) -> None:
    response = await client.put(
        raw(f"/channels/{channel}/topics/{topic}"), params={k: str(v) for k, v in options.items()}
    )
    assert response.status == 204, await response.text()


async def publish(
    client: Client, topic: str, body: bytes = b"news", **kwargs: Any
) -> dict[str, int]:
    response = await client.post(
        raw(f"/topics/{topic}"), data=body, headers={"Content-Type": "application/json"}, **kwargs
    )
    assert response.status == 202, await response.text()
    result: dict[str, int] = await response.json()
    return result


async def listing(client: Client, path: str) -> list[str]:
    response = await client.get(raw(path))
    assert response.status == 200
    body = await response.json()
    return list(body[next(iter(body))])


async def test_publish_without_subscribers_is_empty(client: Client) -> None:
    assert await publish(client, "nobody") == {}
    assert (await server_stats(client))["publish"] == 1


async def test_publish_copies_to_each_subscriber_with_its_options(client: Client) -> None:
    await subscribe(client, "audit", "orders", priority=5, timeout=60, deliver=3, linger=3600)
    await subscribe(client, "billing", "orders")
    ids = await publish(client, "orders", b'{"order": 42}', params={"priority": "-9"})
    assert set(ids) == {"audit", "billing"}
    assert ids["audit"] != ids["billing"]
    audit = await get(client, "audit")
    assert await audit.read() == b'{"order": 42}'
    assert audit.headers["Content-Type"] == "application/json"
    assert audit.headers["x-linger-msg-id"] == str(ids["audit"])
    assert audit.headers["x-linger-topic"] == "orders"
    assert (
        audit.headers["x-linger-priority"],
        audit.headers["x-linger-timeout"],
        audit.headers["x-linger-deliver"],
        audit.headers["x-linger-linger"],
    ) == ("5", "60", "3", "3600")
    billing = await get(client, "billing")
    assert billing.headers["x-linger-priority"] == "0"
    assert billing.headers["x-linger-timeout"] == "30"
    assert billing.headers["x-linger-topic"] == "orders"


async def test_publish_form_message(client: Client) -> None:
    await subscribe(client, "c", "t")
    response = await client.post("/topics/t", data={"msg": "Have you heard!"})
    assert response.status == 202
    got = await get(client, "c")
    assert await got.read() == b"Have you heard!"
    assert got.headers["Content-Type"] == "text/plain"


async def test_subscription_options_from_form_body(client: Client) -> None:
    response = await client.put("/channels/c/topics/t", data={"linger": "60", "priority": "2"})
    assert response.status == 204
    await publish(client, "t")
    got = await get(client, "c")
    assert (got.headers["x-linger-linger"], got.headers["x-linger-priority"]) == ("60", "2")


async def test_subscribe_again_replaces_options(client: Client) -> None:
    await subscribe(client, "c", "t", priority=1)
    await subscribe(client, "c", "t", priority=7)
    ids = await publish(client, "t")
    assert list(ids) == ["c"]
    assert (await get(client, "c")).headers["x-linger-priority"] == "7"
    assert await listing(client, "/topics/t/channels") == ["c"]
    assert (await server_stats(client))["current-subscriptions"] == 1


@pytest.mark.parametrize(
    ("query", "text"),
    [
        ({"priority": "high"}, "Invalid message priority."),
        ({"timeout": "0"}, "Invalid message visibility timeout."),
        ({"deliver": "-2"}, "Invalid message delivery limit."),
        ({"linger": "1e3"}, "Invalid message retention period."),
    ],
)
async def test_invalid_subscription_keeps_the_old_one(
    client: Client, query: dict[str, str], text: str
) -> None:
    await subscribe(client, "c", "t", priority=3)
    response = await client.put("/channels/c/topics/t", params=query)
    await error(response, 400, text)
    await error(await client.put("/channels/new/topics/t", params=query), 400, text)
    assert await listing(client, "/topics/t/channels") == ["c"]
    await publish(client, "t")
    assert (await get(client, "c")).headers["x-linger-priority"] == "3"


async def test_unsubscribe_stops_copies_and_keeps_queued_ones(client: Client) -> None:
    await subscribe(client, "c", "t")
    await publish(client, "t")
    response = await client.delete("/channels/c/topics/t")
    assert response.status == 204
    assert await publish(client, "t") == {}
    assert (await stats(client, "c"))["ready"] == 1
    assert (await client.delete("/channels/c/topics/t")).status == 204
    assert (await client.delete("/channels/never/topics/t")).status == 204
    counters = await server_stats(client)
    assert (counters["subscription-add"], counters["subscription-delete"]) == (1, 1)


async def test_listings_are_sorted(client: Client) -> None:
    for channel, topic in [("b", "y"), ("a", "y"), ("a", "x"), ("c", "z"), ("%C3%A9", "x")]:
        await subscribe(client, channel, topic)
    assert await listing(client, "/topics") == ["x", "y", "z"]
    assert await listing(client, "/topics/x/channels") == ["a", "é"]
    assert await listing(client, "/topics/y/channels") == ["a", "b"]
    assert await listing(client, "/channels/a/topics") == ["x", "y"]
    assert await listing(client, "/channels/nobody/topics") == []
    assert await listing(client, "/topics/none/channels") == []
    # A channel with a subscription exists even when it has no messages.
    assert await listing(client, "/channels") == ["a", "b", "c", "é"]
    await client.delete("/channels/c/topics/z")
    assert await listing(client, "/topics") == ["x", "y"]
    assert await listing(client, "/channels") == ["a", "b", "é"]
    counters = await server_stats(client)
    assert (counters["current-topics"], counters["current-subscriptions"]) == (2, 4)


async def test_fan_out_to_100_channels_in_one_publish(client: Client) -> None:
    channels = [f"sub{i:03}" for i in range(100)]
    for channel in channels:
        await subscribe(client, channel, "wide")
    ids = await publish(client, "wide", b"everyone")
    assert sorted(ids) == channels
    assert len(set(ids.values())) == 100
    for channel in channels[::17]:
        got = await get(client, channel)
        assert got.headers["x-linger-msg-id"] == str(ids[channel])
    assert (await server_stats(client))["current-messages"] == 100


_FAIL_TRIGGER = {
    "sqlite": [
        "CREATE TRIGGER fail_c13 BEFORE INSERT ON messages WHEN NEW.channel = 'c13' "
        "BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
    ],
    "postgresql": [
        "CREATE FUNCTION fail_c13() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.channel = 'c13' THEN RAISE EXCEPTION 'injected failure'; END IF; "
        "RETURN NEW; END $$",
        "CREATE TRIGGER fail_c13 BEFORE INSERT ON messages FOR EACH ROW "
        "EXECUTE FUNCTION fail_c13()",
    ],
}
_DROP_TRIGGER = {
    "sqlite": ["DROP TRIGGER fail_c13"],
    "postgresql": ["DROP TRIGGER fail_c13 ON messages", "DROP FUNCTION fail_c13()"],
}


async def _execute(url: str, statements: list[str]) -> None:
    engine = db.create_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.exec_driver_sql(statement)
    finally:
        await engine.dispose()


async def test_publish_is_all_or_nothing(client: Client, database_url: str, backend: str) -> None:
    for i in range(20):
        await subscribe(client, f"c{i}", "t")
    # Make the insert of one copy fail inside the database: no other copy may remain.
    await _execute(database_url, _FAIL_TRIGGER[backend])
    try:
        response = await client.post("/topics/t", data=b"m", headers={"Content-Type": "t/p"})
        assert response.status == 500
    finally:
        await _execute(database_url, _DROP_TRIGGER[backend])
    assert (await server_stats(client))["current-messages"] == 0
    ids = await publish(client, "t")
    assert len(ids) == 20
    assert (await server_stats(client))["current-messages"] == 20


async def test_waiting_consumer_is_woken_by_publish(make_client: ClientFactory) -> None:
    client = await make_client(poll_interval=5.0)
    await subscribe(client, "inbox", "t")
    waiting = asyncio.create_task(get(client, "inbox", wait=True))
    deadline = asyncio.get_running_loop().time() + 3
    while (await server_stats(client))["current-waiters"] < 1:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    started = asyncio.get_running_loop().time()
    ids = await publish(client, "t")
    response = await asyncio.wait_for(waiting, 1)
    assert asyncio.get_running_loop().time() - started < 0.5
    assert response.headers["x-linger-msg-id"] == str(ids["inbox"])


async def test_channel_at_high_level_mark_is_skipped(make_client: ClientFactory) -> None:
    client = await make_client(hlm=1)
    await subscribe(client, "full", "t")
    await subscribe(client, "free", "t")
    await add(client, "full", "already there")
    ids = await publish(client, "t")
    assert list(ids) == ["free"]
    counters = await server_stats(client)
    assert (counters["publish"], counters["publish-skipped"]) == (1, 1)
    assert (await stats(client, "full"))["ready"] == 1


@pytest.mark.parametrize("body", [b""])
async def test_empty_publish_is_400_even_without_subscribers(client: Client, body: bytes) -> None:
    response = await client.post(
        "/topics/nobody", data=body, headers={"Content-Type": "text/plain"}
    )
    await error(response, 400, "Message is empty.")
    await error(await client.post("/topics/nobody", data={"other": "x"}), 400, "Message is empty.")


async def test_oversized_publish_is_413_even_without_subscribers(
    make_client: ClientFactory,
) -> None:
    client = await make_client(max_size=8)
    response = await client.post(
        "/topics/nobody", data=b"123456789", headers={"Content-Type": "text/plain"}
    )
    await error(response, 413, "Message is larger than 8 bytes.")


@pytest.mark.parametrize("path", ["/topics/%01", "/channels/c/topics/%FF", "/topics/" + "t" * 251])
async def test_bad_topic_name_is_400(client: Client, path: str) -> None:
    for method in ("POST", "PUT", "DELETE"):
        response = await client.request(
            method, raw(path), data=b"m", headers={"Content-Type": "text/plain"}
        )
        if response.status != 405:
            await error(response, 400, "Invalid topic name.")
    if path.startswith("/topics"):
        await error(await client.get(raw(path + "/channels")), 400)


async def test_concurrent_subscribe_unsubscribe_publish(client: Client) -> None:
    """No errors, and no copy for a channel published to after its unsubscribe returned."""
    unsubscribed: dict[str, float] = {}
    errors: list[str] = []
    published: list[tuple[float, dict[str, int]]] = []
    loop = asyncio.get_running_loop()

    async def churn(channel: str) -> None:
        for _ in range(5):
            await subscribe(client, channel, "hot")
            response = await client.delete(f"/channels/{channel}/topics/hot")
            if response.status != 204:
                errors.append(f"unsubscribe {response.status}")
        unsubscribed[channel] = loop.time()

    async def publisher() -> None:
        for _ in range(30):
            started = loop.time()
            try:
                ids = await publish(client, "hot")
            except AssertionError as failure:
                errors.append(str(failure))
                continue
            published.append((started, ids))

    channels = [f"ch{i}" for i in range(6)]
    await asyncio.gather(*(churn(c) for c in channels), publisher(), publisher())
    assert errors == []
    for started, ids in published:
        for channel in ids:
            assert not (channel in unsubscribed and started > unsubscribed[channel])
    assert await publish(client, "hot") == {}
    assert await listing(client, "/topics") == []


async def test_publish_through_a_real_session(client: Client) -> None:
    await subscribe(client, "c", "t")
    form = aiohttp.FormData()
    form.add_field("msg", "multipart news")
    response = await client.post("/topics/t", data=form)
    assert response.status == 202
    assert await (await get(client, "c")).read() == b"multipart news"


async def test_a_shared_body_gone_is_a_logged_500_never_an_empty_message(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Should a copy's shared body ever be missing (a database edited by hand), a claim
    or a peek of it answers 500 and logs which message and body, rather than deliver the
    copy's own empty body as if it were the message; other messages are served."""
    for name in ("a", "b"):
        await subscribe(client, name, "t")
    await publish(client, "t", b"s" * 2000)
    await add(client, "a", "own")
    async with connection(client) as conn:
        await conn.execute(sa.delete(db.bodies))
    await error(await client.get("/channels/a/peek"), 500)
    await error(await get(client, "a"), 500)
    await error(await client.get("/channels/b/messages", params={"n": "20", "nowait": ""}), 500)
    assert "which is gone" in caplog.text
    async with connection(client) as conn:
        await conn.execute(sa.delete(db.messages).where(db.messages.c.body_id.is_not(None)))
    got = await get(client, "a")
    assert got.status == 200
    assert await got.read() == b"own"
