"""Server-wide reads: totals, the highest id, the channel list."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import sqlalchemy as sa

from linger.store.db import channels, messages, subscriptions
from linger.store.driver import Driver, Prepared, Row, single
from linger.store.ledger import Tally
from linger.store.messages import POLLED_TTL_MS
from linger.store.records import Depth, Totals
from linger.store.sql import (
    alive,
    delayed,
    leased,
    param,
    parked,
    queued,
    ready,
)

m = messages


def _listed() -> sa.CompoundSelect[Any]:
    """Channels with messages or subscriptions, or long-polled since :cutoff: one row per
    channel from the channels table, never one per message."""
    c = channels
    return sa.union(
        sa.select(c.c.name).where(sa.or_(c.c.messages > 0, c.c.polled_at > param("cutoff"))),
        sa.select(subscriptions.c.channel),
    )


class Overview:
    """Reads over the whole database, for the listings and ``/stats``."""

    def __init__(self, driver: Driver[Tally], now: Callable[[], int]) -> None:
        self._driver = driver
        self.now = now
        prepare = driver.prepare
        self._totals = prepare(_totals_stmt())
        self._max_id = prepare(
            sa.text(
                "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM messages_id_seq"
                if driver.postgres
                else "SELECT seq FROM sqlite_sequence WHERE name = 'messages'"
            )
        )
        self._depths = prepare(_depths_stmt())
        self._revision = prepare(sa.text("SELECT version_num FROM alembic_version"))
        listed = _listed()
        self._channels = prepare(listed)
        self._channel_count = prepare(sa.select(sa.func.count()).select_from(listed.subquery()))

    async def _read(self, stmt: Prepared, **params: Any) -> list[Row]:
        return await self._driver.read(partial(single, stmt, params))

    async def _scan(self, stmt: Prepared, **params: Any) -> list[Row]:
        """A read whose rows grow with the database (``Driver.read``'s ``heavy``)."""
        return await self._driver.read(partial(single, stmt, params), heavy=True)

    async def totals(self) -> Totals:
        """Live messages, ready, hidden, urgent and niced, in one statement that reads
        no queued row (see ``_totals_stmt``)."""
        kept, dead, hidden, urgent, niced = (
            int(value) for value in (await self._scan(self._totals, now=self.now()))[0]
        )
        live = kept - dead
        return Totals(live, live - hidden, hidden, urgent, niced)

    async def depths(self, limit: int) -> list[Depth]:
        """The ``limit`` deepest channels (by their kept count), each one's live messages
        by state and when its oldest ready one was added (a queued message past its
        retention that the next sweep deletes may stand for it until then)."""
        rows = await self._scan(self._depths, now=self.now(), limit=limit)
        depths = []
        for name, kept, dead, hidden, waiting, oldest_due, oldest_queued in rows:
            times = [int(t) for t in (oldest_due, oldest_queued) if t is not None]
            ready = max(0, int(kept) - int(dead) - int(hidden) - int(waiting))
            depths.append(Depth(name, ready, int(hidden), int(waiting), min(times, default=None)))
        return depths

    async def revision(self) -> str | None:
        """The schema revision the database is at (None: not migrated at all)."""
        rows = await self._read(self._revision)
        return str(rows[0][0]) if rows else None

    async def max_id(self) -> int:
        rows = await self._read(self._max_id)
        return int(rows[0][0]) if rows else 0

    async def list_channels(self) -> list[str]:
        """Channels with messages or subscriptions, or long-polled in the last 180 s."""
        rows = await self._scan(self._channels, cutoff=self.now() - POLLED_TTL_MS)
        return sorted(row[0] for row in rows)

    async def channel_count(self) -> int:
        rows = await self._scan(self._channel_count, cutoff=self.now() - POLLED_TTL_MS)
        return int(rows[0][0])


def _totals_stmt() -> sa.Select[Any]:
    """(rows, dead rows, hidden, urgent, niced) over the whole database from the channel
    rows' kept counts and the indexes of the few: dead rows, parked rows (in flight and
    delayed: hidden in 1.0.1's sense) and rows of a priority other than 0. Ready is what
    is left; a queue of a million ready messages is never read."""
    now = param("now")

    def count(*where: sa.ColumnElement[bool]) -> Any:
        return sa.select(sa.func.count()).select_from(m).where(*where).scalar_subquery()

    nonzero = m.c.priority != 0  # the priority index's own condition, for the planner
    return sa.select(
        sa.select(sa.func.coalesce(sa.func.sum(channels.c.messages), 0)).scalar_subquery(),
        count(m.c.dead_at <= now),
        count(parked(), m.c.visible_at > now, alive(now)),
        count(nonzero, m.c.priority < 0, alive(now)),
        count(nonzero, m.c.priority > 0, alive(now)),
    )


def _depths_stmt() -> sa.Select[Any]:
    """(channel, rows, dead rows, hidden, delayed, oldest due parked created_at, oldest
    queued created_at) of the :limit deepest channels, in one statement (one snapshot),
    from indexes and kept counts only: the channel rows count each channel's rows, the
    dead and the parked rows (in flight, delayed, expired) are counted from their
    indexes, the ready ones are what is left, and the queued rows are read from the
    queue index alone (it holds created_at) for the oldest."""
    now = param("now")
    top = (
        sa.select(channels.c.name, channels.c.messages)
        .where(channels.c.messages > 0)
        .order_by(channels.c.messages.desc(), channels.c.name)
        .limit(param("limit"))
        .cte("top")
    )
    in_top = m.c.channel.in_(sa.select(top.c.name))

    def count(condition: sa.ColumnElement[bool]) -> Any:
        return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

    dead = (
        sa.select(m.c.channel, sa.func.count().label("n"))
        .where(m.c.dead_at <= now, in_top)
        .group_by(m.c.channel)
        .cte("dead")
    )
    held = (
        sa.select(
            m.c.channel,
            count(leased(now)).label("hidden"),
            count(delayed(now)).label("delayed"),
            sa.func.min(sa.case((ready(now), m.c.created_at))).label("oldest_due"),
        )
        .where(parked(), alive(now), in_top)
        .group_by(m.c.channel)
        .cte("held")
    )
    oldest_queued = (
        sa.select(sa.func.min(m.c.created_at))
        .where(m.c.channel == top.c.name, queued())
        .scalar_subquery()
    )
    return (
        sa.select(
            top.c.name,
            top.c.messages,
            sa.func.coalesce(dead.c.n, 0),
            sa.func.coalesce(held.c.hidden, 0),
            sa.func.coalesce(held.c.delayed, 0),
            held.c.oldest_due,
            oldest_queued,
        )
        .select_from(top)
        .outerjoin(dead, dead.c.channel == top.c.name)
        .outerjoin(held, held.c.channel == top.c.name)
    )
