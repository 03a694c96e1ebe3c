"""Pieces of SQL shared by the storage modules: binds, times, liveness, column lists."""

from __future__ import annotations

import json
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from linger.auth.scopes import Patterns
from linger.store.db import bodies, channels, messages

m = messages

# visible_at of a new message: ready whatever "now" a concurrent claim computed (on this
# host or another one whose clock is a little behind).
READY = 0
# Durations are capped (about 31,700 years) so that no time computed in SQL overflows.
MAX_SECONDS = 10**12
_MAX_SECONDS_SQL = sa.literal_column(str(MAX_SECONDS), sa.BigInteger)


def queued() -> sa.ColumnElement[bool]:
    """In the queue (ix_messages_queue): the literal matches the partial index's WHERE,
    which a bound parameter would not (SQLite never, PostgreSQL not in a generic plan)."""
    return m.c.visible_at == sa.literal_column("0", sa.BigInteger)


def parked() -> sa.ColumnElement[bool]:
    """Delivered or delayed (ix_messages_parked); a literal, as for ``queued``."""
    return m.c.visible_at > sa.literal_column("0", sa.BigInteger)


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


def counts_upsert(chosen: sa.Select[Any], *, postgres: bool) -> Any:
    """An upsert of the channels' rows from ``chosen`` (name, polled_at, change in
    messages): each count moves by its change, polled_at keeps the later time."""
    insert = postgresql.insert if postgres else sqlite.insert
    upsert = insert(channels).from_select(["name", "polled_at", "messages"], chosen)
    return upsert.on_conflict_do_update(
        index_elements=[channels.c.name],
        set_={
            "messages": channels.c.messages + upsert.excluded.messages,
            "polled_at": greatest(channels.c.polled_at, upsert.excluded.polled_at),
        },
    )


def recounted(changed: Any, change: int) -> Any:
    """On PostgreSQL, a data-changing CTE that moves the count of each channel that the
    rows of ``changed`` (a data-changing CTE of messages returning ``channel``) name by
    ``change`` per row: a write alone in its group keeps the counts in its own statement,
    without the ledger's transaction. One channel per statement, so it locks one row."""
    delta = sa.literal_column(str(change), sa.BigInteger)
    chosen = sa.select(changed.c.channel, sa.literal_column("0", sa.BigInteger), delta)
    return counts_upsert(chosen, postgres=True).cte("counted")


def alive(now: sa.ColumnElement[int]) -> sa.ColumnElement[bool]:
    """Messages not yet past their retention or their last allowed delivery."""
    return sa.or_(m.c.dead_at.is_(None), m.c.dead_at > now)


def ready(now: sa.ColumnElement[int]) -> sa.ColumnElement[bool]:
    return m.c.visible_at <= now


def leased(now: sa.ColumnElement[int]) -> sa.ColumnElement[bool]:
    """Hidden: delivered, its lease running."""
    return sa.and_(m.c.visible_at > now, m.c.lease.is_not(None))


def delayed(now: sa.ColumnElement[int]) -> sa.ColumnElement[bool]:
    """Not deliverable yet and not leased: a delay, or a release with one."""
    return sa.and_(m.c.visible_at > now, m.c.lease.is_(None))


def dead_after(deliveries: sa.ColumnElement[int], visible_at: sa.ColumnElement[int]) -> Any:
    """dead_at once a message has had ``deliveries``: the end of the last allowed
    delivery's timeout (``visible_at``) or the retention end, whichever is first."""
    retention_end = m.c.created_at + ms_sql(m.c.linger)
    last_end = sa.case(
        (sa.and_(m.c.linger > 0, retention_end < visible_at), retention_end), else_=visible_at
    )
    exhausted = sa.and_(m.c.deliver > 0, deliveries >= m.c.deliver)
    return sa.case((exhausted, last_end), else_=m.c.dead_at)


def first_ready(
    channel: sa.ColumnElement[str],
    now: sa.ColumnElement[int],
    count: Any,
    *,
    where: sa.ColumnElement[bool] | None = None,
    lock: bool = True,
    budget: Any = None,
) -> sa.Select[Any]:
    """The ids of up to ``count`` ready live messages of ``channel`` (and ``where``) in
    delivery order ((priority, id)); with ``lock``, locked (SKIP LOCKED on PostgreSQL, so
    that concurrent claims pass each other). Two looks, each reading about what it
    returns: the queue (ix_messages_queue holds no parked message, so messages in flight
    cost nothing) and the parked messages that are due now (the sweeper keeps those few)."""

    # With a ``budget`` (bytes of bodies), the messages chosen end with the first one that
    # reaches it; a shared body (not in the row) counts as :shared bytes.
    sized: list[Any] = []
    if budget is not None:
        size = sa.case((m.c.body_id.is_(None), sa.func.length(m.c.body)), else_=param("shared"))
        sized = [size.label("size")]

    def look(state: sa.ColumnElement[bool]) -> sa.Subquery:
        chosen = (
            sa.select(m.c.id, m.c.priority, *sized)
            .where(m.c.channel == channel, state, alive(now), sa.true() if where is None else where)
            .order_by(m.c.priority, m.c.id)
            .limit(count)
        )
        return (chosen.with_for_update(skip_locked=True) if lock else chosen).subquery()

    both = sa.union_all(
        *(
            sa.select(*look(state).c)
            for state in (queued(), sa.and_(parked(), m.c.visible_at <= now))
        )
    ).subquery()
    order = (both.c.priority, both.c.id)
    if budget is None:
        return sa.select(both.c.id).order_by(*order).limit(count)
    before = sa.func.sum(both.c.size).over(order_by=order) - both.c.size
    ranked = sa.select(both.c.id, both.c.priority, before.label("before")).subquery()
    return (
        sa.select(ranked.c.id)
        .where(ranked.c.before < budget)
        .order_by(ranked.c.priority, ranked.c.id)
        .limit(count)
    )


def ids_in(chosen: sa.Select[Any], *, postgres: bool) -> sa.ColumnElement[bool]:
    """``id`` among the ids ``chosen`` (``first_ready``) selects. On PostgreSQL a join (the
    statement's FROM), planned as an index lookup per row chosen: a claim is estimated at
    the few rows it takes, whatever the table's statistics say. By an array of ids
    (``id = ANY(...)``, estimated at ten elements) the planner scanned the whole table
    instead, with a generic plan made while the table was small (a fresh database, before
    autovacuum's first look), which it goes on estimating at ten pages: a claim of 100
    took 5 ms where it takes 2. Not by ``ctid``: a row updated and committed after the
    statement began is locked in its newest version, which the statement's snapshot
    cannot see, and would be locked but left unclaimed."""
    if not postgres:
        return m.c.id.in_(chosen)
    return m.c.id == chosen.subquery("chosen").c.id


def in_batch(where: sa.ColumnElement[bool], *order: Any, postgres: bool) -> sa.ColumnElement[bool]:
    """The ids of at most ``BATCH`` rows matching ``where`` that no other transaction has
    locked (PostgreSQL's SKIP LOCKED; SQLite has one writer): a bounded statement that
    never waits for a lock, so it can neither stall nor deadlock. On PostgreSQL by an
    array of ids, looked up in the primary key: joined, a thousand rows chosen out of a
    large table are estimated cheaper by a hash join over all of it."""
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


# The columns of a ``records.Message``, in its order. A body published to many channels is
# read from ``bodies`` in the same statement: a statement of its own could find it gone (the
# last copy deleted in between). Not ``CASE WHEN body_id IS NULL``: in SQLite 3.40, ``IS
# NULL`` in this table's RETURNING is false for NULL columns (seen on body_id and dead_at).
MESSAGE_COLUMNS = (
    m.c.id,
    m.c.channel,
    sa.func.coalesce(
        sa.select(bodies.c.body).where(bodies.c.id == m.c.body_id).scalar_subquery(), m.c.body
    ).label("body"),
    m.c.content_type,
    m.c.priority,
    m.c.timeout,
    m.c.deliver,
    m.c.deliveries,
    m.c.linger,
    m.c.topic,
    m.c.created_at,
    m.c.dead_from,
    m.c.dead_reason,
    m.c.body_id,  # to tell a shared body that is gone from the copy's own, empty one
)


def insert_one() -> sa.Insert:
    """An INSERT of one message, every column of ``INSERT_TYPES`` bound by name."""
    return sa.insert(m).values({name: param(name, t) for name, t in INSERT_TYPES.items()})


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
    "dead": sa.String,
    "created_at": sa.BigInteger,
    "visible_at": sa.BigInteger,
    "dead_at": sa.BigInteger,
    "deliveries": sa.BigInteger,
}


# The PostgreSQL NOTIFY channel that announces new messages to every Linger process.
NOTIFY_CHANNEL = "linger"


def announced(
    stmt: Any, *columns: Any, postgres: bool, counted: bool = False, change: int = 0
) -> sa.ClauseElement:
    """``stmt`` (an insert or update of messages) returning (channel, id, *columns) of
    each message it made ready. On PostgreSQL it also NOTIFYs each one's channel, tagged
    with :origin (the process), in the same statement: the notifications go out at
    commit, and a rollback sends none. PostgreSQL delivers one notification per distinct
    payload of a transaction: with ``counted`` (statements of many messages), the payload
    carries how many messages the statement made ready in the channel
    (``<origin>/<count>:<channel>``), so that as many consumers wake elsewhere. With
    ``change`` (PostgreSQL), the statement moves each row's channel count by that much
    too (``recounted``)."""
    stmt = stmt.returning(m.c.channel, m.c.id, *columns)
    if not postgres:
        if change:
            raise ValueError("a statement keeps counts itself only on PostgreSQL")
        returning: sa.ClauseElement = stmt
        return returning
    changed = stmt.cte("changed")
    origin = param("origin", sa.String)
    if counted:
        count = sa.func.count().over(partition_by=changed.c.channel)
        payload = sa.func.concat(origin, "/", count, ":", changed.c.channel)
    else:
        payload = sa.func.concat(origin, ":", changed.c.channel)
    select = sa.select(*changed.c, sa.func.pg_notify(NOTIFY_CHANNEL, payload))
    return select.add_cte(recounted(changed, change)) if change else select


def given_ids(*, postgres: bool, table: sa.FromClause = m) -> sa.ColumnElement[bool]:
    """``id`` among the ids a batch names, bound as :ids (see ``given``): a lookup of
    each in the primary key."""
    if postgres:
        return table.c.id == sa.any_(param("ids", postgresql.ARRAY(sa.BigInteger)))
    ids = sa.func.json_each(param("ids", sa.String)).table_valued("value")
    return table.c.id.in_(sa.select(ids.c.value))


def permitted(
    *, postgres: bool, table: sa.FromClause = m, column: str = "channel"
) -> sa.ColumnElement[bool]:
    """The message's channel (or ``column``) matches one of the scope patterns bound as
    :patterns (see ``patterns``): ``LIKE ANY`` of an array on PostgreSQL, ``GLOB`` over a
    JSON array on SQLite (both case-sensitive)."""
    channel = table.c[column]
    if postgres:
        return channel.like(sa.any_(param("patterns", postgresql.ARRAY(sa.Text))))
    globs = sa.func.json_each(param("patterns", sa.String)).table_valued("value")
    return sa.exists(sa.select(1).select_from(globs).where(channel.op("GLOB")(globs.c.value)))


def all_permitted(*, postgres: bool) -> sa.ColumnElement[bool]:
    """Every message a batch names (:ids) is in a channel the scope patterns allow: the
    batch acts on all of them or on none."""
    other = m.alias("named")
    return sa.not_(
        sa.exists(
            sa.select(1)
            .select_from(other)
            .where(
                given_ids(postgres=postgres, table=other),
                sa.not_(permitted(postgres=postgres, table=other)),
            )
        )
    )


def patterns(globs: Patterns, *, postgres: bool) -> str | list[str]:
    """The :patterns parameter of ``permitted``."""
    return globs.like() if postgres else json.dumps(globs.glob())


def given_leases(*, postgres: bool) -> sa.ColumnElement[bool]:
    """(id, lease) among the leases a batch presents, bound as :ids and :nonces (SQLite:
    :ids and :pairs)."""
    if postgres:
        pairs = (
            sa.func.unnest(
                param("ids", postgresql.ARRAY(sa.BigInteger)),
                param("nonces", postgresql.ARRAY(sa.BigInteger)),
            )
            .table_valued("id", "nonce")
            .render_derived("given")
        )
        chosen = sa.select(pairs.c.id, pairs.c.nonce)
    else:
        # One JSON array of [id, lease] pairs: read in one pass.
        pairs = sa.func.json_each(param("pairs", sa.String)).table_valued("value")
        chosen = sa.select(
            sa.func.json_extract(pairs.c.value, "$[0]"), sa.func.json_extract(pairs.c.value, "$[1]")
        )
    return sa.and_(given_ids(postgres=postgres), sa.tuple_(m.c.id, m.c.lease).in_(chosen))


def given(ids: list[int], nonces: list[int] | None, *, postgres: bool) -> dict[str, Any]:
    """The parameters of ``given_ids`` / ``given_leases``: arrays on PostgreSQL, JSON
    arrays on SQLite (which has no array parameters)."""
    if postgres:
        return {"ids": ids, "nonces": nonces}
    # Only integers: orjson writes them in a quarter of the standard library's time.
    pairs = None if nonces is None else orjson.dumps(list(zip(ids, nonces, strict=True))).decode()
    return {"ids": orjson.dumps(ids).decode(), "pairs": pairs}
