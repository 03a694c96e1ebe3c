"""Message operations: add, claim, delete, drain, per-channel counts, peek, and the
poller's look at the channels consumers wait on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import sqlalchemy as sa

from linger import errors
from linger.auth.scopes import Patterns
from linger.store import leases
from linger.store.db import messages
from linger.store.driver import Declined, Driver, Operation, Prepared, Row, single
from linger.store.ledger import Tally
from linger.store.records import Detail, Message, Options
from linger.store.sql import (
    BATCH,
    MESSAGE_COLUMNS,
    READY,
    alive,
    announced,
    dead_after,
    delayed,
    first_ready,
    ids_in,
    in_batch,
    insert_one,
    leased,
    ms,
    ms_sql,
    param,
    parked,
    queued,
    recounted,
)

m = messages
# Channels that were long-polled this recently are listed even when empty.
POLLED_TTL_MS = 180_000
# A claim of many on PostgreSQL writes its channel's listing mark at most this often (ms).
_MARK_EVERY_MS = 1_000
# Claims of more messages than this run outside the write groups on PostgreSQL (``claim``).
_DIRECT_CLAIM = 10
# How long a drain waits before it looks again for rows that a transaction in flight held.
_DRAIN_RETRY = 0.005
STATES = ("ready", "hidden", "delayed")


def _claim_stmt(postgres: bool, *, bounded: bool = False) -> sa.ClauseElement:
    """Claim up to :n ready live messages of :channel in delivery order: lease each (one
    :lease value per claim, the token adds the id), hide it for its timeout and count the
    delivery. ``bounded``: stop at the message whose body reaches :budget bytes."""
    now = param("now")
    visible_at = now + ms_sql(m.c.timeout)
    budget = param("budget") if bounded else None
    chosen = first_ready(param("channel", sa.String), now, param("n"), budget=budget)
    return (
        sa.update(m)
        .where(ids_in(chosen, postgres=postgres))
        .values(
            visible_at=visible_at,
            deliveries=m.c.deliveries + 1,
            lease=param("nonce"),
            dead_at=dead_after(m.c.deliveries + 1, visible_at),
        )
        .returning(*MESSAGE_COLUMNS)
    )


def _peek_stmt(state: str) -> sa.ClauseElement:
    """Up to :n messages of :channel in ``state``, in delivery order, unchanged."""
    now = param("now")
    channel = param("channel", sa.String)
    if state == "ready":
        ids = first_ready(channel, now, param("n"), lock=False).subquery()
        where: sa.ColumnElement[bool] = m.c.id.in_(sa.select(ids.c.id))
    else:
        held = leased(now) if state == "hidden" else delayed(now)
        where = sa.and_(m.c.channel == channel, parked(), held, alive(now))
    return sa.select(*MESSAGE_COLUMNS).where(where).order_by(m.c.priority, m.c.id).limit(param("n"))


def _detail_stmt() -> sa.ClauseElement:
    """(queued, due, leased, delayed, oldest ready created_at) of :channel's live rows."""
    now = param("now")
    channel = m.c.channel == param("channel", sa.String)

    def count(condition: sa.ColumnElement[bool]) -> Any:
        return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

    in_queue = (
        sa.select(sa.func.count().label("n"), sa.func.min(m.c.created_at).label("oldest"))
        .where(channel, queued(), alive(now))
        .subquery()
    )
    due = m.c.visible_at <= now
    in_parked = (
        sa.select(
            count(due).label("due"),
            count(leased(now)).label("leased"),
            count(delayed(now)).label("delayed"),
            sa.func.min(sa.case((due, m.c.created_at))).label("oldest"),
        )
        .where(channel, parked(), alive(now))
        .subquery()
    )
    return sa.select(
        in_queue.c.n,
        in_parked.c.due,
        in_parked.c.leased,
        in_parked.c.delayed,
        in_queue.c.oldest,
        in_parked.c.oldest,
    )


class Messages:
    """The operations on messages; times come from ``now`` (clock milliseconds)."""

    def __init__(self, driver: Driver[Tally], now: Callable[[], int], origin: str) -> None:
        self._driver = driver
        self.now = now
        self.origin = origin
        postgres = driver.postgres
        prepare = driver.prepare
        insert = insert_one()
        self._add = prepare(announced(insert, postgres=postgres))
        self._claim = prepare(_claim_stmt(postgres))
        self._claim_bounded = prepare(_claim_stmt(postgres, bounded=True))
        now_ = param("now")
        self._delete = leases.Scoped(
            driver,
            lambda within: (
                sa.delete(m).where(*_deletable(now_, within)).returning(m.c.channel, m.c.body_id)
            ),
        )
        # Alone in its group, an add or a delete on PostgreSQL keeps the channel's count
        # in its own statement (``Driver.write``'s ``lone``).
        self._lone = _Lone(driver, insert, now_) if postgres else None
        # Channels whose listing mark a claim of many wrote since _marks_from (ms).
        self._marked: set[str] = set()
        self._marks_from = 0
        self._explain = prepare(leases.explain_stmt())
        in_channel = sa.and_(m.c.channel == param("channel", sa.String), m.c.id <= param("last"))
        self._drain = [
            prepare(
                sa.delete(m)
                .where(in_batch(sa.and_(in_channel, part), m.c.id, postgres=postgres))
                .returning(m.c.body_id)
            )
            for part in (queued(), parked())
        ]
        self._left = prepare(sa.select(m.c.id).where(in_channel).limit(1))
        self._last_id = prepare(sa.select(sa.func.coalesce(sa.func.max(m.c.id), 0)))
        self._detail = prepare(_detail_stmt())
        # Where the channel's dead letters came from: its queued and its parked rows
        # apart, so that each part reads its own index instead of the whole table.
        of_channel = sa.and_(m.c.channel == param("channel", sa.String), m.c.dead_from.is_not(None))
        self._dead_from = prepare(
            sa.union(
                sa.select(m.c.dead_from).where(of_channel, queued()),
                sa.select(m.c.dead_from).where(of_channel, parked()),
            )
        )
        self._peek = {state: prepare(_peek_stmt(state)) for state in STATES}

    async def _read(self, stmt: Prepared, **params: Any) -> list[Row]:
        return await self._driver.read(partial(single, stmt, params))

    async def add(
        self, channel: str, body: bytes, content_type: str, options: Options, hlm: int = 0
    ) -> int:
        """Store a message (ready, or delayed by ``options.delay``) and return its id;
        raise ``ChannelFull`` when the channel already holds ``hlm`` (> 0) live messages."""
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
            "dead": options.dead,
            "created_at": now,
            "visible_at": now + ms(options.delay) if options.delay > 0 else READY,
            "deliveries": 0,
            "origin": self.origin,
            "dead_at": now + ms(options.linger) if options.linger > 0 else None,
        }
        # The high-level mark is checked by the ledger, with the channel's row locked.
        lone = None
        if self._lone is not None and hlm == 0:
            lone = partial(single, self._lone.add, params)
        self._driver.stored(len(body))
        rows = await self._driver.write(
            partial(self._add_operation, params, hlm), body_bytes=len(body), lone=lone
        )
        return int(rows[0][1])

    def _add_operation(
        self, params: dict[str, Any], hlm: int, ledger: Tally
    ) -> Operation[list[Row]]:
        rows = yield self._add, params
        message_id = int(rows[0][1])
        channel = params["channel"]

        def refuse(outcome: Any, count: int) -> None:
            outcome.error = errors.ChannelFull(
                f"Channel {channel} is at the high-level mark with {count} messages"
            )

        ledger.added(channel, message_id, hlm=hlm, refuse=refuse)
        return rows

    async def claim(
        self,
        channel: str,
        n: int = 1,
        *,
        listed: bool = False,
        budget: tuple[int, int] | None = None,
    ) -> list[Message]:
        """Deliver up to ``n`` ready messages of ``channel`` in delivery order, each with a
        lease of its own; with ``listed``, a consumer long-polls the channel: list it for
        180 s from now. ``budget`` (bytes, bytes of a shared body) ends the messages with
        the first one whose body reaches that many bytes."""
        now = self.now()
        params = {"channel": channel, "now": now, "n": n, "nonce": leases.new_nonce()}
        stmt = self._claim
        if budget is not None:
            stmt = self._claim_bounded
            params["budget"], params["shared"] = budget
        # A claim of many runs outside the write groups on PostgreSQL (``direct``: SKIP
        # LOCKED waits for no row, and the claim notes nothing in the ledger), so a
        # batch consumer never waits for the adds' and deletes' commits. Its listing mark
        # is then a write of its own, once a second per channel at most: a long-polled
        # channel stays listed for 180 s after its last poll, give or take that second.
        direct = self._driver.postgres and n > _DIRECT_CLAIM
        if direct and listed:
            listed = False
            await self._mark_listed(channel, now)
        # The claim is one statement; the listing mark is independent of it.
        return await self._driver.write(
            partial(self._claim_operation, stmt, params, listed),
            atomic=False,
            rows=n,
            direct=direct,
        )

    async def _mark_listed(self, channel: str, now: int) -> None:
        """``polled(channel)``, unless a claim of many wrote it within the last second
        (what is remembered is bounded by the channels claimed from in a second)."""
        if now - self._marks_from >= _MARK_EVERY_MS:
            self._marked.clear()
            self._marks_from = now
        if channel not in self._marked:
            self._marked.add(channel)
            await self.polled(channel)

    def _claim_operation(
        self, stmt: Prepared, params: dict[str, Any], listed: bool, ledger: Tally
    ) -> Operation[list[Message]]:
        rows = yield stmt, params
        if listed:
            ledger.polled(params["channel"], params["now"])
        nonce = params["nonce"]
        return [
            _message(row, leases.token(int(row[0]), nonce))
            for row in sorted(rows, key=lambda row: (row[4], row[0]))  # (priority, id)
        ]

    async def polled(self, channel: str) -> None:
        """A consumer long-polls ``channel``, or stopped now: list it for 180 s from now."""
        until = self.now()
        await self._driver.write(
            lambda ledger: _note_polled(ledger, channel, until), atomic=False, body_bytes=0
        )

    async def delete(
        self, message_id: int, lease: int | None = None, scope: Patterns | None = None
    ) -> None:
        """Delete a live message in any state (with ``lease``: only while that lease is
        current, else ``LeaseStale``; with ``scope``: only in a channel it covers, else
        ``NotAllowed``); raise ``NotFound`` when there is none."""
        params = {
            "id": message_id,
            "now": self.now(),
            "nonce": lease,
            **leases.scoped(scope, postgres=self._driver.postgres),
        }
        await self._driver.write(
            partial(self._delete_operation, params),
            key=("message", message_id),
            lone=None if self._lone is None else partial(self._delete_lone, self._lone, params),
        )

    def _delete_lone(self, lone: _Lone, params: dict[str, Any]) -> Operation[None]:
        """A delete that keeps the count in its statement; declined for a message whose
        body is shared (the ledger counts the body's references)."""
        rows = yield lone.delete(params), params
        if rows and rows[0][3]:
            return
        why = [row[:3] for row in rows]
        if not leases.would_act(why, params["nonce"], params["scope"]):
            leases.raise_for(why, params["nonce"], params["scope"])
        raise Declined()

    def _delete_operation(self, params: dict[str, Any], ledger: Tally) -> Operation[None]:
        rows = yield self._delete(params), params
        if not rows:
            leases.raise_for((yield self._explain, params), params["nonce"], params["scope"])
        ledger.removed(rows[0][0], rows[0][1])

    async def drain(self, channel: str) -> int:
        """Delete every message ``channel`` held when the drain began, in batches (each a
        short transaction that skips rows other transactions hold, and so never waits for
        a lock); return how many there were."""
        last = (await self._read(self._last_id))[0][0]
        params = {"channel": channel, "last": int(last)}
        drained = 0
        while True:
            count, full = await self._driver.write(
                partial(self._drain_operation, params), alone=True
            )
            drained += count
            if full:
                continue
            if not await self._read(self._left, **params):
                return drained
            await asyncio.sleep(_DRAIN_RETRY)

    def _drain_operation(
        self, params: dict[str, Any], ledger: Tally
    ) -> Operation[tuple[int, bool]]:
        count, full = 0, False
        for stmt in self._drain:
            rows = yield stmt, params
            for (body_id,) in rows:
                ledger.removed(params["channel"], body_id)
            count += len(rows)
            full = full or len(rows) == BATCH
        return count, full

    async def detail(self, channel: str) -> Detail:
        """``channel``'s counts by state, oldest ready age and dead-letter origins."""
        now = self.now()
        row = (await self._read(self._detail, channel=channel, now=now))[0]
        queued, due, hidden, waiting, oldest_queued, oldest_due = row
        oldest = min((t for t in (oldest_queued, oldest_due) if t is not None), default=None)
        age = 0 if oldest is None else max(0, now - int(oldest)) // 1000
        origins = sorted(r[0] for r in await self._read(self._dead_from, channel=channel))
        return Detail(int(queued) + int(due), int(hidden), int(waiting), age, origins)

    async def channel_stats(self, channel: str) -> tuple[int, int]:
        """(ready, hidden) live messages of ``channel``; hidden counts delayed ones too."""
        row = (await self._read(self._detail, channel=channel, now=self.now()))[0]
        return int(row[0]) + int(row[1]), int(row[2]) + int(row[3])

    async def peek(self, channel: str, state: str, n: int) -> list[Message]:
        """Up to ``n`` messages of ``channel`` in ``state``, in delivery order, without
        leasing or counting anything."""
        params = {"channel": channel, "now": self.now(), "n": n}
        peek = partial(self._peek_operation, self._peek[state], params)
        return await self._driver.read(peek, heavy=True)

    def _peek_operation(self, stmt: Prepared, params: dict[str, Any]) -> Operation[list[Message]]:
        return [_message(row) for row in (yield stmt, params)]

    async def readiness(self, names: Iterable[str]) -> dict[str, tuple[int, int | None]]:
        """For each of ``names`` with live messages: (how many are ready, when the next
        parked one becomes visible, in clock milliseconds, or None)."""
        now = sa.bindparam("now", self.now(), type_=sa.BigInteger)
        listed = list(names)
        in_names = m.c.channel.in_(listed)
        counts: dict[str, int] = {}
        for part in (queued(), sa.and_(parked(), m.c.visible_at <= now)):
            ready = (
                sa.select(m.c.channel, sa.func.count())
                .where(in_names, part, alive(now))
                .group_by(m.c.channel)
            )
            for channel, count in await self._read(self._driver.prepare(ready)):
                counts[channel] = counts.get(channel, 0) + int(count)
        # The next visible_at of the parked, read from their index (the dead ones
        # included: an early look costs one more claim, no more).
        upcoming = (
            sa.select(m.c.channel, sa.func.min(m.c.visible_at))
            .where(parked(), m.c.visible_at > now, in_names)  # parked(): the index's own
            .group_by(m.c.channel)
        )
        soonest = {row[0]: int(row[1]) for row in await self._read(self._driver.prepare(upcoming))}
        return {
            channel: (counts.get(channel, 0), soonest.get(channel))
            for channel in counts.keys() | soonest.keys()
        }


def _deletable(now: Any, within: tuple[sa.ColumnElement[bool], ...]) -> list[Any]:
    """What ``Messages.delete`` deletes: :id, alive, its lease presented (or none),
    ``within`` a scope."""
    return [m.c.id == param("id"), alive(now), leases.presented(), *within]


class _Lone:
    """The statements of a single add and delete that keep the channel's count
    themselves (PostgreSQL's data-changing CTEs)."""

    def __init__(self, driver: Driver[Tally], insert: sa.Insert, now: Any) -> None:
        self.add = driver.prepare(announced(insert, postgres=True, change=1))
        self.delete = leases.Scoped(driver, partial(_delete_counted, now))


def _delete_counted(now: Any, within: tuple[sa.ColumnElement[bool], ...]) -> Any:
    """The delete of ``Messages.delete`` for a message whose body is not shared, moving
    its channel's count in the same statement (PostgreSQL). One row: (-, -, channel,
    true) when it deleted, else ``explain_stmt``'s row (lease, hidden, channel) and false:
    the explanation costs no second round trip. (That row is read in the statement's
    snapshot, from before any change it waited for: an explanation that says the delete
    should have acted only sends the operation to its transaction, which looks again.)"""
    gone = (
        sa.delete(m)
        .where(*_deletable(now, within), m.c.body_id.is_(None))
        .returning(m.c.channel)
        .cte("gone")
    )
    deleted = sa.select(sa.null(), sa.null(), gone.c.channel, sa.true())
    kept = sa.not_(sa.exists(sa.select(gone.c.channel)))
    explained = leases.explain_stmt(kept).add_columns(sa.false())
    return sa.union_all(deleted, explained).add_cte(recounted(gone, -1))


def _message(row: Row, lease: str | None = None) -> Message:
    """A ``Message`` from a row of MESSAGE_COLUMNS."""
    message_id, channel, body, content_type, priority, timeout, deliver, *rest = row
    deliveries, linger, topic, created_at, dead_from, dead_reason, body_id = rest
    if body_id is not None and not body:  # shared bodies are never empty
        # Only a database edited by hand gets here: rather a 500 than an empty message.
        raise RuntimeError(f"message {message_id} refers to body {body_id}, which is gone")
    return Message(
        int(message_id),
        channel,
        bytes(body),
        content_type,
        int(priority),
        int(timeout),
        int(deliver),
        int(deliveries),
        int(linger),
        topic,
        int(created_at),
        dead_from,
        dead_reason,
        lease,
    )


def _note_polled(ledger: Tally, channel: str, until: int) -> Operation[None]:
    """An operation without statements: it only notes."""
    ledger.polled(channel, until)
    yield from ()
