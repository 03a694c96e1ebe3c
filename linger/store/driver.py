"""Runs precompiled SQLAlchemy Core statements on the pooled driver connection.

SQLAlchemy's async layer costs several thread hops (aiosqlite) or extra round trips
(asyncpg) per statement, so the statements are compiled once per dialect and executed on
the DB-API driver connection checked out from SQLAlchemy's pool. Nothing else sees a
driver.

An operation is a generator that yields ``(statement, parameters)`` and receives the
rows, so that the same operation runs inside the SQLite worker thread and on asyncpg.

Writes are group-committed: operations submitted while a transaction is running wait,
and then run together in the next transaction, with one commit (one fsync) for all of
them, on SQLite in a single hop to its thread. Each caller is answered only after that
commit. When a transaction fails, its operations are retried one by one, so that one
failing operation cannot fail the others.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from linger import errors
from linger.store.db import POSTGRES_POOL_OVERFLOW, POSTGRES_POOL_SIZE

logger = logging.getLogger(__name__)

T = TypeVar("T")
Row = Sequence[Any]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A statement compiled for one dialect, with its positional parameter names."""

    sql: str
    names: tuple[str, ...]
    defaults: Mapping[str, Any]

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        return [params[n] if n in params else self.defaults[n] for n in self.names]


Query = tuple[Prepared, Mapping[str, Any]]
Operation = Generator[Query, list[Row], T]
# Operations run at most twice (a failed group is retried one by one): pass factories.
OperationFactory = Callable[[], Operation[Any]]

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
# Most operations committed in one group.
_GROUP_LIMIT = 128
# Dead pooled connections skipped before giving up: more than the pool can hold.
_STALE_RETRIES = POSTGRES_POOL_SIZE + POSTGRES_POOL_OVERFLOW + 1
# Groups in flight at once on PostgreSQL.
_POSTGRES_COMMITTERS = 4


def _is_busy(error: BaseException) -> bool:
    return isinstance(error, sqlite3.OperationalError) and (
        "locked" in str(error) or "busy" in str(error)
    )


def _is_full(error: BaseException) -> bool:
    return isinstance(error, asyncpg.DiskFullError) or (
        isinstance(error, sqlite3.OperationalError) and "full" in str(error)
    )


def single(stmt: Prepared, params: Mapping[str, Any]) -> Operation[list[Row]]:
    """An operation of one statement, returning its rows."""
    return (yield stmt, params)


@dataclass(slots=True)
class _Pending:
    """An operation waiting for its group."""

    factory: OperationFactory
    future: asyncio.Future[Any]
    atomic: bool


class _StaleConnection(Exception):
    """The pooled connection was dead before anything ran on it (closed at checkout, or
    failed at BEGIN): safe to try the next one."""


class _Outcome:
    """What one operation of a group came to: a value, or a domain error."""

    __slots__ = ("error", "value")

    def __init__(self, value: Any = None, error: errors.LingerError | None = None) -> None:
        self.value = value
        self.error = error


def _drive_sync(conn: sqlite3.Connection, operation: Operation[Any]) -> _Outcome:
    try:
        stmt, params = next(operation)
        while True:
            rows = conn.execute(stmt.sql, stmt.args(params)).fetchall()
            stmt, params = operation.send(rows)
    except StopIteration as stop:
        return _Outcome(stop.value)
    except errors.LingerError as error:
        return _Outcome(error=error)


def _sqlite_group(conn: sqlite3.Connection, factories: list[OperationFactory]) -> list[_Outcome]:
    """Runs in the SQLite connection's thread: the whole group in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        outcomes = [_drive_sync(conn, factory()) for factory in factories]
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes


def _sqlite_autocommit(
    conn: sqlite3.Connection, factories: list[OperationFactory]
) -> list[_Outcome]:
    """Runs in the SQLite connection's thread: one operation, each statement committing
    on its own."""
    return [_drive_sync(conn, factory()) for factory in factories]


Fetch = Callable[[str, list[Any]], Awaitable[Iterable[Row]]]


def _fetcher(raw: Any, postgres: bool) -> Fetch:
    if postgres:
        return lambda sql, args: raw.fetch(sql, *args)
    fetch: Fetch = raw.execute_fetchall
    return fetch


async def _drive_async(fetch: Fetch, operation: Operation[Any]) -> _Outcome:
    try:
        stmt, params = next(operation)
        while True:
            rows = list(await fetch(stmt.sql, stmt.args(params)))
            stmt, params = operation.send(rows)
    except StopIteration as stop:
        return _Outcome(stop.value)
    except errors.LingerError as error:
        return _Outcome(error=error)


class Driver:
    """Compiles statements for ``engine``'s dialect and runs operations on it."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self._pending: list[_Pending] = []
        self._committers: set[asyncio.Task[None]] = set()
        # SQLite has one writer at a time; PostgreSQL overlaps one group's statements
        # with another's commit.
        self._max_committers = _POSTGRES_COMMITTERS if self.postgres else 1

    def prepare(self, stmt: ClauseElement) -> Prepared:
        compiled = stmt.compile(
            dialect=self._engine.dialect, compile_kwargs={"render_postcompile": True}
        )
        assert isinstance(compiled, SQLCompiler)
        # Binds given values at build time (LIMIT 1, IN lists) keep them as defaults.
        return Prepared(compiled.string, tuple(compiled.positiontup or ()), compiled.params)

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[Any]:
        """A pooled driver connection; unreachable-database errors become
        ``errors.Unavailable`` and the broken connection is dropped from the pool."""
        try:
            conn: AsyncConnection = await self._engine.connect()
        except _CONNECT_ERRORS as error:
            raise errors.Unavailable() from error
        raw: Any = None
        try:
            raw = (await conn.get_raw_connection()).driver_connection
            if self.postgres and raw.is_closed():
                raise _StaleConnection()
            yield raw
        except _StaleConnection:
            await conn.invalidate()
            raise
        except _UNREACHABLE as error:
            await conn.invalidate()
            raise errors.Unavailable() from error
        except (sqlite3.OperationalError, asyncpg.DiskFullError) as error:
            if _is_busy(error):
                raise errors.Unavailable("The database is busy, try again later.") from error
            if _is_full(error):
                logger.error("database full: %s", error)
                raise errors.StorageFull() from error
            raise
        except Exception as error:
            if self.postgres and raw is not None and raw.is_closed():
                # Whatever asyncpg raised, a closed connection means the database went away.
                await conn.invalidate()
                raise errors.Unavailable() from error
            raise
        finally:
            await conn.close()

    async def read(self, factory: Callable[[], Operation[T]]) -> T:
        """Run a read-only operation on a pooled connection, outside any group."""

        async def attempt() -> _Outcome:
            async with self._connect() as raw:
                return await _drive_async(_fetcher(raw, self.postgres), factory())

        result: T = _result(await _skipping_stale(attempt))
        return result

    async def write(self, factory: Callable[[], Operation[T]], *, atomic: bool = True) -> T:
        """Run an operation in the next group-committed transaction; return its result
        once that transaction has committed.

        ``atomic=False`` says that each statement of the operation may commit on its own
        (it writes with one statement at most, or its statements are independent): when
        such an operation is alone in its group, it runs without BEGIN and COMMIT, which
        saves two round trips on PostgreSQL.
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(factory, future, atomic))
        if len(self._committers) < self._max_committers:
            committer = asyncio.create_task(self._commit_pending())
            self._committers.add(committer)
            committer.add_done_callback(self._committers.discard)
        return await future

    async def _commit_pending(self) -> None:
        while self._pending:
            group = self._pending[:_GROUP_LIMIT]
            del self._pending[:_GROUP_LIMIT]
            try:
                outcomes = await self._run_group(group)
            except (errors.Unavailable, errors.StorageFull) as error:
                for pending in group:
                    _settle(pending.future, error=error)
                continue
            except Exception:
                if len(group) == 1:
                    logger.exception("database operation failed")
                    _settle(group[0].future, error=errors.DatabaseError())
                    continue
                # Retry one by one: only the operation at fault fails.
                await self._commit_each(group)
                continue
            for pending, outcome in zip(group, outcomes, strict=True):
                _settle(pending.future, outcome)

    async def _commit_each(self, group: list[_Pending]) -> None:
        for pending in group:
            try:
                (outcome,) = await self._run_group([pending])
            except (errors.Unavailable, errors.StorageFull) as error:
                _settle(pending.future, error=error)
            except Exception:
                logger.exception("database operation failed")
                _settle(pending.future, error=errors.DatabaseError())
            else:
                _settle(pending.future, outcome)

    async def _run_group(self, group: list[_Pending]) -> list[_Outcome]:
        factories = [pending.factory for pending in group]
        autocommit = len(group) == 1 and not group[0].atomic
        return await _skipping_stale(partial(self._run_group_once, factories, autocommit))

    async def _run_group_once(
        self, factories: list[OperationFactory], autocommit: bool
    ) -> list[_Outcome]:
        async with self._connect() as raw:
            if self.postgres and autocommit:
                return [await _drive_async(_fetcher(raw, postgres=True), factories[0]())]
            if self.postgres:
                fetch = _fetcher(raw, postgres=True)
                transaction = raw.transaction()
                try:
                    await transaction.start()
                except _UNREACHABLE as error:
                    raise _StaleConnection() from error
                try:
                    outcomes: list[_Outcome] = [
                        await _drive_async(fetch, factory()) for factory in factories
                    ]
                except BaseException:
                    if not raw.is_closed():
                        await transaction.rollback()
                    raise
                await transaction.commit()
                return outcomes
            # One hop to aiosqlite's thread for the whole group. aiosqlite runs whatever
            # callable is queued to its worker; _execute is how its own methods do it.
            run = _sqlite_autocommit if autocommit else _sqlite_group
            return await raw._execute(run, raw._conn, factories)  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Wait for the operations already submitted."""
        if self._committers:
            await asyncio.wait(self._committers)


async def _skipping_stale(attempt: Callable[[], Awaitable[T]]) -> T:
    """Run ``attempt`` until it gets a live connection. A pooled connection that died
    while idle (a database restart) fails before anything ran and is dropped from the
    pool; after a restart, every pooled connection may be dead."""
    for _ in range(_STALE_RETRIES):
        try:
            return await attempt()
        except _StaleConnection:
            continue
    raise errors.Unavailable()


def _result(outcome: _Outcome) -> Any:
    if outcome.error is not None:
        raise outcome.error
    return outcome.value


def _settle(
    future: asyncio.Future[Any],
    outcome: _Outcome | None = None,
    *,
    error: BaseException | None = None,
) -> None:
    if future.done():
        return
    if error is None and outcome is not None:
        error = outcome.error
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(outcome.value if outcome else None)
