"""Runs precompiled SQLAlchemy Core statements on the pooled driver connection.

SQLAlchemy's async layer costs several thread hops (aiosqlite) or extra round trips
(asyncpg) per statement. The hot operations are compiled once per dialect here and
executed directly on the DB-API driver connection checked out from SQLAlchemy's pool:
one statement is one call to the driver, and one transaction on both backends (SQLite
connections run in autocommit, see ``db.create_engine``). Nothing else sees a driver.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from linger import errors

Row = Sequence[Any]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A statement compiled for one dialect, with its positional parameter names."""

    sql: str
    names: tuple[str, ...]
    defaults: Mapping[str, Any]

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        return [params[n] if n in params else self.defaults[n] for n in self.names]


# Errors that mean the database cannot be reached now, not that the request is wrong.
_UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)


_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    exc.OperationalError,
    exc.InterfaceError,
    *_UNREACHABLE,
)


def _is_busy(error: BaseException) -> bool:
    return isinstance(error, sqlite3.OperationalError) and (
        "locked" in str(error) or "busy" in str(error)
    )


class Connection:
    """A driver connection that runs ``Prepared`` statements."""

    def __init__(self, conn: AsyncConnection, raw: Any, postgres: bool) -> None:
        self._conn = conn
        self._raw = raw
        self._postgres = postgres

    async def fetch(self, stmt: Prepared, params: Mapping[str, Any]) -> list[Row]:
        if self._postgres:
            return list(await self._raw.fetch(stmt.sql, *stmt.args(params)))
        return list(await self._raw.execute_fetchall(stmt.sql, stmt.args(params)))

    async def fetchone(self, stmt: Prepared, params: Mapping[str, Any]) -> Row | None:
        rows = await self.fetch(stmt, params)
        return rows[0] if rows else None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Several statements as one transaction (SQLite: taking the write lock first)."""
        if self._postgres:
            async with self._raw.transaction():
                yield
            return
        await self._raw.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            await self._raw.execute("ROLLBACK")
            raise
        await self._raw.execute("COMMIT")


class Driver:
    """Compiles statements for ``engine``'s dialect and lends driver connections."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.postgres = engine.dialect.name == "postgresql"

    def prepare(self, stmt: ClauseElement) -> Prepared:
        compiled = stmt.compile(
            dialect=self._engine.dialect, compile_kwargs={"render_postcompile": True}
        )
        assert isinstance(compiled, SQLCompiler)
        # Binds given values at build time (LIMIT 1, IN lists) keep them as defaults.
        return Prepared(compiled.string, tuple(compiled.positiontup or ()), compiled.params)

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Connection]:
        """A pooled connection; unreachable-database errors become ``errors.Unavailable``
        and the broken connection is dropped from the pool."""
        try:
            conn = await self._engine.connect()
        except _CONNECT_ERRORS as error:
            raise errors.Unavailable() from error
        try:
            raw = await conn.get_raw_connection()
            yield Connection(conn, raw.driver_connection, self.postgres)
        except _UNREACHABLE as error:
            await conn.invalidate()
            raise errors.Unavailable() from error
        except sqlite3.OperationalError as error:
            if _is_busy(error):
                raise errors.Unavailable("The database is busy, try again later.") from error
            raise
        finally:
            await conn.close()
