"""Dead letters: a message that used up its deliveries (moved by the sweep) or was
rejected goes to its dead channel, keeping its id, body, content type, topic and
priority, with no delivery limit and no retention there; a redrive sends it back."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import sqlalchemy as sa

from linger.auth.scopes import Patterns
from linger.store.db import messages
from linger.store.driver import Driver, Operation
from linger.store.ledger import Tally
from linger.store.sql import (
    BATCH,
    READY,
    announced,
    first_ready,
    ids_in,
    ms_sql,
    param,
    patterns,
    permitted,
)

m = messages


def moved_values(reason: str) -> dict[str, Any]:
    """The SET clause that makes a message a dead letter of its dead channel: ready
    there, its delivery limit and retention kept aside for a redrive."""
    return {
        "channel": m.c.dead,
        "dead_from": m.c.channel,
        "dead_reason": reason,
        "origin_deliver": m.c.deliver,
        "origin_linger": m.c.linger,
        "deliver": 0,
        "linger": 0,
        "dead_at": None,
        "visible_at": READY,
        "lease": None,
    }


def _redrive_stmt(postgres: bool, *, scoped: bool = False) -> sa.ClauseElement:
    """Send up to :n ready dead letters of :channel, in delivery order, back to :to (or
    each one's origin) with their own options again and no deliveries; ``scoped``: only
    those whose origin matches the scope patterns (:patterns)."""
    now = param("now")
    dead: sa.ColumnElement[bool] = m.c.dead_from.is_not(None)
    if scoped:
        dead = sa.and_(dead, permitted(postgres=postgres, column="dead_from"))
    chosen = first_ready(param("channel", sa.String), now, param("n"), where=dead)
    linger = sa.func.coalesce(m.c.origin_linger, 0)
    values = {
        "channel": sa.func.coalesce(param("to", sa.String), m.c.dead_from),
        "dead_from": None,
        "dead_reason": None,
        "deliver": sa.func.coalesce(m.c.origin_deliver, 0),
        "linger": linger,
        "origin_deliver": None,
        "origin_linger": None,
        "deliveries": 0,
        # Its retention counts from the redrive, or it could be over at once.
        "created_at": now,
        "dead_at": sa.case((linger > 0, now + ms_sql(linger)), else_=sa.null()),
        "visible_at": READY,
        "lease": None,
    }
    stmt = sa.update(m).where(ids_in(chosen, postgres=postgres)).values(values)
    return announced(stmt, postgres=postgres)


class DeadLetters:
    """Redrive: dead letters back to where they came from (or elsewhere)."""

    def __init__(self, driver: Driver[Tally], now: Callable[[], int], origin: str) -> None:
        self._driver = driver
        self._postgres = driver.postgres
        self.now = now
        self.origin = origin
        self._redrive = driver.prepare(_redrive_stmt(driver.postgres))
        self._redrive_scoped = driver.prepare(_redrive_stmt(driver.postgres, scoped=True))

    async def redrive(
        self, channel: str, to: str | None, limit: int | None, scope: Patterns | None = None
    ) -> dict[str, int]:
        """Move up to ``limit`` (None: all) ready dead letters of ``channel`` back, in
        batches of at most ``BATCH`` (each one transaction); return how many went to
        each channel. With ``scope`` (and no ``to``), only those whose origin it covers:
        the others stay."""
        moved: dict[str, int] = {}
        remaining = limit
        while remaining is None or remaining > 0:
            n = BATCH if remaining is None else min(BATCH, remaining)
            params = {
                "channel": channel,
                "to": to,
                "n": n,
                "now": self.now(),
                "origin": self.origin,
                **({} if scope is None else {"patterns": patterns(scope, postgres=self._postgres)}),
            }
            batch = await self._driver.write(partial(self._redrive_operation, params), alone=True)
            for target, count in batch.items():
                moved[target] = moved.get(target, 0) + count
            done = sum(batch.values())
            if remaining is not None:
                remaining -= done
            if done < n:
                break
        return moved

    def _redrive_operation(
        self, params: dict[str, Any], ledger: Tally
    ) -> Operation[dict[str, int]]:
        rows = yield (self._redrive if "patterns" not in params else self._redrive_scoped), params
        moved: dict[str, int] = {}
        for row in rows:
            ledger.moved(params["channel"], row[0])
            moved[row[0]] = moved.get(row[0], 0) + 1
        return moved
