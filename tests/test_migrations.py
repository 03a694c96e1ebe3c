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
