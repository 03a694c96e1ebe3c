"""Each migration upgrades a database that holds data, which keeps working after it, and
downgrades again without losing messages."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from alembic import command

from linger.store import db

from .conftest import ClientFactory, Clock
from .helpers import get, stats
from .test_schema import fresh_url  # noqa: F401 - a fixture
from .test_topics import publish

_INSERT_0001 = (
    "INSERT INTO messages (channel, priority, timeout, deliver, linger, topic, content_type,"
    " body, created_at, visible_at, dead_at, deliveries) VALUES "
    "(:channel, :priority, :timeout, :deliver, :linger, :topic, 'text/plain', :body,"
    " :created_at, :visible_at, :dead_at, :deliveries)"
)


def _to(revision: str) -> Any:
    def run(connection: sa.Connection) -> None:
        command.upgrade(db.alembic_config(connection), revision)

    return run


def _down_to(revision: str) -> Any:
    def run(connection: sa.Connection) -> None:
        command.downgrade(db.alembic_config(connection), revision)

    return run


def _messages_0001(now: int) -> list[dict[str, Any]]:
    """Messages in every state the first schema knows, all alive."""
    base = {"priority": 0, "timeout": 30, "deliver": 0, "linger": 0, "topic": ""}
    base |= {"created_at": now - 5000, "visible_at": 0, "dead_at": None, "deliveries": 0}
    return [
        {**base, "channel": "ready", "body": b"first"},
        {**base, "channel": "ready", "body": b"urgent", "priority": -1},
        {**base, "channel": "ready", "body": b"second"},
        # Delivered once, hidden for 20 s more.
        {**base, "channel": "hidden", "body": b"h", "visible_at": now + 20_000, "deliveries": 1},
        # At most one delivery, which it had: dead once its timeout runs out (in 10 s).
        {
            **base,
            "channel": "limited",
            "body": b"once",
            "deliver": 1,
            "deliveries": 1,
            "visible_at": now + 10_000,
            "dead_at": now + 10_000,
        },
        # Kept 60 s after it was added.
        {**base, "channel": "kept", "body": b"k", "linger": 60, "dead_at": now + 55_000},
        {**base, "channel": "copies", "body": b"news", "topic": "t"},
    ]


async def test_upgrade_from_0001_keeps_every_message_working(
    fresh_url: str,  # noqa: F811
    make_client: ClientFactory,
    clock: Clock,
) -> None:
    now = int(time.time() * 1000)
    engine = db.create_engine(fresh_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_to("0001"))
            for row in _messages_0001(now):
                await conn.execute(sa.text(_INSERT_0001), row)
            await conn.execute(
                sa.text(
                    "INSERT INTO channels (name, polled_at) VALUES ('ready', :t), ('idle', :t)"
                ),
                {"t": now},
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO subscriptions (topic, channel, priority, timeout, deliver, linger)"
                    " VALUES ('t', 'copies', 0, 30, 0, 0)"
                )
            )
        async with engine.begin() as conn:
            await conn.run_sync(_to("head"))
            counts: dict[str, int] = dict(
                (await conn.execute(sa.text("SELECT name, messages FROM channels"))).all()
            )
        assert counts == {"ready": 3, "idle": 0, "hidden": 1, "limited": 1, "kept": 1, "copies": 1}
    finally:
        await engine.dispose()

    client = await make_client(db=fresh_url, hlm=3)
    # Delivered before the upgrade: in flight (leased), not delayed.
    hidden = await (await client.get("/channels/hidden/stats", params={"detail": ""})).json()
    assert (hidden["hidden"], hidden["delayed"]) == (1, 0)
    ready = [await (await get(client, "ready")).read() for _ in range(3)]
    assert ready == [b"urgent", b"first", b"second"]
    assert (await get(client, "hidden")).status == 204
    assert await stats(client, "limited") == {"ready": 0, "hidden": 1}
    # The kept count is exact: "ready" is at the mark of 3.
    response = await client.post("/channels/ready", data=b"m", headers={"Content-Type": "t/p"})
    assert response.status == 507
    await publish(client, "t")
    assert await stats(client, "copies") == {"ready": 2, "hidden": 0}
    clock.advance(21)
    got = await get(client, "hidden")
    assert (await got.read(), got.headers["x-linger-delivered"]) == (b"h", "2")
    assert await stats(client, "limited") == {"ready": 0, "hidden": 0}  # its one delivery
    clock.advance(40)
    assert await stats(client, "kept") == {"ready": 0, "hidden": 0}  # its 60 s are over


async def test_downgrade_to_0001_gives_shared_bodies_back_to_their_copies(
    fresh_url: str,  # noqa: F811
    make_client: ClientFactory,
) -> None:
    client = await make_client(db=fresh_url, migrate=True)
    for name in ("a", "b"):
        assert (await client.put(f"/channels/{name}/topics/t")).status == 204
    body = b"b" * 5000
    await publish(client, "t", body)
    await client.close()
    engine = db.create_engine(fresh_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_down_to("0001"))
            rows = (await conn.execute(sa.text("SELECT channel, body FROM messages"))).all()
        assert sorted(rows) == [("a", body), ("b", body)]
    finally:
        await engine.dispose()


_INSERT_0002 = (
    "INSERT INTO messages (channel, priority, timeout, deliver, linger, topic, content_type,"
    " body, created_at, visible_at, dead_at, deliveries, body_id) VALUES "
    "(:channel, 0, 30, :deliver, 0, :topic, 'text/plain', :body, :created_at, :visible_at,"
    " :dead_at, :deliveries, :body_id)"
)


async def test_upgrade_from_0002_keeps_counts_bodies_and_deliveries(
    fresh_url: str,  # noqa: F811
    make_client: ClientFactory,
    clock: Clock,
) -> None:
    now = int(time.time() * 1000)
    rows = [
        {"channel": "q", "body": b"ready", "visible_at": 0, "deliveries": 0},
        {"channel": "q", "body": b"inflight", "visible_at": now + 20_000, "deliveries": 1},
        {"channel": "q", "body": b"expired", "visible_at": now - 1_000, "deliveries": 1},
        {"channel": "a", "body": b"", "visible_at": 0, "deliveries": 0, "body_id": 1},
        {"channel": "b", "body": b"", "visible_at": 0, "deliveries": 0, "body_id": 1},
    ]
    engine = db.create_engine(fresh_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_to("0002"))
            await conn.execute(
                sa.text("INSERT INTO bodies (id, refs, body) VALUES (1, 2, :body)"),
                {"body": b"shared"},
            )
            for row in rows:
                values = {"deliver": 0, "topic": "", "created_at": now - 3000, "dead_at": None}
                await conn.execute(sa.text(_INSERT_0002), {"body_id": None, **values, **row})
            await conn.execute(
                sa.text(
                    "INSERT INTO channels (name, polled_at, messages) VALUES "
                    "('q', 0, 3), ('a', 0, 1), ('b', 0, 1)"
                )
            )
        async with engine.begin() as conn:
            await conn.run_sync(_to("head"))
    finally:
        await engine.dispose()
    client = await make_client(db=fresh_url, hlm=3)
    shown = await (await client.get("/channels/q/stats", params={"detail": ""})).json()
    assert (shown["ready"], shown["hidden"], shown["delayed"]) == (2, 1, 0)
    # In the queue's order: the message whose timeout ran out first (older id).
    first = await get(client, "q")
    assert await first.read() == b"ready"
    assert "x-linger-lease" in first.headers
    second = await get(client, "q")
    assert await second.read() == b"expired"
    for name in ("a", "b"):
        assert await (await get(client, name)).read() == b"shared"
    # The kept count still holds the mark.
    response = await client.post("/channels/q", data=b"m", headers={"Content-Type": "t/p"})
    assert response.status == 507


async def test_downgrade_to_0002_keeps_dead_letters_as_messages(
    fresh_url: str,  # noqa: F811
    make_client: ClientFactory,
) -> None:
    client = await make_client(db=fresh_url, migrate=True)
    response = await client.post(
        "/channels/w", data=b"m", params={"dead": "d"}, headers={"Content-Type": "t/p"}
    )
    message_id = (await response.json())["id"]
    got = await get(client, "w")
    lease = got.headers["x-linger-lease"]
    assert (
        await client.post(f"/messages/{message_id}/reject", params={"lease": lease})
    ).status == 204
    await client.close()
    engine = db.create_engine(fresh_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_down_to("0002"))
            rows = (await conn.execute(sa.text("SELECT id, channel, body FROM messages"))).all()
        assert rows == [(message_id, "d", b"m")]
    finally:
        await engine.dispose()


async def test_upgrade_from_0003_counts_priorities_from_the_new_index(
    fresh_url: str,  # noqa: F811
    make_client: ClientFactory,
) -> None:
    """Messages of every priority (ready, in flight, delayed) written at 0003 are counted
    by /stats after 0004 added the priority index, and delivered in priority order; the
    downgrade drops the index and keeps them."""
    now = int(time.time() * 1000)
    insert = (
        "INSERT INTO messages (channel, priority, timeout, deliver, linger, topic, content_type,"
        " body, created_at, visible_at, dead_at, deliveries, lease) VALUES "
        "(:channel, :priority, 30, 0, 0, '', 'text/plain', :body, :created_at, :visible_at,"
        " NULL, :deliveries, :lease)"
    )
    rows = [
        {"priority": 0, "body": b"plain", "visible_at": 0, "deliveries": 0, "lease": None},
        {"priority": -5, "body": b"urgent", "visible_at": 0, "deliveries": 0, "lease": None},
        {"priority": 3, "body": b"nice", "visible_at": 0, "deliveries": 0, "lease": None},
        {"priority": -1, "body": b"out", "visible_at": now + 20_000, "deliveries": 1, "lease": 7},
        {
            "priority": 2,
            "body": b"later",
            "visible_at": now + 60_000,
            "deliveries": 0,
            "lease": None,
        },
    ]
    engine = db.create_engine(fresh_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_to("0003"))
            for row in rows:
                await conn.execute(
                    sa.text(insert), {"channel": "p", "created_at": now - 1000, **row}
                )
            await conn.execute(
                sa.text("INSERT INTO channels (name, polled_at, messages) VALUES ('p', 0, 5)")
            )
        async with engine.begin() as conn:
            await conn.run_sync(_to("head"))
    finally:
        await engine.dispose()
    client = await make_client(db=fresh_url)
    shown = await (await client.get("/stats")).json()
    assert shown["current-messages"] == 5
    assert (shown["current-messages-ready"], shown["current-messages-hidden"]) == (3, 2)
    assert (shown["current-messages-urgent"], shown["current-messages-niced"]) == (2, 2)
    assert [await (await get(client, "p")).read() for _ in range(3)] == [
        b"urgent",
        b"plain",
        b"nice",
    ]
    await client.close()
    engine = db.create_engine(fresh_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_down_to("0003"))
            count = (await conn.execute(sa.text("SELECT count(*) FROM messages"))).scalar_one()
        assert count == 5
    finally:
        await engine.dispose()
