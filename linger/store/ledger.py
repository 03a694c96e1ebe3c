"""The ledger of a write group: counters kept beside the rows, settled at the group's end.

Operations note what they did (a message added to or removed from a channel, a channel
long-polled, a shared body referenced) and the ledger applies it all in the same
transaction, after every operation of the group ran: each channel's row once, then each
shared body's row once, always in that order and sorted by key. Every lock a group takes
on these rows is thus taken in one global order, so that concurrent groups (in one
process or many) never deadlock over them, and a group costs one counter update per
channel it touched, not one per message.

The high-level mark is checked here too: the channel's row is locked and counts the
channel's messages exactly, so concurrent adds from any number of processes cannot pass
the mark together. Adds that would pass it are removed again and their operations fail
(or, for a publish, skip that channel).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from linger.store.db import bodies, channels, messages
from linger.store.driver import Driver, Operation, Outcome, Prepared, Row
from linger.store.sql import counts_upsert, given, given_ids, param

c = channels
Refusal = Callable[[Outcome, int], None]


@dataclass(frozen=True, slots=True)
class _Add:
    index: int
    channel: str
    message_ids: tuple[int, ...]
    hlm: int
    body_id: int | None
    refuse: Refusal | None


@dataclass(slots=True)
class _Entries:
    deltas: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    polled: dict[str, int] = field(default_factory=dict)
    refs: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    adds: list[_Add] = field(default_factory=list)


class LedgerStatements:
    """The ledger's statements, compiled once per driver."""

    def __init__(self, driver: Driver[Tally]) -> None:
        prepare = driver.prepare
        self.postgres = driver.postgres
        if driver.postgres:
            rows = (
                sa.func.unnest(
                    param("names", postgresql.ARRAY(sa.String)),
                    param("polled", postgresql.ARRAY(sa.BigInteger)),
                    param("deltas", postgresql.ARRAY(sa.BigInteger)),
                )
                .table_valued("name", "polled_at", "messages")
                .render_derived("counted")
            )
            # Rows are inserted, and so locked, in name order.
            chosen = sa.select(rows.c.name, rows.c.polled_at, rows.c.messages).order_by(rows.c.name)
        else:
            # One statement for every channel too: the rows come as a JSON array.
            rows = sa.func.json_each(param("rows", sa.String)).table_valued("value")
            fields = [sa.func.json_extract(rows.c.value, f"$[{i}]") for i in range(3)]
            # WHERE: SQLite's upsert after a SELECT needs one, to parse.
            chosen = sa.select(*fields).where(sa.true())
        upsert = counts_upsert(chosen, postgres=driver.postgres)
        self.upsert = prepare(upsert.returning(c.c.name, c.c.messages))
        self.correct = prepare(
            sa.update(c)
            .where(c.c.name == param("name", sa.String))
            .values(messages=c.c.messages + param("delta"))
        )
        m = messages
        self.dead = prepare(
            sa.select(sa.func.count())
            .select_from(m)
            .where(m.c.dead_at <= param("now"), m.c.channel == param("channel", sa.String))
        )
        self.remove = prepare(sa.delete(m).where(given_ids(postgres=driver.postgres)))
        self.reference = prepare(
            sa.update(bodies)
            .where(bodies.c.id == param("id"))
            .values(refs=bodies.c.refs + param("delta"))
        )
        self.unreferenced = prepare(
            sa.delete(bodies).where(bodies.c.id == param("id"), bodies.c.refs <= 0)
        )


class Tally:
    """The ``driver.Ledger`` of Linger's write groups."""

    def __init__(self, statements: LedgerStatements, now: Callable[[], int]) -> None:
        self._statements = statements
        self._now = now
        self._index = 0
        self._entries: dict[int, _Entries] = {}

    def _current(self) -> _Entries:
        entries = self._entries.get(self._index)
        if entries is None:
            entries = self._entries[self._index] = _Entries()
        return entries

    def begin(self, index: int) -> None:
        self._index = index

    def drop(self, index: int) -> None:
        self._entries.pop(index, None)

    def added(
        self,
        channel: str,
        message_id: int,
        *,
        hlm: int = 0,
        body_id: int | None = None,
        refuse: Refusal | None = None,
    ) -> None:
        """A message was added to ``channel``; with ``hlm`` > 0 it must not take the
        channel past that many messages, else it is removed again and ``refuse`` is called
        with the operation's outcome and the channel's count."""
        self.added_all(channel, (message_id,), hlm=hlm, body_id=body_id, refuse=refuse)

    def added_all(
        self,
        channel: str,
        message_ids: tuple[int, ...],
        *,
        hlm: int = 0,
        body_id: int | None = None,
        refuse: Refusal | None = None,
    ) -> None:
        """Messages were added to ``channel`` together (a batch): all of them stay, or
        none when they would take the channel past ``hlm``."""
        entries = self._current()
        entries.deltas[channel] += len(message_ids)
        if hlm > 0:
            entries.adds.append(_Add(self._index, channel, message_ids, hlm, body_id, refuse))

    def removed(self, channel: str, body_id: int | None = None) -> None:
        """A message of ``channel`` was deleted (with its reference to a shared body)."""
        entries = self._current()
        entries.deltas[channel] -= 1
        if body_id is not None:
            entries.refs[body_id] -= 1

    def moved(self, source: str, target: str) -> None:
        """A message moved from channel ``source`` to ``target`` (a dead letter, a
        redrive): never refused by the mark, so that nothing is lost to it."""
        entries = self._current()
        entries.deltas[source] -= 1
        entries.deltas[target] += 1

    def referenced(self, body_id: int, count: int) -> None:
        """``count`` new messages refer to shared body ``body_id``."""
        self._current().refs[body_id] += count

    def polled(self, channel: str, until: int) -> None:
        """A consumer long-polls ``channel``: it is listed for a while after ``until``."""
        polled = self._current().polled
        polled[channel] = max(polled.get(channel, 0), until)

    def settle(self, outcomes: list[Outcome]) -> Operation[None] | None:
        if not self._entries:
            return None
        total = _Entries()
        for index in sorted(self._entries):
            entries = self._entries[index]
            for channel, delta in entries.deltas.items():
                total.deltas[channel] += delta
            for channel, until in entries.polled.items():
                total.polled[channel] = max(total.polled.get(channel, 0), until)
            for body_id, delta in entries.refs.items():
                total.refs[body_id] += delta
            total.adds.extend(entries.adds)
        return self._settle(total, outcomes)

    def _settle(self, total: _Entries, outcomes: list[Outcome]) -> Operation[None]:
        s = self._statements
        by_channel: dict[str, list[_Add]] = defaultdict(list)
        for add in total.adds:
            by_channel[add.channel].append(add)
        # A channel whose changes cancel out (a message added and another deleted: the
        # single-message cycle's usual group) keeps its row untouched, unlocked, unless
        # a mark is to be checked on it.
        changed = {name for name, delta in total.deltas.items() if delta}
        names = sorted(changed | total.polled.keys() | by_channel.keys())
        counts = (yield from self._upsert(names, total)) if names else {}
        for channel, adds in by_channel.items():
            refused = yield from self._check_mark(channel, counts[channel], adds, outcomes)
            if refused:
                ids = [message_id for add in refused for message_id in add.message_ids]
                yield s.correct, {"name": channel, "delta": -len(ids)}
                yield s.remove, given(ids, None, postgres=s.postgres)
                for add in refused:
                    if add.body_id is not None:
                        total.refs[add.body_id] -= 1
        for body_id in sorted(total.refs):
            if total.refs[body_id]:
                yield s.reference, {"id": body_id, "delta": total.refs[body_id]}
            yield s.unreferenced, {"id": body_id}

    def _upsert(self, names: list[str], total: _Entries) -> Operation[dict[str, int]]:
        """Apply every channel's change in one upsert, in name order; return every
        touched channel's new count."""
        s = self._statements
        polled = [total.polled.get(name, 0) for name in names]
        deltas = [total.deltas.get(name, 0) for name in names]
        if s.postgres:
            params: dict[str, Any] = {"names": names, "polled": polled, "deltas": deltas}
        else:
            params = {"rows": orjson.dumps(list(zip(names, polled, deltas, strict=True))).decode()}
        rows = yield s.upsert, params
        return {row[0]: int(row[1]) for row in rows}

    def _check_mark(
        self, channel: str, count: int, adds: list[_Add], outcomes: list[Outcome]
    ) -> Operation[list[_Add]]:
        """The adds to ``channel`` (its row locked, ``count`` rows with them) that passed
        the high-level mark, in order; each one's operation is told."""
        if count <= min(add.hlm for add in adds):
            return []
        # Only near the mark: dead rows that the sweeper has not deleted yet do not count.
        rows = yield self._statements.dead, {"now": self._now(), "channel": channel}
        # The count before the group's adds: each add stored its batch, not one message.
        before = count - int(rows[0][0]) - sum(len(add.message_ids) for add in adds)
        refused: list[_Add] = []
        accepted = 0
        for add in adds:
            if before + accepted + len(add.message_ids) <= add.hlm:
                accepted += len(add.message_ids)
                continue
            refused.append(add)
            if add.refuse is not None:
                add.refuse(outcomes[add.index], before + accepted)
        return refused


def unnoted(stmt: Prepared, params: dict[str, Any], _ledger: Tally) -> Operation[list[Row]]:
    """A one-statement write that changes nothing a ledger keeps."""
    return (yield stmt, params)
