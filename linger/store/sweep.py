"""The sweep: periodic statements that keep the table what the queries expect, none of
which correctness waits for (every query derives states from the clock itself).

- parked messages that have been due for ``REQUEUE_AFTER_MS`` go back to the queue (the
  claim's second look stays short). A claim takes a message that just became due through
  that second look; the requeue is for those nobody claimed, so that it seldom holds a
  row a claim wants: on PostgreSQL the requeue locks the rows it moves for the length of
  its statement, and a claim racing it skips them (SKIP LOCKED). It announces what it
  moved like an add, so that a long-polling consumer that skipped them wakes again at
  once instead of at the next poll; a ``nowait`` claim in that millisecond finds them
  gone, as if it had come a moment earlier;
- messages that used up their deliveries move to their dead channel;
- messages past their retention, and the other exhausted ones, are deleted;
- channels that hold nothing and were not long-polled for 180 s are forgotten.

Each is batched (``sql.BATCH`` rows a statement, each its own transaction, skipping rows
other transactions hold), so that a sweep never holds other writers up for long.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import sqlalchemy as sa

from linger.store import deadletters
from linger.store.db import channels, messages
from linger.store.driver import Driver, Operation, Prepared
from linger.store.ledger import Tally
from linger.store.messages import POLLED_TTL_MS
from linger.store.sql import BATCH, READY, alive, announced, in_batch, ms_sql, param, parked

m = messages
# How long a due message stays parked before the sweep puts it back in the queue.
REQUEUE_AFTER_MS = 1000


@dataclass(slots=True)
class Swept:
    """What one sweep did, and the dead channels it gave messages to (to wake)."""

    retention: int = 0
    discarded: int = 0
    dead: int = 0
    dead_channels: set[str] = field(default_factory=set)
    requeued: Counter[str] = field(default_factory=Counter)


def _statements(postgres: bool) -> dict[str, sa.ClauseElement]:
    now = param("now")
    expired = sa.and_(m.c.linger > 0, m.c.created_at + ms_sql(m.c.linger) <= now)
    # Dead (dead_at passed) and not by retention: it used up its deliveries.
    movable = sa.and_(m.c.dead.is_not(None), m.c.dead_from.is_(None), sa.not_(expired))
    dead = m.c.dead_at <= now

    def batch(where: sa.ColumnElement[bool], *order: Any) -> sa.ColumnElement[bool]:
        return in_batch(where, *order, postgres=postgres)

    due = sa.and_(parked(), m.c.visible_at <= now - REQUEUE_AFTER_MS, alive(now))
    move = sa.update(m).where(batch(sa.and_(dead, movable), m.c.dead_at))
    return {
        "requeue": announced(
            sa.update(m).where(batch(due, m.c.visible_at)).values(visible_at=READY),
            postgres=postgres,
            counted=True,
        ),
        "move": announced(
            move.values(deadletters.moved_values("deliveries")), m.c.dead_from, postgres=postgres
        ),
        "retention": sa.delete(m)
        .where(batch(sa.and_(dead, expired), m.c.dead_at))
        .returning(m.c.channel, m.c.body_id),
        "discard": sa.delete(m)
        .where(batch(sa.and_(dead, sa.not_(movable)), m.c.dead_at))
        .returning(m.c.channel, m.c.body_id),
        "forget": sa.delete(channels)
        .where(
            channels.c.name.in_(
                sa.select(channels.c.name)
                .where(channels.c.messages == 0, channels.c.polled_at <= param("cutoff"))
                .limit(BATCH)
                .with_for_update(skip_locked=True)
            )
        )
        .returning(channels.c.name),
    }


class Sweeper:
    """Runs the sweep's statements; times come from ``now`` (clock milliseconds)."""

    def __init__(self, driver: Driver[Tally], now: Callable[[], int], origin: str) -> None:
        self._driver = driver
        self.now = now
        self.origin = origin
        self._stmts = {
            name: driver.prepare(stmt) for name, stmt in _statements(driver.postgres).items()
        }

    async def _batches(
        self, name: str, params: dict[str, Any], note: Callable[[Tally, Any], None]
    ) -> int:
        """Run statement ``name`` batch after batch until a batch is not full; return the
        rows it touched."""
        total = 0
        while True:
            count = await self._driver.write(
                partial(_noting, self._stmts[name], params, note), alone=True
            )
            total += count
            if count < BATCH:
                return total

    async def sweep(self) -> Swept:
        """One sweep. Its statements share one ``now``: a message that expires while
        the sweep runs waits for the next one, rather than be deleted by the wrong
        statement (a message past its retention counted as discarded)."""
        now = self.now()
        params = {"now": now, "origin": self.origin, "cutoff": now - POLLED_TTL_MS}
        swept = Swept()

        def requeued(_ledger: Tally, row: Any) -> None:
            swept.requeued[row[0]] += 1

        await self._batches("requeue", params, requeued)

        def moved(ledger: Tally, row: Any) -> None:
            channel, _id, origin = row[:3]
            ledger.moved(origin, channel)
            swept.dead_channels.add(channel)

        def removed(ledger: Tally, row: Any) -> None:
            ledger.removed(row[0], row[1])

        swept.dead = await self._batches("move", params, moved)
        swept.retention = await self._batches("retention", params, removed)
        swept.discarded = await self._batches("discard", params, removed)
        await self._batches("forget", params, lambda _ledger, _row: None)
        return swept


def _noting(
    stmt: Prepared, params: dict[str, Any], note: Callable[[Tally, Any], None], ledger: Tally
) -> Operation[int]:
    rows = yield stmt, params
    for row in rows:
        note(ledger, row)
    return len(rows)
