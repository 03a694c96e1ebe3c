"""Batches: add many messages to a channel, and act on many delivered messages at once
(delete, touch, release, reject), each batch one transaction.

Where the SQL allows, a batch is one statement: on PostgreSQL the add is one
``INSERT ... SELECT FROM unnest(<arrays>)`` and every acknowledgement one statement over
the arrays of ids and lease values. SQLite has no array parameters: its add runs the one
prepared INSERT once per message inside the group's transaction (in-process, each run is
a step of the same compiled statement, not a round trip), and its acknowledgements read
the ids and lease values from JSON arrays. Batch receives are ``Messages.claim`` with a
count (one claim statement).

A batch names each message once (the HTTP layer refuses one that names a message
twice). Acknowledgements lock their rows in id order (the ids are sorted, and the group
runs the batch at its lowest id's place among keyed operations), so batches and single
operations wait for each other's rows in the same order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from operator import itemgetter
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from linger import errors
from linger.auth.scopes import Patterns
from linger.store import deadletters, leases
from linger.store.db import messages
from linger.store.driver import Driver, Operation, single
from linger.store.leases import Build, Scoped
from linger.store.ledger import Tally
from linger.store.records import DONE, MISSING, STALE, NewMessage
from linger.store.sql import (
    INSERT_TYPES,
    READY,
    alive,
    all_permitted,
    announced,
    given,
    given_ids,
    given_leases,
    ms,
    param,
)

m = messages
# (message id, lease value or None): what a batch acknowledgement names.
Named = tuple[int, int | None]
# The columns a batch add gives per message (the others are the same for all).
_PER_MESSAGE: dict[str, Any] = {
    "priority": sa.BigInteger,
    "timeout": sa.BigInteger,
    "deliver": sa.BigInteger,
    "linger": sa.BigInteger,
    "content_type": sa.Text,
    "body": sa.LargeBinary,
    "dead": sa.String,
    "visible_at": sa.BigInteger,
    "dead_at": sa.BigInteger,
}


@dataclass(frozen=True, slots=True)
class Acknowledged:
    """What a batch acknowledgement did to each message named (DONE, STALE or MISSING,
    in the order named), and the channels it made messages ready in, with how many."""

    outcomes: list[str]
    ready: Counter[str]
    discarded: int = 0


@dataclass(slots=True)
class _Acted:
    """What one acknowledgement operation did (a retry starts a fresh one)."""

    done: set[int] = field(default_factory=set)
    ready: Counter[str] = field(default_factory=Counter)
    discarded: int = 0


def _add_many_stmt() -> sa.Insert:
    """PostgreSQL: insert one message per element of the :<column> arrays into :channel."""
    arrays = [param(name, postgresql.ARRAY(t)) for name, t in _PER_MESSAGE.items()]
    rows = sa.func.unnest(*arrays).table_valued(*_PER_MESSAGE).render_derived("items")
    values = {
        **{name: rows.c[name] for name in _PER_MESSAGE},
        "channel": param("channel", sa.String),
        "topic": sa.literal(""),
        "body_id": sa.null(),
        "created_at": param("now"),
        "deliveries": sa.literal_column("0", sa.BigInteger),
    }
    return sa.insert(m).from_select(
        list(INSERT_TYPES), sa.select(*(values[n] for n in INSERT_TYPES))
    )


# SQLite stores a batch by multi-row INSERTs of these many rows (largest first): a few
# statements instead of one per message, each compiled once; 64 rows bind 896 values,
# far below SQLite's limit of 32,766.
_CHUNKS = (64, 8, 1)


def _add_rows(count: int) -> sa.ClauseElement:
    """SQLite's add of ``count`` messages of a batch (``_insert_rows``)."""
    return announced(_insert_rows(count), postgres=False)


def _insert_rows(count: int) -> sa.Insert:
    """An INSERT of ``count`` messages, row i's columns bound as ``<column>_<i>``."""
    return sa.insert(m).values(
        [{name: param(f"{name}_{i}", t) for name, t in INSERT_TYPES.items()} for i in range(count)]
    )


def _row(message: NewMessage, now: int) -> tuple[Any, ...]:
    """The per-message column values of ``message`` added at ``now``, in the order of
    ``_PER_MESSAGE``."""
    options = message.options
    return (
        options.priority,
        options.timeout,
        options.deliver,
        options.linger,
        message.content_type,
        message.body,
        options.dead,
        now + ms(options.delay) if options.delay > 0 else READY,
        now + ms(options.linger) if options.linger > 0 else None,
    )


class Batches:
    """Batch adds and acknowledgements; times come from ``now`` (clock milliseconds)."""

    def __init__(self, driver: Driver[Tally], now: Callable[[], int], origin: str) -> None:
        self._driver = driver
        self.now = now
        self.origin = origin
        self._postgres = postgres = driver.postgres
        prepare = driver.prepare
        if postgres:
            self._add = prepare(announced(_add_many_stmt(), postgres=True, counted=True))
        else:
            # The 64-row INSERT alone takes tens of milliseconds to compile.
            self._adds = {
                k: driver.prepare_once(("add rows", k), partial(_add_rows, k)) for k in _CHUNKS
            }
            # The columns of each row, in the order of the statements' arguments: where
            # each is in a tuple of the batch's values (_shared) and a row's.
            columns = [n.rsplit("_", 1)[0] for n in self._adds[1].names]
            self._shared = [name for name in columns if name not in _PER_MESSAGE]
            both = [*self._shared, *_PER_MESSAGE]
            self._arguments = itemgetter(*(both.index(name) for name in columns))
        by_lease = sa.and_(given_leases(postgres=postgres), alive(param("now")))
        by_id = sa.and_(given_ids(postgres=postgres), alive(param("now")))
        gone = (m.c.id, m.c.channel, m.c.body_id)

        def scoped(build: Build) -> Scoped:
            # Limited to a scope, a batch acts on all the messages it names when every one
            # is in a channel the scope covers, and on none otherwise: in one statement.
            def whole(within: tuple[sa.ColumnElement[bool], ...]) -> Any:
                return build((*within, all_permitted(postgres=postgres)) if within else ())

            return Scoped(driver, whole)

        self._delete = {
            True: scoped(lambda within: sa.delete(m).where(by_lease, *within).returning(*gone)),
            False: scoped(lambda within: sa.delete(m).where(by_id, *within).returning(*gone)),
        }
        held = sa.and_(given_leases(postgres=postgres), leases.held_now())
        self._touch = scoped(
            lambda within: (
                sa.update(m).where(held, *within).values(leases.touched()).returning(m.c.id)
            )
        )
        self._release = scoped(
            lambda within: announced(
                sa.update(m).where(held, *within).values(leases.released()),
                m.c.visible_at,
                postgres=postgres,
                counted=True,
            )
        )
        moved = deadletters.moved_values("rejected")
        self._reject_move = scoped(
            lambda within: announced(
                sa.update(m).where(held, leases.rejectable(), *within).values(moved),
                m.c.dead_from,
                postgres=postgres,
                counted=True,
            )
        )
        self._reject_delete = scoped(
            lambda within: (
                sa.delete(m).where(held, sa.not_(leases.rejectable()), *within).returning(*gone)
            )
        )
        self._live = prepare(sa.select(m.c.id, m.c.channel).where(by_id))

    async def add(self, channel: str, batch: Sequence[NewMessage], hlm: int = 0) -> list[int]:
        """Store every message of ``batch`` in ``channel`` (in order: ids ascend) and
        return their ids; store none and raise ``ChannelFull`` when they would take the
        channel past ``hlm`` (> 0) live messages."""
        now = self.now()
        common = {
            "channel": channel,
            "now": now,
            "origin": self.origin,
            "topic": "",
            "body_id": None,
            "created_at": now,
            "deliveries": 0,
        }
        # Each message's values in _PER_MESSAGE's order, as a tuple (one per message).
        rows = [_row(message, now) for message in batch]
        if self._postgres:
            arrays = {name: [row[i] for row in rows] for i, name in enumerate(_PER_MESSAGE)}
            params: Any = {**common, **arrays}
        else:
            # A row's arguments: picked in the columns' order from one tuple of the
            # batch's values and the message's.
            head = tuple(common[name] for name in self._shared)
            params = [self._arguments(head + row) for row in rows]
        sizes = [len(message.body) for message in batch]
        self._driver.stored(max(sizes, default=0))
        return await self._driver.write(
            partial(self._add_operation, channel, params, hlm),
            rows=len(batch),
            body_bytes=sum(sizes),
        )

    def _add_operation(
        self, channel: str, params: Any, hlm: int, ledger: Tally
    ) -> Operation[list[int]]:
        if self._postgres:
            rows = yield self._add, params
            # Ids come from the sequence in the order of the arrays.
            ids = sorted(int(row[1]) for row in rows)
        else:
            ids, start = [], 0
            for size, stmt in self._adds.items():
                while len(params) - start >= size:
                    args = [value for row in params[start : start + size] for value in row]
                    ids.extend(int(row[1]) for row in (yield stmt, args))
                    start += size
            # Ids are given in the order of the rows (AUTOINCREMENT), whatever RETURNING's.
            ids.sort()
        needed = len(ids)

        def refuse(outcome: Any, count: int) -> None:
            outcome.error = errors.ChannelFull(
                f"Channel {channel} cannot take {needed} more messages: "
                f"it is at the high-level mark with {count} messages"
            )

        ledger.added_all(channel, tuple(ids), hlm=hlm, refuse=refuse)
        return ids

    async def delete(
        self, named: Sequence[Named], *, by_lease: bool, scope: Patterns | None = None
    ) -> Acknowledged:
        """Delete the live messages named (``by_lease``: each only while the lease named
        is current; else by id, 1.0.1 style)."""
        return await self._act(self._delete_operation, named, scope, by_lease=by_lease)

    def _delete_operation(self, params: dict[str, Any], ledger: Tally) -> Operation[_Acted]:
        rows = yield self._delete[params["by_lease"]](params), params
        for _id, channel, body_id in rows:
            ledger.removed(channel, body_id)
        return _Acted({int(row[0]) for row in rows})

    async def touch(
        self, named: Sequence[Named], seconds: int | None, scope: Patterns | None = None
    ) -> Acknowledged:
        """Restart the leases named, for ``seconds`` (default: each message's timeout)."""
        return await self._act(self._touch_operation, named, scope, seconds=seconds)

    def _touch_operation(self, params: dict[str, Any], _ledger: Tally) -> Operation[_Acted]:
        return _Acted({int(row[0]) for row in (yield self._touch(params), params)})

    async def release(
        self, named: Sequence[Named], delay: int, scope: Patterns | None = None
    ) -> Acknowledged:
        """Give the messages named back: ready at once, or delayed ``delay`` s."""
        return await self._act(self._release_operation, named, scope, delay=delay)

    def _release_operation(self, params: dict[str, Any], _ledger: Tally) -> Operation[_Acted]:
        acted = _Acted()
        for channel, message_id, visible_at, *_notified in (yield self._release(params), params):
            acted.done.add(int(message_id))
            if visible_at == READY:
                acted.ready[channel] += 1
        return acted

    async def reject(self, named: Sequence[Named], scope: Patterns | None = None) -> Acknowledged:
        """Move the messages named to their dead channels (or discard those that have
        none or are dead letters already)."""
        return await self._act(self._reject_operation, named, scope)

    def _reject_operation(self, params: dict[str, Any], ledger: Tally) -> Operation[_Acted]:
        acted = _Acted()
        for dead, message_id, origin, *_notified in (yield self._reject_move(params), params):
            ledger.moved(origin, dead)
            acted.ready[dead] += 1
            acted.done.add(int(message_id))
        rows = yield self._reject_delete(params), params
        for message_id, channel, body_id in rows:
            ledger.removed(channel, body_id)
            acted.done.add(int(message_id))
        acted.discarded = len(rows)
        return acted

    async def _act(
        self,
        operation: Callable[[dict[str, Any], Tally], Operation[_Acted]],
        named: Sequence[Named],
        scope: Patterns | None,
        *,
        by_lease: bool = True,
        **extra: Any,
    ) -> Acknowledged:
        """Run acknowledgement ``operation`` on the messages ``named``, limited to
        ``scope``: ``NotAllowed`` when it left them alone because one is outside it."""
        ordered = sorted(named)
        ids = [message_id for message_id, _nonce in ordered]
        nonces = [nonce or 0 for _id, nonce in ordered] if by_lease else None
        params = {
            **given(ids, nonces, postgres=self._postgres),
            "now": self.now(),
            "origin": self.origin,
            "by_lease": by_lease,
            **leases.scoped(scope, postgres=self._postgres),
            **extra,
        }
        key = ("message", ids[0]) if ids else ()
        acted, live = await self._driver.write(
            partial(self._classified, operation, params, len(ids)),
            key=key,
            rows=len(ids),
        )
        outcomes = [
            DONE if message_id in acted.done else STALE if message_id in live else MISSING
            for message_id, _nonce in named
        ]
        return Acknowledged(outcomes, acted.ready, acted.discarded)

    def _classified(
        self,
        operation: Callable[[dict[str, Any], Tally], Operation[_Acted]],
        params: dict[str, Any],
        count: int,
        ledger: Tally,
    ) -> Operation[tuple[_Acted, set[int]]]:
        """Run ``operation``, then look up which of the ``count`` messages it left alone
        are still there (their lease was not the current one)."""
        acted = yield from operation(params, ledger)
        live: set[int] = set()
        if len(acted.done) < count:
            rows = yield from single(self._live, params)
            scope: Patterns | None = params["scope"]
            outside = {int(i) for i, channel in rows if scope and not scope.allows(channel)}
            if outside and not acted.done:
                raise errors.NotAllowed()
            # A message moved out of the scope after the statement began is gone for it.
            live = {int(row[0]) for row in rows} - acted.done - outside
        return acted, live
