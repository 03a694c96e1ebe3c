"""Tokens in the database: created, listed and revoked by ``linger token`` on a
connection of its own, looked up by digest and marked used by the server.

Times are epoch milliseconds, as everywhere in the schema.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from functools import partial

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from linger.auth.tokens import Token, digest, new_secret
from linger.store.db import tokens
from linger.store.driver import Driver, Operation, Row, single
from linger.store.ledger import Tally
from linger.store.sql import param

t = tokens
_COLUMNS = (
    t.c.id,
    t.c.name,
    t.c.scopes,
    t.c.created_at,
    t.c.expires_at,
    t.c.revoked_at,
    t.c.last_used_at,
)


def _token(row: Row) -> Token:
    token_id, name, scopes, created_at, expires_at, revoked_at, last_used_at = row
    return Token(
        int(token_id),
        str(name),
        tuple(json.loads(scopes)),
        int(created_at),
        None if expires_at is None else int(expires_at),
        None if revoked_at is None else int(revoked_at),
        None if last_used_at is None else int(last_used_at),
    )


async def create(
    conn: AsyncConnection, name: str, scopes: Sequence[str], expires_at: int | None, now: int
) -> tuple[Token, str]:
    """Store a new token; return it with its secret (which is stored nowhere)."""
    secret = new_secret()
    values = {
        "name": name,
        "digest": digest(secret),
        "scopes": json.dumps(list(scopes)),
        "created_at": now,
        "expires_at": expires_at,
    }
    row = (await conn.execute(sa.insert(t).values(values).returning(*_COLUMNS))).one()
    return _token(row), secret


async def every(conn: AsyncConnection) -> list[Token]:
    """Every token, revoked ones included, oldest first."""
    return [_token(row) for row in await conn.execute(sa.select(*_COLUMNS).order_by(t.c.id))]


async def revoke(conn: AsyncConnection, token_id: int, now: int) -> bool:
    """Revoke token ``token_id``; False when there is no such token (revoking a revoked
    token again changes nothing and is True)."""
    revoked = sa.func.coalesce(t.c.revoked_at, now)  # the first revocation's time stays
    stmt = sa.update(t).where(t.c.id == token_id).values(revoked_at=revoked).returning(t.c.id)
    return (await conn.scalar(stmt)) is not None


class Tokens:
    """The server's reads and writes of tokens, on the pooled driver connections."""

    def __init__(self, driver: Driver[Tally], now: Callable[[], int]) -> None:
        self._driver = driver
        self.now = now
        self._lookup = driver.prepare(
            sa.select(*_COLUMNS).where(t.c.digest == param("digest", sa.LargeBinary))
        )
        self._used = driver.prepare(
            sa.update(t)
            .where(
                t.c.id == param("id"),
                sa.or_(t.c.last_used_at.is_(None), t.c.last_used_at < param("at")),
            )
            .values(last_used_at=param("at"))
        )

    async def lookup(self, token_digest: bytes) -> Token | None:
        rows = await self._driver.read(partial(single, self._lookup, {"digest": token_digest}))
        return _token(rows[0]) if rows else None

    async def mark_used(self, used: Iterable[tuple[int, int]]) -> None:
        """Note when each (token id, time) pair was last used, in one transaction."""
        pairs = list(used)
        if pairs:
            await self._driver.write(
                partial(self._mark_operation, pairs), rows=len(pairs), body_bytes=0
            )

    def _mark_operation(self, pairs: list[tuple[int, int]], _ledger: Tally) -> Operation[None]:
        for token_id, at in pairs:
            yield self._used, {"id": token_id, "at": at}
