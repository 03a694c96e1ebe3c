"""Message operations: add, claim, delete, touch, drain, per-channel counts and the sweep."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import sqlalchemy as sa

from linger import errors
from linger.store.db import bodies, channels, messages
from linger.store.driver import Driver, Operation, Prepared, Row, single
from linger.store.ledger import Tally, unnoted
from linger.store.records import Message, Options
from linger.store.sql import (
    BATCH,
    INSERT_TYPES,
    MESSAGE_COLUMNS,
    READY,
    alive,
    announced,
    in_batch,
    ms,
    ms_sql,
    param,
)

m = messages
# Channels that were long-polled this recently are listed even when empty.
POLLED_TTL_MS = 180_000
# How long a drain waits before it looks again for rows that a transaction in flight held.
_DRAIN_RETRY = 0.005


def _dead_after(deliveries: sa.ColumnElement[int], visible_at: sa.ColumnElement[int]) -> Any:
    """dead_at once a message has had ``deliveries``: the end of the last allowed
    delivery's timeout (``visible_at``) or the retention end, whichever is first."""
    retention_end = m.c.created_at + ms_sql(m.c.linger)
    last_end = sa.case(
        (sa.and_(m.c.linger > 0, retention_end < visible_at), retention_end), else_=visible_at
    )
    exhausted = sa.and_(m.c.deliver > 0, deliveries >= m.c.deliver)
    return sa.case((exhausted, last_end), else_=m.c.dead_at)


def _claim_stmt() -> sa.ClauseElement:
    """Claim the first ready live message of :channel in (priority, id) order: hide it for
    its timeout and count the delivery. SKIP LOCKED (PostgreSQL) lets concurrent claims
    pass each other; SQLite serialises writers."""
    now = param("now")
    first = (
        sa.select(m.c.id)
        .where(m.c.channel == param("channel", sa.String), m.c.visible_at <= now, alive(now))
        .order_by(m.c.priority, m.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    visible_at = now + ms_sql(m.c.timeout)
    return (
        sa.update(m)
        .where(m.c.id == first)
        .values(
            visible_at=visible_at,
            deliveries=m.c.deliveries + 1,
            dead_at=_dead_after(m.c.deliveries + 1, visible_at),
        )
        .returning(*MESSAGE_COLUMNS, m.c.body_id)
    )


def _touch_stmt() -> sa.ClauseElement:
    """Restart the visibility timeout of hidden live message :id."""
    now = param("now")
    visible_at = now + ms_sql(m.c.timeout)
    return (
        sa.update(m)
        .where(m.c.id == param("id"), m.c.visible_at > now, alive(now))
        .values(visible_at=visible_at, dead_at=_dead_after(m.c.deliveries, visible_at))
        .returning(m.c.id)
    )


def _sweep_stmts(postgres: bool) -> tuple[sa.ClauseElement, sa.ClauseElement]:
    """Delete a batch of messages past their retention, and a batch of the others that
    are dead (their delivery limit used up): (retention, discarded)."""
    now = param("now")
    expired = sa.and_(
        m.c.dead_at <= now, m.c.linger > 0, m.c.created_at + ms_sql(m.c.linger) <= now
    )
    retention = sa.delete(m).where(in_batch(expired, m.c.dead_at, postgres=postgres))
    discarded = sa.delete(m).where(in_batch(m.c.dead_at <= now, m.c.dead_at, postgres=postgres))
    return (
        retention.returning(m.c.channel, m.c.body_id),
        discarded.returning(m.c.channel, m.c.body_id),
    )


class Messages:
    """The operations on messages; times come from ``now`` (clock milliseconds)."""

    def __init__(self, driver: Driver[Tally], now: Callable[[], int], origin: str) -> None:
        self._driver = driver
        self.now = now
        self.origin = origin
        prepare = driver.prepare
        self._add = prepare(
            announced(
                sa.insert(m).values({name: param(name, t) for name, t in INSERT_TYPES.items()}),
                postgres=driver.postgres,
            )
        )
        self._claim = prepare(_claim_stmt())
        self._body = prepare(sa.select(bodies.c.body).where(bodies.c.id == param("id")))
        now_ = param("now")
        self._delete = prepare(
            sa.delete(m)
            .where(m.c.id == param("id"), alive(now_))
            .returning(m.c.channel, m.c.body_id)
        )
        self._touch = prepare(_touch_stmt())
        self._exists = prepare(sa.select(m.c.id).where(m.c.id == param("id"), alive(now_)))
        in_channel = sa.and_(m.c.channel == param("channel", sa.String), m.c.id <= param("last"))
        self._drain = prepare(
            sa.delete(m)
            .where(in_batch(in_channel, m.c.priority, m.c.id, postgres=driver.postgres))
            .returning(m.c.body_id)
        )
        self._left = prepare(sa.select(m.c.id).where(in_channel).limit(1))
        self._last_id = prepare(sa.select(sa.func.coalesce(sa.func.max(m.c.id), 0)))
        ready = sa.func.coalesce(sa.func.sum(sa.case((m.c.visible_at <= now_, 1), else_=0)), 0)
        hidden = sa.func.coalesce(sa.func.sum(sa.case((m.c.visible_at > now_, 1), else_=0)), 0)
        self._stats = prepare(
            sa.select(ready, hidden).where(m.c.channel == param("channel", sa.String), alive(now_))
        )
        self._sweep_retention, self._sweep_discarded = map(prepare, _sweep_stmts(driver.postgres))
        self._sweep_channels = prepare(
            sa.delete(channels)
            .where(
                channels.c.name.in_(
                    sa.select(channels.c.name)
                    .where(channels.c.messages == 0, channels.c.polled_at <= param("cutoff"))
                    .limit(BATCH)
                    .with_for_update(skip_locked=True)
                )
            )
            .returning(channels.c.name)
        )

    async def _read(self, stmt: Prepared, **params: Any) -> list[Row]:
        return await self._driver.read(partial(single, stmt, params))

    async def add(
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
            "body_id": None,
            "created_at": now,
            "visible_at": READY,
            "deliveries": 0,
            "origin": self.origin,
            "dead_at": now + ms(options.linger) if options.linger > 0 else None,
        }
        return await self._driver.write(partial(self._add_operation, params, hlm))

    def _add_operation(self, params: dict[str, Any], hlm: int, ledger: Tally) -> Operation[int]:
        rows = yield self._add, params
        message_id = int(rows[0][1])
        channel = params["channel"]

        def refuse(outcome: Any, count: int) -> None:
            outcome.error = errors.ChannelFull(
                f"Channel {channel} is at the high-level mark with {count} messages"
            )

        ledger.added(channel, message_id, hlm=hlm, refuse=refuse)
        return message_id

    async def claim(self, channel: str, *, listed: bool = False) -> Message | None:
        """Deliver the next ready message of ``channel``, or None when there is none; with
        ``listed``, a consumer long-polls the channel: list it for 180 s from now."""
        params = {"channel": channel, "now": self.now()}
        # The claim is one statement; the listing mark is independent of it.
        return await self._driver.write(
            partial(self._claim_operation, params, listed), atomic=False
        )

    def _claim_operation(
        self, params: dict[str, Any], listed: bool, ledger: Tally
    ) -> Operation[Message | None]:
        rows = yield self._claim, params
        if listed:
            ledger.polled(params["channel"], params["now"])
        if not rows:
            return None
        *columns, body_id = rows[0]
        if body_id is not None:
            columns[2] = (yield self._body, {"id": body_id})[0][0]
        return Message(*columns)

    async def polled(self, channel: str) -> None:
        """A consumer long-polls ``channel``, or stopped now: list it for 180 s from now."""
        until = self.now()
        await self._driver.write(lambda ledger: _note_polled(ledger, channel, until), atomic=False)

    async def delete(self, message_id: int) -> None:
        """Delete a live message in any state; raise ``NotFound`` otherwise."""
        params = {"id": message_id, "now": self.now()}
        await self._driver.write(
            partial(self._delete_operation, params), key=("message", message_id)
        )

    def _delete_operation(self, params: dict[str, Any], ledger: Tally) -> Operation[None]:
        rows = yield self._delete, params
        if not rows:
            raise errors.NotFound()
        ledger.removed(rows[0][0], rows[0][1])

    async def touch(self, message_id: int) -> None:
        """Restart the visibility timeout of a hidden message."""
        params = {"id": message_id, "now": self.now()}
        # Only the first statement writes; the second explains why it did not.
        touch = partial(self._touch_operation, params)
        await self._driver.write(touch, atomic=False, key=("message", message_id))

    def _touch_operation(self, params: dict[str, Any], ledger: Tally) -> Operation[None]:
        if (yield self._touch, params):
            return
        if (yield self._exists, params):
            raise errors.NotHidden()
        raise errors.NotFound()

    async def drain(self, channel: str) -> int:
        """Delete every message ``channel`` held when the drain began, in batches (each a
        short transaction that skips rows other transactions hold, and so never waits for
        a lock); return how many there were."""
        last = (await self._read(self._last_id))[0][0]
        params = {"channel": channel, "last": int(last)}
        drained = 0
        while True:
            count = await self._driver.write(partial(self._drain_operation, params), alone=True)
            drained += count
            if count == BATCH:
                continue
            if not await self._read(self._left, **params):
                return drained
            await asyncio.sleep(_DRAIN_RETRY)

    def _drain_operation(self, params: dict[str, Any], ledger: Tally) -> Operation[int]:
        rows = yield self._drain, params
        for (body_id,) in rows:
            ledger.removed(params["channel"], body_id)
        return len(rows)

    async def channel_stats(self, channel: str) -> tuple[int, int]:
        """(ready, hidden) live messages of ``channel``."""
        rows = await self._read(self._stats, channel=channel, now=self.now())
        return int(rows[0][0]), int(rows[0][1])

    async def readiness(self, names: Iterable[str]) -> dict[str, tuple[int, int | None]]:
        """For each of ``names`` with live messages: (how many are ready, when the next
        hidden one becomes visible, in clock milliseconds, or None)."""
        now = sa.bindparam("now", self.now(), type_=sa.BigInteger)
        ready = sa.func.sum(sa.case((m.c.visible_at <= now, 1), else_=0))
        next_visible = sa.func.min(sa.case((m.c.visible_at > now, m.c.visible_at)))
        stmt = (
            sa.select(m.c.channel, ready, next_visible)
            .where(m.c.channel.in_(list(names)), alive(now))
            .group_by(m.c.channel)
        )
        rows = await self._read(self._driver.prepare(stmt))
        return {row[0]: (int(row[1]), None if row[2] is None else int(row[2])) for row in rows}

    async def sweep(self) -> tuple[int, int]:
        """Delete messages past their retention or their delivery limit, and forget
        channels not long-polled for 180 s that hold nothing, in batches; return
        (retention, discarded) counts."""
        now = self.now()
        counts = []
        for stmt in (self._sweep_retention, self._sweep_discarded):
            swept = 0
            while True:
                sweep = partial(self._sweep_operation, stmt, now)
                count = await self._driver.write(sweep, alone=True)
                swept += count
                if count < BATCH:
                    break
            counts.append(swept)
        forget = partial(unnoted, self._sweep_channels, {"cutoff": now - POLLED_TTL_MS})
        while len(await self._driver.write(forget, alone=True)) == BATCH:
            pass
        return counts[0], counts[1]

    def _sweep_operation(self, stmt: Prepared, now: int, ledger: Tally) -> Operation[int]:
        rows = yield stmt, {"now": now}
        for channel, body_id in rows:
            ledger.removed(channel, body_id)
        return len(rows)


def _note_polled(ledger: Tally, channel: str, until: int) -> Operation[None]:
    """An operation without statements: it only notes."""
    ledger.polled(channel, until)
    yield from ()
