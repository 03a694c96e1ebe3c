"""Reads for the dashboard that no API route needs: the subscriptions with their options,
and which channels feed which dead channels. Each is one bounded statement that reads
small tables and indexes, never the queued rows themselves."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import sqlalchemy as sa

from linger.auth.scopes import Patterns
from linger.store.db import channels, messages, subscriptions
from linger.store.driver import Driver, Row, single
from linger.store.ledger import Tally
from linger.store.records import Options
from linger.store.sql import param, patterns, permitted, queued

m = messages
s = subscriptions


@dataclass(frozen=True, slots=True)
class Subscription:
    topic: str
    channel: str
    options: Options


def _subscriptions_stmt(*, scoped: bool, postgres: bool) -> sa.Select[Any]:
    """Up to :limit subscriptions with their options, by topic and channel; ``scoped``:
    of the topics that match the :patterns only (filtered before the limit)."""
    stmt = (
        sa.select(s.c.topic, s.c.channel, s.c.priority, s.c.timeout, s.c.deliver)
        .add_columns(s.c.linger, s.c.delay, s.c.dead)
        .order_by(s.c.topic, s.c.channel)
        .limit(param("limit"))
    )
    if scoped:
        stmt = stmt.where(permitted(postgres=postgres, table=s, column="topic"))
    return stmt


def _heads_stmt() -> sa.Select[Any]:
    """(channel, dead, dead_from) of the next queued message of each of the :limit
    deepest channels, when it names a dead channel or an origin: one seek into the queue
    index per channel."""
    c = channels
    head = (
        sa.select(m.c.id)
        .where(m.c.channel == c.c.name, queued())
        .order_by(m.c.priority, m.c.id)
        .limit(1)
        .correlate(c)
        .scalar_subquery()
    )
    top = (
        sa.select(c.c.name, head.label("head"))
        .where(c.c.messages > 0)
        .order_by(c.c.messages.desc(), c.c.name)
        .limit(param("limit"))
        .subquery()
    )
    return (
        sa.select(top.c.name, m.c.dead, m.c.dead_from)
        .select_from(top)
        .join(m, m.c.id == top.c.head)
        .where(sa.or_(m.c.dead.is_not(None), m.c.dead_from.is_not(None)))
    )


async def list_subscriptions(
    driver: Driver[Tally], limit: int, topics: Patterns | None = None
) -> list[Subscription]:
    """Up to ``limit`` subscriptions, by topic and channel; with ``topics``, of the topics
    those patterns match only (the first ``limit`` of those, not of every topic)."""
    postgres = driver.postgres
    stmt = driver.prepare(_subscriptions_stmt(scoped=topics is not None, postgres=postgres))
    values: dict[str, Any] = {"limit": limit}
    if topics is not None:
        values["patterns"] = patterns(topics, postgres=postgres)
    rows = await driver.read(partial(single, stmt, values))
    return [_subscription(row) for row in rows]


def _subscription(row: Row) -> Subscription:
    topic, channel, priority, timeout, deliver, linger, delay, dead = row
    options = Options(int(priority), int(timeout), int(deliver), int(linger), int(delay), dead)
    return Subscription(topic, channel, options)


async def dead_links(driver: Driver[Tally], limit: int) -> set[tuple[str, str]]:
    """(channel, its dead channel) pairs seen at the head of the ``limit`` deepest
    channels' queues: a message there that names a dead channel, or a dead letter that
    names its origin. A channel whose messages are all in flight shows none."""
    stmt = driver.prepare(_heads_stmt())
    links = set()
    for channel, dead, dead_from in await driver.read(partial(single, stmt, {"limit": limit})):
        if dead is not None and dead != channel:
            links.add((channel, dead))
        if dead_from is not None:
            links.add((dead_from, channel))
    return links
