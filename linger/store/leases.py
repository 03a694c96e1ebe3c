"""Leases: the token each delivery hands out, and the operations that take one: touch,
release and reject (delete takes one too, in ``messages``).

A token is ``<message id>.<lease value>``; the value is random, drawn for each claim, and
kept in the message's row until the next delivery, a release or a move ends the lease. A
lease is current while the row still holds its value, whatever the clock says.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import sqlalchemy as sa

from linger import errors
from linger.auth.scopes import Patterns
from linger.store import deadletters
from linger.store.db import messages
from linger.store.driver import Driver, Operation, Prepared, Row
from linger.store.ledger import Tally
from linger.store.sql import READY, alive, announced, dead_after, ms_sql, param, patterns, permitted

m = messages
T = TypeVar("T")
_TOKEN = re.compile(r"([0-9]{1,19})\.([0-9]{1,19})")
_MAX_LEASE = 2**62


def new_nonce() -> int:
    """A claim's lease value: unguessable, so that no client can act on another's lease."""
    return secrets.randbits(62)


def token(message_id: int, nonce: int) -> str:
    return f"{message_id}.{nonce}"


def parse(text: str) -> tuple[int, int]:
    """(message id, lease value) of token ``text``; ``InvalidLease`` when it is none."""
    match = _TOKEN.fullmatch(text)
    if match is None:
        raise errors.InvalidLease()
    message_id, nonce = int(match[1]), int(match[2])
    if message_id >= 2**63 or nonce >= _MAX_LEASE:
        raise errors.InvalidLease()
    return message_id, nonce


def nonce_of(text: str, message_id: int) -> int:
    """The lease value of ``text``, a token of message ``message_id``; ``InvalidLease``
    when it cannot be one."""
    match = _TOKEN.fullmatch(text)
    if match is None or int(match[1]) != message_id or int(match[2]) >= _MAX_LEASE:
        raise errors.InvalidLease()
    return int(match[2])


def presented() -> sa.ColumnElement[bool]:
    """The row holds lease :nonce, or none was presented (1.0.1 requests)."""
    nonce = param("nonce")
    return sa.or_(nonce.is_(None), m.c.lease == nonce)


def hidden(now: sa.ColumnElement[int]) -> sa.ColumnElement[bool]:
    return m.c.visible_at > now


def held_now() -> sa.ColumnElement[bool]:
    """Hidden and alive at :now: what touch, release and reject act on."""
    now = param("now")
    return sa.and_(hidden(now), alive(now))


def touched() -> dict[str, Any]:
    """The SET clause of a touch: hidden for :seconds from :now (None: its timeout)."""
    visible_at = param("now") + ms_sql(sa.func.coalesce(param("seconds"), m.c.timeout))
    return {"visible_at": visible_at, "dead_at": dead_after(m.c.deliveries, visible_at)}


def released() -> dict[str, Any]:
    """The SET clause of a release: queued again at once, or parked for :delay s. The
    delivery counted: a message that had its last allowed one dies now."""
    now, delay = param("now"), param("delay")
    exhausted = sa.and_(m.c.deliver > 0, m.c.deliveries >= m.c.deliver)
    return {
        "visible_at": sa.case((delay > 0, now + ms_sql(delay)), else_=READY),
        "lease": None,
        "dead_at": sa.case((exhausted, now), else_=m.c.dead_at),
    }


def rejectable() -> sa.ColumnElement[bool]:
    """A rejected message moves to its dead channel (else it is discarded): it has one,
    and is not a dead letter already."""
    return sa.and_(m.c.dead.is_not(None), m.c.dead_from.is_(None))


def explain_stmt(*where: sa.ColumnElement[bool]) -> sa.Select[Any]:
    """Why a lease operation on :id changed nothing: (lease, hidden, channel) of the live
    row (and ``where``)."""
    now = param("now")
    return sa.select(m.c.lease, hidden(now), m.c.channel).where(
        m.c.id == param("id"), alive(now), *where
    )


def raise_for(rows: list[Row], lease: int | None, scope: Patterns | None = None) -> None:
    """Raise the error an operation on a message gets when it changed nothing: the message
    is gone, it is in a channel the token's ``scope`` does not cover, the lease presented
    is not its current one, or it is not hidden."""
    if not rows:
        raise errors.NotFound()
    if scope is not None and not scope.allows(rows[0][2]):
        raise errors.NotAllowed()
    if lease is not None and rows[0][0] != lease:
        raise errors.LeaseStale()
    raise errors.NotHidden()


def would_act(rows: list[Row], lease: int | None, scope: Patterns | None = None) -> bool:
    """Whether the live message that ``explain_stmt`` found (``rows``) is one that an
    operation presenting ``lease`` with ``scope`` may act on (its lease and channel
    allow it)."""
    if not rows:
        return False
    lease_now, _hidden, channel = rows[0]
    return (scope is None or scope.allows(channel)) and (lease is None or lease_now == lease)


Build = Callable[[tuple[sa.ColumnElement[bool], ...]], Any]


class Scoped:
    """A statement on messages prepared twice: for any channel, and for a token whose
    scope covers only some (the message's channel is matched against the scope's
    patterns in the same statement: a message outside them is left alone)."""

    __slots__ = ("limited", "unlimited")

    def __init__(self, driver: Driver[Tally], build: Build) -> None:
        self.unlimited = driver.prepare(build(()))
        self.limited = driver.prepare(build((permitted(postgres=driver.postgres),)))

    def __call__(self, params: dict[str, Any]) -> Prepared:
        """The statement for ``params`` (see ``scoped``)."""
        return self.unlimited if params.get("scope") is None else self.limited


def scoped(scope: Patterns | None, *, postgres: bool) -> dict[str, Any]:
    """The parameters that limit a ``Scoped`` statement to ``scope`` (None: any channel)."""
    if scope is None:
        return {"scope": None}
    return {"scope": scope, "patterns": patterns(scope, postgres=postgres)}


class Leases:
    """Touch, release and reject a delivered (hidden) message, with or without a lease."""

    def __init__(self, driver: Driver[Tally], now: Callable[[], int], origin: str) -> None:
        self._driver = driver
        self.now = now
        self.origin = origin
        prepare = driver.prepare
        postgres = driver.postgres
        held = sa.and_(m.c.id == param("id"), held_now(), presented())
        self._touch = Scoped(
            driver,
            lambda within: sa.update(m).where(held, *within).values(touched()).returning(m.c.id),
        )
        self._release = Scoped(
            driver,
            lambda within: announced(
                sa.update(m).where(held, *within).values(released()),
                m.c.visible_at,
                postgres=postgres,
            ),
        )
        moved = deadletters.moved_values("rejected")
        self._reject_move = Scoped(
            driver,
            lambda within: announced(
                sa.update(m).where(held, rejectable(), *within).values(moved),
                m.c.dead_from,
                postgres=postgres,
            ),
        )
        self._reject_delete = Scoped(
            driver,
            lambda within: (
                sa.delete(m)
                .where(held, sa.not_(rejectable()), *within)
                .returning(m.c.channel, m.c.body_id)
            ),
        )
        self._explain = prepare(explain_stmt())

    async def _act(
        self,
        operation: Callable[[dict[str, Any], Tally], Operation[T]],
        message_id: int,
        scope: Patterns | None,
        atomic: bool = True,
        **params: Any,
    ) -> T:
        """Run ``operation`` on message ``message_id``; ``atomic=False`` for one statement
        that notes nothing in the ledger (alone in its group: no transaction)."""
        params = {
            "id": message_id,
            "now": self.now(),
            "origin": self.origin,
            **scoped(scope, postgres=self._driver.postgres),
            **params,
        }
        return await self._driver.write(
            partial(operation, params), atomic=atomic, key=("message", message_id)
        )

    async def touch(
        self,
        message_id: int,
        lease: int | None,
        seconds: int | None,
        scope: Patterns | None = None,
    ) -> None:
        """Restart the lease of a hidden message, for ``seconds`` (default: its timeout).
        With ``scope``, only a message in a channel it covers (else ``NotAllowed``)."""
        await self._act(
            self._touch_operation, message_id, scope, atomic=False, nonce=lease, seconds=seconds
        )

    def _touch_operation(self, params: dict[str, Any], ledger: Tally) -> Operation[None]:
        if not (yield self._touch(params), params):
            self._raise_for((yield self._explain, params), params)

    async def release(
        self, message_id: int, lease: int | None, delay: int, scope: Patterns | None = None
    ) -> str | None:
        """Give a hidden message back: ready at once (return its channel, to wake its
        consumers), or delayed ``delay`` s (return None)."""
        return await self._act(
            self._release_operation, message_id, scope, atomic=False, nonce=lease, delay=delay
        )

    def _release_operation(self, params: dict[str, Any], ledger: Tally) -> Operation[str | None]:
        rows = yield self._release(params), params
        if not rows:
            self._raise_for((yield self._explain, params), params)
        channel, _id, visible_at = rows[0][:3]
        return str(channel) if visible_at == READY else None

    async def reject(
        self, message_id: int, lease: int | None, scope: Patterns | None = None
    ) -> str | None:
        """Move a hidden message to its dead channel now (return that channel), or discard
        it when it has none or already is a dead letter (return None)."""
        return await self._act(self._reject_operation, message_id, scope, nonce=lease)

    def _reject_operation(self, params: dict[str, Any], ledger: Tally) -> Operation[str | None]:
        rows = yield self._reject_move(params), params
        if rows:
            dead, _id, origin = rows[0][:3]
            ledger.moved(origin, dead)
            return str(dead)
        rows = yield self._reject_delete(params), params
        if not rows:
            self._raise_for((yield self._explain, params), params)
        ledger.removed(rows[0][0], rows[0][1])
        return None

    @staticmethod
    def _raise_for(rows: list[Row], params: dict[str, Any]) -> None:
        raise_for(rows, params["nonce"], params["scope"])
