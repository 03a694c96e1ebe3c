"""Storage: one public method per API operation, each one short SQL transaction."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from linger import errors
from linger.store.db import channels, messages, subscriptions
from linger.store.driver import Driver, Operation, Prepared, Row, single

m = messages
s = subscriptions

# Channels that were long-polled this recently are listed even when empty.
POLLED_TTL_MS = 180_000
# The PostgreSQL NOTIFY channel that announces new messages to every Linger process.
NOTIFY_CHANNEL = "linger"
# visible_at of a new message: ready whatever "now" a concurrent claim computed (on this
# host or another one whose clock is a little behind).
READY = 0
# Durations are capped (about 31,700 years) so that no time computed in SQL overflows.
MAX_SECONDS = 10**12
_MAX_SECONDS_SQL = sa.literal_column(str(MAX_SECONDS), sa.BigInteger)


@dataclass(frozen=True, slots=True)
class Options:
    """Per-message options: priority, visibility timeout, delivery limit, retention."""

    priority: int = 0
    timeout: int = 30
    deliver: int = 0
    linger: int = 0


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    channel: str
    body: bytes
    content_type: str
    priority: int
    timeout: int
    deliver: int
    deliveries: int
    linger: int
    topic: str
    created_at: int


@dataclass(frozen=True, slots=True)
class Totals:
    messages: int
    ready: int
    hidden: int
    urgent: int
    niced: int


def _ms(seconds: int) -> int:
    return min(seconds, MAX_SECONDS) * 1000


def _ms_sql(seconds: sa.ColumnElement[int]) -> sa.ColumnElement[int]:
    capped = sa.case((seconds > _MAX_SECONDS_SQL, _MAX_SECONDS_SQL), else_=seconds)
    return capped * sa.literal_column("1000", sa.BigInteger)


def _param(name: str, type_: Any = sa.BigInteger) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=type_)


def _alive(now: sa.ColumnElement[int]) -> sa.ColumnElement[bool]:
    """Messages not yet past their retention or their last allowed delivery."""
    return sa.or_(m.c.dead_at.is_(None), m.c.dead_at > now)


def _dead_after(deliveries: sa.ColumnElement[int], visible_at: sa.ColumnElement[int]) -> Any:
    """dead_at once a message has had ``deliveries``: the end of the last allowed
    delivery's timeout (``visible_at``) or the retention end, whichever is first."""
    retention_end = m.c.created_at + _ms_sql(m.c.linger)
    last_end = sa.case(
        (sa.and_(m.c.linger > 0, retention_end < visible_at), retention_end), else_=visible_at
    )
    exhausted = sa.and_(m.c.deliver > 0, deliveries >= m.c.deliver)
    return sa.case((exhausted, last_end), else_=m.c.dead_at)


def _count_alive(channel: Any, now: sa.ColumnElement[int]) -> sa.ScalarSelect[int]:
    return (
        sa.select(sa.func.count())
        .select_from(m)
        .where(m.c.channel == channel, _alive(now))
        .scalar_subquery()
    )


_MESSAGE_COLUMNS = (
    m.c.id,
    m.c.channel,
    m.c.body,
    m.c.content_type,
    m.c.priority,
    m.c.timeout,
    m.c.deliver,
    m.c.deliveries,
    m.c.linger,
    m.c.topic,
    m.c.created_at,
)
_INSERT_TYPES: dict[str, Any] = {
    "channel": sa.String,
    "priority": sa.BigInteger,
    "timeout": sa.BigInteger,
    "deliver": sa.BigInteger,
    "linger": sa.BigInteger,
    "topic": sa.String,
    "content_type": sa.Text,
    "body": sa.LargeBinary,
    "created_at": sa.BigInteger,
    "visible_at": sa.BigInteger,
    "dead_at": sa.BigInteger,
    "deliveries": sa.BigInteger,
}


def _add_stmt(*, hlm: bool) -> sa.Insert:
    """Insert one message; with ``hlm``, only while the channel holds fewer than :hlm live
    messages."""
    binds = [_param(name, type_) for name, type_ in _INSERT_TYPES.items()]
    if not hlm:
        return sa.insert(m).values({b.key: b for b in binds})
    below_mark = _count_alive(_param("channel", sa.String), _param("now")) < _param("hlm")
    rows = sa.select(*binds).where(below_mark)
    return sa.insert(m).from_select(list(_INSERT_TYPES), rows)


def _announced(stmt: sa.Insert, *, postgres: bool) -> sa.ClauseElement:
    """``stmt`` returning (channel, id) of each inserted message. On PostgreSQL it also
    NOTIFYs every inserted message's channel, tagged with :origin (the process), in the
    same statement: the notifications go out at commit, and a rollback sends none."""
    stmt = stmt.returning(m.c.channel, m.c.id)
    if not postgres:
        return stmt
    inserted = stmt.cte("inserted")
    payload = sa.func.concat(_param("origin", sa.String), ":", inserted.c.channel)
    return sa.select(inserted.c.channel, inserted.c.id, sa.func.pg_notify(NOTIFY_CHANNEL, payload))


def _claim_stmt() -> sa.ClauseElement:
    """Claim the first ready live message of :channel in (priority, id) order: hide it for
    its timeout and count the delivery. SKIP LOCKED (PostgreSQL) lets concurrent claims
    pass each other; SQLite serialises writers."""
    now = _param("now")
    first = (
        sa.select(m.c.id)
        .where(m.c.channel == _param("channel", sa.String), m.c.visible_at <= now, _alive(now))
        .order_by(m.c.priority, m.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    visible_at = now + _ms_sql(m.c.timeout)
    return (
        sa.update(m)
        .where(m.c.id == first)
        .values(
            visible_at=visible_at,
            deliveries=m.c.deliveries + 1,
            dead_at=_dead_after(m.c.deliveries + 1, visible_at),
        )
        .returning(*_MESSAGE_COLUMNS)
    )


def _touch_stmt() -> sa.ClauseElement:
    """Restart the visibility timeout of hidden live message :id."""
    now = _param("now")
    visible_at = now + _ms_sql(m.c.timeout)
    return (
        sa.update(m)
        .where(m.c.id == _param("id"), m.c.visible_at > now, _alive(now))
        .values(visible_at=visible_at, dead_at=_dead_after(m.c.deliveries, visible_at))
        .returning(m.c.id)
    )


def _publish_stmt(*, hlm: bool) -> sa.Insert:
    """Copy the message into every channel subscribed to :topic with the subscription's
    options (with ``hlm``, skipping channels at the mark)."""
    now = _param("now")
    rows = sa.select(
        s.c.channel,
        s.c.priority,
        s.c.timeout,
        s.c.deliver,
        s.c.linger,
        _param("topic", sa.String),
        _param("content_type", sa.Text),
        _param("body", sa.LargeBinary),
        now,
        sa.literal_column(str(READY), sa.BigInteger),
        sa.case((s.c.linger > 0, now + _ms_sql(s.c.linger)), else_=sa.null()),
        sa.literal_column("0", sa.BigInteger),  # deliveries
    ).where(s.c.topic == _param("topic", sa.String))
    if hlm:
        rows = rows.where(_count_alive(s.c.channel, now) < _param("hlm"))
    return sa.insert(m).from_select(list(_INSERT_TYPES), rows)


_LIST_CHANNELS = sa.text(
    # A loose index scan: one index probe per distinct channel, not one row per message.
    """
    WITH RECURSIVE names(name) AS (
        SELECT min(channel) FROM messages
        UNION ALL
        SELECT (SELECT min(channel) FROM messages WHERE channel > names.name)
        FROM names WHERE names.name IS NOT NULL
    )
    SELECT name FROM names WHERE name IS NOT NULL
    UNION SELECT channel FROM subscriptions
    UNION SELECT name FROM channels WHERE polled_at > :cutoff
    """
).bindparams(sa.bindparam("cutoff", type_=sa.BigInteger))


class Storage:
    """Linger's data operations over ``driver``; times come from ``clock`` (epoch s)."""

    def __init__(self, driver: Driver, clock: Callable[[], float], origin: str = "") -> None:
        self._driver = driver
        self._clock = clock
        self.origin = origin
        insert = postgresql.insert if driver.postgres else sqlite.insert
        prepare = driver.prepare
        now = _param("now")
        postgres = driver.postgres
        self._add = prepare(_announced(_add_stmt(hlm=False), postgres=postgres))
        self._add_below_mark = prepare(_announced(_add_stmt(hlm=True), postgres=postgres))
        self._lock_channel = (
            prepare(
                sa.select(
                    sa.func.pg_advisory_xact_lock(
                        sa.func.hashtextextended(_param("channel", sa.String), 0)
                    )
                )
            )
            if driver.postgres
            else None
        )
        self._count = prepare(sa.select(_count_alive(_param("channel", sa.String), now)))
        self._claim = prepare(_claim_stmt())
        self._delete = prepare(
            sa.delete(m).where(m.c.id == _param("id"), _alive(now)).returning(m.c.id)
        )
        self._touch = prepare(_touch_stmt())
        self._exists = prepare(sa.select(m.c.id).where(m.c.id == _param("id"), _alive(now)))
        self._drain = prepare(
            sa.delete(m).where(m.c.channel == _param("channel", sa.String)).returning(m.c.id)
        )
        ready = sa.func.coalesce(sa.func.sum(sa.case((m.c.visible_at <= now, 1), else_=0)), 0)
        hidden = sa.func.coalesce(sa.func.sum(sa.case((m.c.visible_at > now, 1), else_=0)), 0)
        self._channel_stats = prepare(
            sa.select(ready, hidden).where(m.c.channel == _param("channel", sa.String), _alive(now))
        )
        self._totals = prepare(
            sa.select(
                sa.func.count(),
                ready,
                hidden,
                sa.func.coalesce(sa.func.sum(sa.case((m.c.priority < 0, 1), else_=0)), 0),
                sa.func.coalesce(sa.func.sum(sa.case((m.c.priority > 0, 1), else_=0)), 0),
            ).where(_alive(now))
        )
        self._max_id = prepare(
            sa.text(
                "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM messages_id_seq"
                if driver.postgres
                else "SELECT seq FROM sqlite_sequence WHERE name = 'messages'"
            )
        )
        self._list_channels = prepare(_LIST_CHANNELS)
        # The channel is listed until 180 s after a long-poll ends at the latest.
        polled = insert(channels).values(name=_param("channel", sa.String), polled_at=now)
        self._mark_polled = prepare(
            polled.on_conflict_do_update(
                index_elements=[channels.c.name], set_={"polled_at": polled.excluded.polled_at}
            )
        )
        retention_end = m.c.created_at + _ms_sql(m.c.linger)
        self._sweep_retention = prepare(
            sa.delete(m)
            .where(m.c.dead_at <= now, m.c.linger > 0, retention_end <= now)
            .returning(m.c.id)
        )
        self._sweep_discarded = prepare(sa.delete(m).where(m.c.dead_at <= now).returning(m.c.id))
        self._sweep_channels = prepare(
            sa.delete(channels).where(channels.c.polled_at <= now - POLLED_TTL_MS)
        )
        # Topics and subscriptions.
        options = {
            "priority": _param("priority"),
            "timeout": _param("timeout"),
            "deliver": _param("deliver"),
            "linger": _param("linger"),
        }
        subscribe = insert(s).values(
            topic=_param("topic", sa.String), channel=_param("channel", sa.String), **options
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
                s.c.topic == _param("topic", sa.String), s.c.channel == _param("channel", sa.String)
            )
            .returning(s.c.channel)
        )
        self._publish = prepare(_announced(_publish_stmt(hlm=False), postgres=postgres))
        self._publish_below_mark = prepare(_announced(_publish_stmt(hlm=True), postgres=postgres))
        self._subscribers = prepare(
            sa.select(s.c.channel)
            .where(s.c.topic == _param("topic", sa.String))
            .order_by(s.c.channel)
        )
        self._topics = prepare(sa.select(s.c.topic).distinct())
        self._channel_topics = prepare(
            sa.select(s.c.topic).where(s.c.channel == _param("channel", sa.String))
        )
        self._subscription_totals = prepare(
            sa.select(sa.func.count(), sa.func.count(sa.distinct(s.c.topic)))
        )

    def now(self) -> int:
        """The clock in integer milliseconds."""
        return int(self._clock() * 1000)

    async def _read(self, stmt: Prepared, **params: Any) -> list[Row]:
        return await self._driver.read(partial(single, stmt, params))

    async def _write(self, stmt: Prepared, **params: Any) -> list[Row]:
        return await self._driver.write(partial(single, stmt, params), atomic=False)

    async def add_message(
        self, channel: str, body: bytes, content_type: str, options: Options, hlm: int = 0
    ) -> int:
        """Store a ready message and return its id; raise ``ChannelFull`` when the channel
        already holds ``hlm`` (> 0) live messages."""
        now = self.now()
        params = {
            "channel": channel,
            "priority": options.priority,
            "timeout": options.timeout,
            "deliver": options.deliver,
            "linger": options.linger,
            "topic": "",
            "content_type": content_type,
            "body": body,
            "created_at": now,
            "visible_at": READY,
            "deliveries": 0,
            "now": now,
            "hlm": hlm,
            "origin": self.origin,
            "dead_at": now + _ms(options.linger) if options.linger > 0 else None,
        }
        return await self._driver.write(partial(self._add_operation, params), atomic=hlm > 0)

    def _add_operation(self, params: dict[str, Any]) -> Operation[int]:
        if params["hlm"] <= 0:
            rows = yield self._add, params
        else:
            if self._lock_channel is not None:
                # READ COMMITTED counts from a snapshot: serialise the adds to this channel
                # so that concurrent adds (from any process) cannot pass the mark together.
                yield self._lock_channel, params
            rows = yield self._add_below_mark, params
            if not rows:
                count = (yield self._count, params)[0][0]
                raise errors.ChannelFull(
                    f"Channel {params['channel']} is at the high-level mark with {count} messages"
                )
        return int(rows[0][1])

    async def claim_message(self, channel: str, *, poll: float = 0.0) -> Message | None:
        """Deliver the next ready message of ``channel``, or None when there is none; with
        ``poll`` > 0, a consumer will wait that long: record it for the channel list."""
        now = self.now()
        params = {"channel": channel, "now": now, "until": now + int(poll * 1000)}
        # The claim is one statement; the mark for the channel list is independent of it.
        return await self._driver.write(
            partial(self._claim_operation, params, poll > 0), atomic=False
        )

    def _claim_operation(self, params: dict[str, Any], poll: bool) -> Operation[Message | None]:
        rows = yield self._claim, params
        if rows:
            return Message(*rows[0])
        if poll:
            yield self._mark_polled, {"channel": params["channel"], "now": params["until"]}
        return None

    async def delete_message(self, message_id: int) -> None:
        """Delete a live message in any state; raise ``NotFound`` otherwise."""
        if not await self._write(self._delete, id=message_id, now=self.now()):
            raise errors.NotFound()

    async def touch_message(self, message_id: int) -> None:
        """Restart the visibility timeout of a hidden message."""
        params = {"id": message_id, "now": self.now()}
        # Only the first statement writes; the second explains why it did not.
        await self._driver.write(partial(self._touch_operation, params), atomic=False)

    def _touch_operation(self, params: dict[str, Any]) -> Operation[None]:
        if (yield self._touch, params):
            return
        if (yield self._exists, params):
            raise errors.NotHidden()
        raise errors.NotFound()

    async def drain_channel(self, channel: str) -> int:
        """Delete every message of ``channel``; return how many there were."""
        return len(await self._write(self._drain, channel=channel))

    async def channel_stats(self, channel: str) -> tuple[int, int]:
        """(ready, hidden) live messages of ``channel``."""
        rows = await self._read(self._channel_stats, channel=channel, now=self.now())
        return int(rows[0][0]), int(rows[0][1])

    async def totals(self) -> Totals:
        row = (await self._read(self._totals, now=self.now()))[0]
        return Totals(*(int(value) for value in row))

    async def max_id(self) -> int:
        rows = await self._read(self._max_id)
        return int(rows[0][0]) if rows else 0

    async def list_channels(self) -> list[str]:
        """Channels with messages or subscriptions, or long-polled in the last 180 s."""
        rows = await self._read(self._list_channels, cutoff=self.now() - POLLED_TTL_MS)
        return sorted(row[0] for row in rows)

    async def readiness(self, names: Iterable[str]) -> dict[str, tuple[int, int | None]]:
        """For each of ``names`` with live messages: (how many are ready, when the next
        hidden one becomes visible, in clock milliseconds, or None)."""
        now = sa.bindparam("now", self.now(), type_=sa.BigInteger)
        ready = sa.func.sum(sa.case((m.c.visible_at <= now, 1), else_=0))
        next_visible = sa.func.min(sa.case((m.c.visible_at > now, m.c.visible_at)))
        stmt = (
            sa.select(m.c.channel, ready, next_visible)
            .where(m.c.channel.in_(list(names)), _alive(now))
            .group_by(m.c.channel)
        )
        rows = await self._read(self._driver.prepare(stmt))
        return {row[0]: (int(row[1]), None if row[2] is None else int(row[2])) for row in rows}

    async def sweep(self) -> tuple[int, int]:
        """Delete messages past their retention or their delivery limit, and forget
        channels not long-polled for 180 s; return (retention, discarded) counts."""
        return await self._driver.write(partial(self._sweep_operation, {"now": self.now()}))

    def _sweep_operation(self, params: dict[str, Any]) -> Operation[tuple[int, int]]:
        retention = len((yield self._sweep_retention, params))
        discarded = len((yield self._sweep_discarded, params))
        yield self._sweep_channels, params
        return retention, discarded

    async def subscribe(self, channel: str, topic: str, options: Options) -> None:
        """Subscribe ``channel`` to ``topic``, replacing the options of an existing one."""
        await self._write(
            self._subscribe,
            channel=channel,
            topic=topic,
            priority=options.priority,
            timeout=options.timeout,
            deliver=options.deliver,
            linger=options.linger,
        )

    async def unsubscribe(self, channel: str, topic: str) -> bool:
        """Remove the subscription; return whether there was one."""
        return bool(await self._write(self._unsubscribe, channel=channel, topic=topic))

    async def publish(
        self, topic: str, body: bytes, content_type: str, hlm: int = 0
    ) -> tuple[dict[str, int], list[str]]:
        """Copy the message into every subscribed channel in one transaction; return
        ({channel: id}, [channels skipped at the high-level mark])."""
        params = {
            "topic": topic,
            "body": body,
            "content_type": content_type,
            "now": self.now(),
            "hlm": hlm,
            "origin": self.origin,
        }
        return await self._driver.write(partial(self._publish_operation, params))

    def _publish_operation(
        self, params: dict[str, Any]
    ) -> Operation[tuple[dict[str, int], list[str]]]:
        if params["hlm"] <= 0:
            rows = yield self._publish, params
            return {row[0]: int(row[1]) for row in rows}, []
        subscribers = [row[0] for row in (yield self._subscribers, params)]
        if self._lock_channel is not None:
            for channel in subscribers:  # in name order, as every publish locks them
                yield self._lock_channel, {"channel": channel}
        rows = yield self._publish_below_mark, params
        ids = {row[0]: int(row[1]) for row in rows}
        return ids, [channel for channel in subscribers if channel not in ids]

    async def list_topics(self) -> list[str]:
        return sorted(row[0] for row in await self._read(self._topics))

    async def channel_topics(self, channel: str) -> list[str]:
        return sorted(row[0] for row in await self._read(self._channel_topics, channel=channel))

    async def topic_channels(self, topic: str) -> list[str]:
        return sorted(row[0] for row in await self._read(self._subscribers, topic=topic))

    async def subscription_totals(self) -> tuple[int, int]:
        """(subscriptions, topics)."""
        row = (await self._read(self._subscription_totals))[0]
        return int(row[0]), int(row[1])
