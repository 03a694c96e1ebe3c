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
from linger.store.sql import alive, delayed, leased, param, ready

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
        now_ = param("now")

        def count_where(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[int]:
            return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

        self._totals = prepare(
            sa.select(
                sa.func.count(),
                count_where(m.c.visible_at <= now_),
                count_where(m.c.visible_at > now_),
                count_where(m.c.priority < 0),
                count_where(m.c.priority > 0),
            ).where(alive(now_))
        )
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

    async def totals(self) -> Totals:
        row = (await self._read(self._totals, now=self.now()))[0]
        return Totals(*(int(value) for value in row))

    async def depths(self, limit: int) -> list[Depth]:
        """The ``limit`` deepest channels (by their kept count), each one's live messages
        by state and the creation time of its oldest ready one: one statement, which
        reads the messages of those channels only."""
        now = self.now()
        rows = await self._read(self._depths, now=now, limit=limit)
        return [
            Depth(
                name, int(ready), int(hidden), int(waiting), None if oldest is None else int(oldest)
            )
            for name, ready, hidden, waiting, oldest in rows
        ]

    async def revision(self) -> str | None:
        """The schema revision the database is at (None: not migrated at all)."""
        rows = await self._read(self._revision)
        return str(rows[0][0]) if rows else None

    async def max_id(self) -> int:
        rows = await self._read(self._max_id)
        return int(rows[0][0]) if rows else 0

    async def list_channels(self) -> list[str]:
        """Channels with messages or subscriptions, or long-polled in the last 180 s."""
        rows = await self._read(self._channels, cutoff=self.now() - POLLED_TTL_MS)
        return sorted(row[0] for row in rows)

    async def channel_count(self) -> int:
        rows = await self._read(self._channel_count, cutoff=self.now() - POLLED_TTL_MS)
        return int(rows[0][0])


def _depths_stmt() -> sa.Select[Any]:
    now = param("now")
    deepest = (
        sa.select(channels.c.name)
        .where(channels.c.messages > 0)
        .order_by(channels.c.messages.desc(), channels.c.name)
        .limit(param("limit"))
        .subquery()
    )

    def count(condition: sa.ColumnElement[bool]) -> Any:
        return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

    return (
        sa.select(
            m.c.channel,
            count(ready(now)),
            count(leased(now)),
            count(delayed(now)),
            sa.func.min(sa.case((ready(now), m.c.created_at))),
        )
        .where(m.c.channel.in_(sa.select(deepest.c.name)), alive(now))
        .group_by(m.c.channel)
    )
