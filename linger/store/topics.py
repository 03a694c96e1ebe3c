"""Topic operations: subscribe, unsubscribe, publish (one copy per subscribed channel)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from linger import errors
from linger.store.db import bodies, messages, subscriptions
from linger.store.driver import Driver, Operation, Outcome, Prepared, Row, single
from linger.store.ledger import Tally, unnoted
from linger.store.records import NewMessage, Options
from linger.store.sql import INSERT_TYPES, READY, announced, ms_sql, param

m = messages
s = subscriptions
# A published body longer than this is stored once and referred to by every copy.
SHARED_BODY_MIN = 1024


# A subscription's columns that a copy takes, after its channel.
_SUBSCRIBED = ("channel", "priority", "timeout", "deliver", "linger", "delay", "dead")
# The snapshot's arrays, one per column of _SUBSCRIBED, and their element types.
_ARRAYS: tuple[tuple[str, Any], ...] = (
    ("channels", sa.String),
    ("priorities", sa.BigInteger),
    ("timeouts", sa.BigInteger),
    ("delivers", sa.BigInteger),
    ("lingers", sa.BigInteger),
    ("delays", sa.BigInteger),
    ("deads", sa.String),
)


def _publish_stmt(*, snapshot: bool = False) -> sa.Insert:
    """Copy the message into every channel subscribed to :topic with the subscription's
    options; the copies carry :body, or refer to shared body :body_id. ``snapshot``
    (PostgreSQL): into the subscriptions given as arrays (:channels, :priorities, ...;
    ``_snapshot_arrays``), as a batch read them before its first copy."""
    now = param("now")
    if snapshot:
        arrays = [param(name, postgresql.ARRAY(type_)) for name, type_ in _ARRAYS]
        source: Any = sa.func.unnest(*arrays).table_valued(*_SUBSCRIBED).render_derived("subs")
        where: list[Any] = []
    else:
        source, where = s, [s.c.topic == param("topic", sa.String)]
    c = source.c
    rows = sa.select(
        c.channel,
        c.priority,
        c.timeout,
        c.deliver,
        c.linger,
        param("topic", sa.String),
        param("content_type", sa.Text),
        param("body", sa.LargeBinary),
        param("body_id"),
        c.dead,
        now,
        sa.case((c.delay > 0, now + ms_sql(c.delay)), else_=READY),
        sa.case((c.linger > 0, now + ms_sql(c.linger)), else_=sa.null()),
        sa.literal_column("0", sa.BigInteger),  # deliveries
    ).where(*where)
    return sa.insert(m).from_select(list(INSERT_TYPES), rows)


def _snapshot_arrays(subscribed: list[Row]) -> dict[str, list[Any]]:
    return {name: [row[i] for row in subscribed] for i, (name, _type) in enumerate(_ARRAYS)}


@dataclass(slots=True)
class Published:
    """What a publish did: the id of each channel's copy, and the channels skipped at
    their high-level mark."""

    ids: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def skip(self, channel: str, _outcome: Outcome, _count: int) -> None:
        del self.ids[channel]
        self.skipped.append(channel)


class Topics:
    """The operations on topics and subscriptions."""

    def __init__(self, driver: Driver[Tally], now: Callable[[], int], origin: str) -> None:
        self._driver = driver
        self.now = now
        self.origin = origin
        # How many copies a publish to each topic writes at most, as far as this process
        # knows: what a publish wrote while no subscription changed, plus the
        # subscriptions made since (an unsubscribe forgets the topic). On the in-memory
        # database, which holds only what this process wrote, this decides whether a
        # publish may run on the event loop (``Driver.write``); a topic not known goes to
        # the thread. Subscription changes begun, and under way: what tells a publish
        # whether what it wrote is still its topic's fan-out.
        self._fanout: dict[str, int] = {}
        self._changes = 0
        self._changing = 0
        prepare = driver.prepare
        insert = postgresql.insert if driver.postgres else sqlite.insert
        options = {
            "priority": param("priority"),
            "timeout": param("timeout"),
            "deliver": param("deliver"),
            "linger": param("linger"),
            "delay": param("delay"),
            "dead": param("dead", sa.String),
        }
        subscribe = insert(s).values(
            topic=param("topic", sa.String), channel=param("channel", sa.String), **options
        )
        self._subscribe = prepare(
            subscribe.on_conflict_do_update(
                index_elements=[s.c.topic, s.c.channel],
                set_={name: subscribe.excluded[name] for name in options},
            )
        )
        self._unsubscribe = prepare(
            sa.delete(s)
            .where(
                s.c.topic == param("topic", sa.String), s.c.channel == param("channel", sa.String)
            )
            .returning(s.c.channel)
        )
        self._store_body = prepare(
            sa.insert(bodies)
            .values(refs=0, body=param("body", sa.LargeBinary))
            .returning(bodies.c.id)
        )
        self._publish = prepare(announced(_publish_stmt(), postgres=driver.postgres))
        self._subscribers = prepare(
            sa.select(s.c.channel)
            .where(s.c.topic == param("topic", sa.String))
            .order_by(s.c.channel)
        )
        # A batch publish's subscriptions, read before its first copy. On PostgreSQL each
        # statement sees the subscriptions committed before it began: the batch copies
        # from what it read (channels and options), so that every message of it goes to
        # the same channels with the same options, and no more copies than it counted,
        # without a lock that subscription changes would wait for. SQLite's one writer
        # changes nothing meanwhile.
        self._pin = prepare(
            sa.select(*(s.c[name] for name in _SUBSCRIBED))
            .where(s.c.topic == param("topic", sa.String))
            .order_by(s.c.channel)
        )
        if driver.postgres:
            self._publish_snapshot = prepare(announced(_publish_stmt(snapshot=True), postgres=True))
        self._topics = prepare(sa.select(s.c.topic).distinct())
        self._channel_topics = prepare(
            sa.select(s.c.topic).where(s.c.channel == param("channel", sa.String))
        )
        self._totals = prepare(sa.select(sa.func.count(), sa.func.count(sa.distinct(s.c.topic))))

    async def _read(self, stmt: Prepared, **params: Any) -> list[Row]:
        """A read whose rows grow with the subscriptions (``Driver.read``'s ``heavy``)."""
        return await self._driver.read(partial(single, stmt, params), heavy=True)

    async def _write(self, stmt: Prepared, **params: Any) -> list[Row]:
        """A write of one subscription's row."""
        operation = partial(unnoted, stmt, params)
        key = ("subscription", params["topic"], params["channel"])
        self._changes += 1
        self._changing += 1
        try:
            return await self._driver.write(operation, atomic=False, key=key, body_bytes=0)
        finally:
            self._changing -= 1

    async def subscribe(self, channel: str, topic: str, options: Options) -> None:
        """Subscribe ``channel`` to ``topic``, replacing the options of an existing one."""
        if topic in self._fanout:  # before the write: a publish may run meanwhile
            self._fanout[topic] += 1
        await self._write(
            self._subscribe,
            channel=channel,
            topic=topic,
            priority=options.priority,
            timeout=options.timeout,
            deliver=options.deliver,
            linger=options.linger,
            delay=options.delay,
            dead=options.dead,
        )

    async def unsubscribe(self, channel: str, topic: str) -> bool:
        """Remove the subscription; return whether there was one."""
        self._fanout.pop(topic, None)
        return bool(await self._write(self._unsubscribe, channel=channel, topic=topic))

    async def publish(self, topic: str, body: bytes, content_type: str, hlm: int = 0) -> Published:
        """Copy the message into every subscribed channel in one transaction, skipping
        channels at the high-level mark ``hlm`` (> 0); a long body is stored once."""
        return (await self._publish_all(topic, [(body, content_type)], hlm))[0]

    async def publish_many(
        self, topic: str, batch: Sequence[NewMessage], hlm: int = 0, most: int = 0
    ) -> list[Published]:
        """Publish every message of ``batch`` in order, in one transaction (a statement
        per message: each copies it into every subscribed channel). With ``most`` > 0, a
        batch of more than one message that would write more than ``most`` copies
        stores nothing and raises ``MessageTooLarge``: one transaction holds the
        writer, on SQLite every other write, for as long as its copies take."""
        messages = [(m.body, m.content_type) for m in batch]
        return await self._publish_all(topic, messages, hlm, most)

    async def _publish_all(
        self, topic: str, messages: list[tuple[bytes, str]], hlm: int, most: int = 0
    ) -> list[Published]:
        """Publish ``messages`` (body, content type) in order, in one transaction, where
        their weight says (``_weight``), and learn the topic's fan-out from them."""
        now = self.now()
        each = [
            {
                "topic": topic,
                "body": body,
                "body_id": None,
                "content_type": content_type,
                "now": now,
                "origin": self.origin,
            }
            for body, content_type in messages
        ]
        bodies = [body for body, _content_type in messages]
        self._driver.stored(max(map(len, bodies), default=0))
        rows, body_bytes = self._weight(topic, bodies)
        since = self._unchanged()
        published = await self._driver.write(
            partial(self._publish_many_operation, each, hlm, most),
            rows=rows,
            body_bytes=body_bytes,
        )
        self._copied(topic, published, since)
        return published

    def _weight(self, topic: str, bodies: Sequence[bytes]) -> tuple[int | None, int]:
        """The rows (None: not known) and body bytes that publishing ``bodies`` writes."""
        fanout = self._fanout.get(topic)
        if fanout is None:
            return None, 0
        # A long body is stored once, a short one in every copy.
        body_bytes = sum(n if n > SHARED_BODY_MIN else n * fanout for n in map(len, bodies))
        return fanout * len(bodies), body_bytes

    def _unchanged(self) -> int | None:
        """The subscription changes begun so far; None while one is under way."""
        return None if self._changing else self._changes

    def _copied(self, topic: str, published: list[Published], since: int | None) -> None:
        """Learn ``topic``'s fan-out from what a publish wrote (``_fanout``), when no
        subscription changed from before the publish (``since``) until now: it wrote
        one copy per subscription then, and still does. Otherwise the bound stays as it
        is (subscribes raised it before their write, unsubscribes removed it)."""
        if since is None or since != self._changes:
            return
        copies = max((len(p.ids) + len(p.skipped) for p in published), default=0)
        if copies:
            self._fanout[topic] = copies
        else:
            self._fanout.pop(topic, None)

    def _publish_many_operation(
        self, each: list[dict[str, Any]], hlm: int, most: int, ledger: Tally
    ) -> Operation[list[Published]]:
        stmt = self._publish
        if len(each) > 1:
            # Counted in the transaction that copies, before anything is written.
            subscribed = list((yield self._pin, {"topic": each[0]["topic"]}))
            copies = len(subscribed) * len(each)
            if most and copies > most:
                raise errors.MessageTooLarge(
                    f"Batch would write {copies} copies ({len(each)} messages to "
                    f"{len(subscribed)} channels); at most {most}."
                )
            if not subscribed:
                return [Published() for _params in each]
            if self._driver.postgres:
                stmt = self._publish_snapshot
                arrays = _snapshot_arrays(subscribed)
                each = [{**params, **arrays} for params in each]
        published = []
        for params in each:
            published.append((yield from self._publish_operation(stmt, params, hlm, ledger)))
        return published

    def _publish_operation(
        self, stmt: Prepared, params: dict[str, Any], hlm: int, ledger: Tally
    ) -> Operation[Published]:
        body_id = None
        if len(params["body"]) > SHARED_BODY_MIN:
            body_id = int((yield self._store_body, params)[0][0])
            params = {**params, "body": b"", "body_id": body_id}
        rows = yield stmt, params
        published = Published({row[0]: int(row[1]) for row in rows})
        for channel, message_id in published.ids.items():
            refuse = partial(published.skip, channel)
            ledger.added(channel, message_id, hlm=hlm, body_id=body_id, refuse=refuse)
        if body_id is not None:
            # Referenced by every copy (the ledger deletes it when that is none).
            ledger.referenced(body_id, len(rows))
        return published

    async def list_topics(self) -> list[str]:
        return sorted(row[0] for row in await self._read(self._topics))

    async def channel_topics(self, channel: str) -> list[str]:
        return sorted(row[0] for row in await self._read(self._channel_topics, channel=channel))

    async def topic_channels(self, topic: str) -> list[str]:
        return sorted(row[0] for row in await self._read(self._subscribers, topic=topic))

    async def totals(self) -> tuple[int, int]:
        """(subscriptions, topics)."""
        row = (await self._read(self._totals))[0]
        return int(row[0]), int(row[1])
