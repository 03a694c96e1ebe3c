"""Pieces of SQL shared by the storage modules: binds, times, liveness, column lists."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from linger.store.db import messages

m = messages

# visible_at of a new message: ready whatever "now" a concurrent claim computed (on this
# host or another one whose clock is a little behind).
READY = 0
# Durations are capped (about 31,700 years) so that no time computed in SQL overflows.
MAX_SECONDS = 10**12
_MAX_SECONDS_SQL = sa.literal_column(str(MAX_SECONDS), sa.BigInteger)
# Rows one statement of a sweep or a drain deletes at most: each batch is a short
# transaction of its own, so that other writers are never held up for long.
BATCH = 1000


def param(name: str, type_: Any = sa.BigInteger) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=type_)


def ms(seconds: int) -> int:
    return min(seconds, MAX_SECONDS) * 1000


def ms_sql(seconds: sa.ColumnElement[int]) -> sa.ColumnElement[int]:
    capped = sa.case((seconds > _MAX_SECONDS_SQL, _MAX_SECONDS_SQL), else_=seconds)
    return capped * sa.literal_column("1000", sa.BigInteger)


def greatest(a: sa.ColumnElement[int], b: sa.ColumnElement[int]) -> sa.ColumnElement[int]:
    """The larger of two values, on every backend."""
    return sa.case((a > b, a), else_=b)


def alive(now: sa.ColumnElement[int]) -> sa.ColumnElement[bool]:
    """Messages not yet past their retention or their last allowed delivery."""
    return sa.or_(m.c.dead_at.is_(None), m.c.dead_at > now)


def in_batch(where: sa.ColumnElement[bool], *order: Any, postgres: bool) -> sa.ColumnElement[bool]:
    """The ids of at most ``BATCH`` rows matching ``where`` that no other transaction has
    locked (PostgreSQL's SKIP LOCKED; SQLite has one writer): a bounded statement that
    never waits for a lock, so it can neither stall nor deadlock. On PostgreSQL the ids
    come as an array, which the planner looks up in the primary key (``IN (SELECT ...)``
    may make it hash-join a scan of the whole table)."""
    chosen = (
        sa.select(m.c.id)
        .where(where)
        .order_by(*order)
        .limit(BATCH)
        .with_for_update(skip_locked=True)
    )
    if not postgres:
        return m.c.id.in_(chosen)
    ids = sa.select(sa.func.array_agg(chosen.subquery().c.id)).scalar_subquery()
    # The cast makes it an array expression, not ANY's subquery form.
    return m.c.id == sa.any_(sa.cast(ids, postgresql.ARRAY(sa.BigInteger)))


MESSAGE_COLUMNS = (
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
INSERT_TYPES: dict[str, Any] = {
    "channel": sa.String,
    "priority": sa.BigInteger,
    "timeout": sa.BigInteger,
    "deliver": sa.BigInteger,
    "linger": sa.BigInteger,
    "topic": sa.String,
    "content_type": sa.Text,
    "body": sa.LargeBinary,
    "body_id": sa.BigInteger,
    "created_at": sa.BigInteger,
    "visible_at": sa.BigInteger,
    "dead_at": sa.BigInteger,
    "deliveries": sa.BigInteger,
}


# The PostgreSQL NOTIFY channel that announces new messages to every Linger process.
NOTIFY_CHANNEL = "linger"


def announced(stmt: sa.Insert, *, postgres: bool) -> sa.ClauseElement:
    """``stmt`` returning (channel, id) of each inserted message. On PostgreSQL it also
    NOTIFYs every inserted message's channel, tagged with :origin (the process), in the
    same statement: the notifications go out at commit, and a rollback sends none."""
    stmt = stmt.returning(m.c.channel, m.c.id)
    if not postgres:
        return stmt
    inserted = stmt.cte("inserted")
    payload = sa.func.concat(param("origin", sa.String), ":", inserted.c.channel)
    return sa.select(inserted.c.channel, inserted.c.id, sa.func.pg_notify(NOTIFY_CHANNEL, payload))
