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
commit. Every operation of a group notes what it changed in the group's ``Ledger``, which
settles it at the end of the group, in the same transaction (counters kept beside the
rows, in one global lock order). An unexpected failure of one operation fails that
operation alone: the group is rolled back and run again without it (once; requests are
validated before they reach a group, so this is the rare case of a database refusing
one operation).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import sqlite3
import time
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Hashable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

import asyncpg
from sqlalchemy import exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from linger import errors
from linger.logs import REQUEST_ID
from linger.store.db import (
    POOL_TIMEOUT,
    POSTGRES_CONNECT_ARGS,
    POSTGRES_POOL_OVERFLOW,
    POSTGRES_POOL_SIZE,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
Row = Sequence[Any]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A statement compiled for one dialect, with its positional parameter names."""

    sql: str
    names: tuple[str, ...]
    defaults: Mapping[str, Any]

    def args(self, params: Params) -> list[Any]:
        """The statement's arguments: ``params`` by name, or (a list) already in order."""
        if isinstance(params, list):
            return params
        return [params[n] if n in params else self.defaults[n] for n in self.names]


# A statement's parameters by name, or a list of its arguments in ``Prepared.names`` order.
Params = Mapping[str, Any] | list[Any]
Query = tuple[Prepared, Params]
Operation = Generator[Query, list[Row], T]


class Outcome:
    """What one operation of a group came to: a value, or a domain error."""

    __slots__ = ("error", "value")

    def __init__(self, value: Any = None, error: errors.LingerError | None = None) -> None:
        self.value = value
        self.error = error


class Ledger(Protocol):
    """What the operations of one group leave to settle at its end, in its transaction."""

    def begin(self, index: int) -> None:
        """What is noted from now on belongs to operation ``index``."""

    def drop(self, index: int) -> None:
        """Operation ``index`` failed and was rolled back: forget what it noted."""

    def settle(self, outcomes: list[Outcome]) -> Operation[None] | None:
        """The statements that settle the group (None: nothing to do); they may replace
        the outcomes of operations that must not stand (a mark they passed)."""


L = TypeVar("L", bound=Ledger)
# Operations may run more than once (retries): the driver calls these factories.
WriteFactory = Callable[[L], Operation[Any]]
ReadFactory = Callable[[], Operation[T]]

# Errors that mean the database cannot be reached now, not that the request is wrong.
_UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)
# The connection was lost in the middle of something (asyncpg's command timeout included).
_LOST: tuple[type[BaseException], ...] = (*_UNREACHABLE, TimeoutError)
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    exc.OperationalError,
    exc.InterfaceError,
    *_UNREACHABLE,
)
# SQLSTATE 40P01 and 40001: the transaction lost a race, running it again is correct.
_RETRYABLE: tuple[type[BaseException], ...] = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)
_RETRY_ATTEMPTS = 4
# Statements compiled by ``Driver.prepare_once``.
_PREPARED: dict[tuple[type, Any, Hashable], Prepared] = {}
# Most operations committed in one group.
_GROUP_LIMIT = 128
# Dead pooled connections skipped before giving up: more than the pool can hold.
_STALE_RETRIES = POSTGRES_POOL_SIZE + POSTGRES_POOL_OVERFLOW + 1
# What a group of writes may touch and still run on the event loop (the in-memory
# database, ``Driver.write``): rows, and bytes of bodies written or read back. Under the
# batch benchmark a group's SQLite work took about 6 µs a row, and reading bodies back
# about 2.5 ms a MiB: each bound is about a millisecond of the loop's time.
LIGHT_ROWS = 200
LIGHT_BYTES = 512 * 1024
# Rows one group may write or read, wherever it runs: a transaction holds the writer (on
# SQLite, every other write) and its rows' locks until it commits. An operation of more,
# or that cannot say how many (a publish to a topic not known yet), runs alone.
GROUP_ROWS = 10_000
# Groups in flight at once on PostgreSQL.
_POSTGRES_COMMITTERS = 4
# Operations run outside the groups at once on PostgreSQL (``Driver.write``'s ``direct``);
# with the committers, they leave the pool room for reads and lone writes.
_DIRECT_LIMIT = 8
# A PostgreSQL connection idle this long (seconds) is pinged before it is lent again, and
# replaced when it does not answer within _PING_TIMEOUT.
_PING_AFTER = 0.5
_PING_TIMEOUT = 2.0


def _is_busy(error: BaseException) -> bool:
    return isinstance(error, sqlite3.OperationalError) and (
        "locked" in str(error) or "busy" in str(error)
    )


def _is_full(error: BaseException) -> bool:
    return isinstance(error, asyncpg.DiskFullError) or (
        isinstance(error, sqlite3.OperationalError) and "full" in str(error)
    )


def _is_group_error(error: BaseException) -> bool:
    """Errors of the connection or transaction, not of the operation that met them."""
    return isinstance(error, _LOST + _RETRYABLE) or _is_busy(error) or _is_full(error)


def single(stmt: Prepared, params: Mapping[str, Any]) -> Operation[list[Row]]:
    """An operation of one statement, returning its rows."""
    return (yield stmt, params)


@dataclass(slots=True)
class _Pending(Generic[L]):
    """An operation waiting for its group."""

    factory: WriteFactory[L]
    future: asyncio.Future[Any]
    atomic: bool
    key: tuple[Any, ...]
    alone: bool
    # The request it serves, for the log lines about it (committers serve many).
    request_id: str | None = None
    # Messages it may write or read (None: it cannot say, and may be many), and the
    # bytes of their bodies: what decides where it runs (``Driver.write``).
    rows: int | None = 1
    body_bytes: int = 0
    # The operation as one statement, for when it is alone in its group (``Driver.write``).
    lone: ReadFactory[Any] | None = None


def _light(pending: _Pending[Any], rows: int, body_bytes: int) -> bool:
    """Whether ``pending`` may join a group of ``rows`` rows and ``body_bytes`` bytes
    that runs on the event loop (``Driver.write``)."""
    return (
        not pending.alone
        and pending.rows is not None
        and rows + pending.rows <= LIGHT_ROWS
        and body_bytes + pending.body_bytes <= LIGHT_BYTES
    )


def _fits(pending: _Pending[Any], rows: int) -> bool:
    """Whether ``pending`` may share a group that holds ``rows`` rows (``GROUP_ROWS``)."""
    return not pending.alone and pending.rows is not None and rows + pending.rows <= GROUP_ROWS


class Declined(Exception):
    """Raised by an operation's lone form (``Driver.write``) that cannot stand for the
    operation this time (it changed nothing): the operation runs in a transaction."""


class _StaleConnection(Exception):
    """The pooled connection was dead before anything ran on it (closed at checkout, or
    failed at BEGIN): safe to try the next one."""


class _OperationFailed(Exception):
    """Operation ``index`` of a group failed unexpectedly; the group was rolled back."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def _drive_sync(conn: sqlite3.Connection, operation: Operation[Any]) -> Outcome:
    try:
        stmt, params = next(operation)
        while True:
            rows = conn.execute(stmt.sql, stmt.args(params)).fetchall()
            stmt, params = operation.send(rows)
    except StopIteration as stop:
        return Outcome(stop.value)
    except errors.LingerError as error:
        return Outcome(error=error)


def _settle_sync(conn: sqlite3.Connection, ledger: Ledger, outcomes: list[Outcome]) -> None:
    settle = ledger.settle(outcomes)
    if settle is not None:
        _drive_sync(conn, settle)


def _sqlite_operations(
    conn: sqlite3.Connection, factories: list[WriteFactory[L]], ledger: L
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for index, factory in enumerate(factories):
        ledger.begin(index)
        try:
            outcomes.append(_drive_sync(conn, factory(ledger)))
        except Exception as error:
            if _is_group_error(error):
                raise
            raise _OperationFailed(index) from error
    _settle_sync(conn, ledger, outcomes)
    return outcomes


def _sqlite_group(
    conn: sqlite3.Connection, factories: list[WriteFactory[L]], ledger: L
) -> list[Outcome]:
    """Runs in the SQLite connection's thread: the whole group in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        outcomes = _sqlite_operations(conn, factories, ledger)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes


def _sqlite_autocommit(
    conn: sqlite3.Connection, factories: list[WriteFactory[L]], ledger: L
) -> list[Outcome]:
    """Runs in the SQLite connection's thread: one operation, each statement committing
    on its own."""
    return _sqlite_operations(conn, factories, ledger)


Fetch = Callable[[str, list[Any]], Awaitable[Iterable[Row]]]


def _fetcher(raw: Any, postgres: bool) -> Fetch:
    if postgres:
        return lambda sql, args: raw.fetch(sql, *args)
    fetch: Fetch = raw.execute_fetchall
    return fetch


async def _drive_async(fetch: Fetch, operation: Operation[Any]) -> Outcome:
    try:
        stmt, params = next(operation)
        while True:
            rows = list(await fetch(stmt.sql, stmt.args(params)))
            stmt, params = operation.send(rows)
    except StopIteration as stop:
        return Outcome(stop.value)
    except errors.LingerError as error:
        return Outcome(error=error)


async def _postgres_operations(
    fetch: Fetch, factories: list[WriteFactory[L]], ledger: L
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for index, factory in enumerate(factories):
        ledger.begin(index)
        try:
            outcomes.append(await _drive_async(fetch, factory(ledger)))
        except Exception as error:
            if _is_group_error(error):
                raise
            raise _OperationFailed(index) from error
    settle = ledger.settle(outcomes)
    if settle is not None:
        await _drive_async(fetch, settle)
    return outcomes


Lent = tuple[AsyncConnection, Any]  # SQLAlchemy's connection, and its driver connection


class _Lender:
    """Driver connections lent to one operation at a time.

    SQLAlchemy's pool makes the connections (with every option and event of the engine)
    and still bounds them, but checking one out of it and back in for every operation
    costs more CPU than a short statement: the lender keeps the connections it took and
    lends them again. It takes at most ``limit`` from the pool, keeps up to ``keep`` idle
    (the others go back, so that a burst's overflow connections close), and queues the
    operations beyond ``limit`` for up to ``POOL_TIMEOUT`` seconds, oldest first.

    With ``ping``, a connection idle for more than ``_PING_AFTER`` seconds is pinged before
    it is lent (the most recently used is lent first, so a busy server never pings): one
    that died silently (a firewall or NAT that forgot it, a failover) is replaced. Without
    the ping, only a BEGIN would find it; a statement run without one (a write alone in
    its group, a read) could not tell whether it ran, and would fail with a 503."""

    def __init__(self, engine: AsyncEngine, limit: int, keep: int, *, ping: bool) -> None:
        self._engine = engine
        self._limit = limit
        self._keep = keep
        self._ping = ping
        self._taken = 0  # lent, idle, or being made
        # Idle connections, each with the time it was given back.
        self._idle: list[tuple[Lent, float]] = []
        self._dropping: set[asyncio.Future[None]] = set()
        # A waiter gets a connection given back, or None: the place of one that went.
        self._waiting: deque[asyncio.Future[Lent | None]] = deque()

    async def borrow(self) -> Lent:
        while self._idle:
            idle, since = self._idle.pop()
            if not self._ping or time.monotonic() - since < _PING_AFTER:
                return idle
            try:
                alive = await _alive(idle[1])
            except BaseException:  # cancelled mid-ping: the connection's state is unknown
                await self._drop([idle])
                raise
            if alive:
                return idle
            # Dead, and so most likely are those idle for longer (a restart, a network
            # break): drop them all unpinged, rather than wait for each one's ping.
            older, self._idle = self._idle, []
            await self._drop([idle, *(other for other, _since in older)])
        if self._taken < self._limit:
            self._taken += 1
        else:
            lent = await self._wait()
            if lent is not None:
                return lent
        try:
            conn = await self._engine.connect()
        except BaseException:
            self.gone()
            raise
        try:
            return conn, (await conn.get_raw_connection()).driver_connection
        except BaseException:
            await conn.invalidate()
            self.gone()
            raise

    def _drop(self, dead: list[Lent]) -> Awaitable[None]:
        """Close connections that are neither lent nor idle (at once: no goodbye to a
        server that may be gone) and free their places, in a task of its own: a borrower
        cancelled meanwhile does not stop it halfway, which would lose places."""
        task = asyncio.ensure_future(self._close_dead(dead))
        self._dropping.add(task)
        task.add_done_callback(self._dropping.discard)
        return asyncio.shield(task)

    async def _close_dead(self, dead: list[Lent]) -> None:
        for conn, raw in dead:
            try:
                with suppress(Exception):
                    raw.terminate()
                with suppress(Exception):
                    await conn.invalidate()
            finally:
                self.gone()

    async def _wait(self) -> Lent | None:
        future: asyncio.Future[Lent | None] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        try:
            return await asyncio.wait_for(asyncio.shield(future), POOL_TIMEOUT)
        except BaseException as error:
            if not future.done():
                future.cancel()
            elif (lent := future.result()) is not None:
                await self.give_back(lent)  # handed over just as the wait ended
            else:
                self.gone()
            if isinstance(error, TimeoutError):
                raise errors.Unavailable("The database is busy, try again later.") from error
            raise

    def _next_waiter(self) -> asyncio.Future[Lent | None] | None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                return waiter
        return None

    async def give_back(self, lent: Lent) -> None:
        """A lent connection in good order (no transaction open) is free again."""
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_result(lent)
        elif len(self._idle) < self._keep:
            self._idle.append((lent, time.monotonic()))
        else:
            self._taken -= 1
            await lent[0].close()  # to the pool, which may close it

    def gone(self) -> None:
        """A lent connection was invalidated (or never made): its place is free."""
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_result(None)
        else:
            self._taken -= 1

    async def close(self) -> None:
        """Give the idle connections back to the pool, once dead ones are closed (before
        the engine is disposed)."""
        if self._dropping:
            await asyncio.wait(self._dropping)
        idle, self._idle = self._idle, []
        for (conn, _raw), _since in idle:
            self._taken -= 1
            await conn.close()


async def _alive(raw: Any) -> bool:
    """Whether an idle PostgreSQL connection answers, within ``_PING_TIMEOUT``."""
    try:
        await asyncio.wait_for(raw.execute("SELECT 1"), _PING_TIMEOUT)
    except Exception:  # whatever it is, the connection is not one to lend
        return False
    return True


class Driver(Generic[L]):
    """Compiles statements for ``engine``'s dialect and runs operations on it; each write
    group settles a fresh ``ledger()``, which the storage layer sets."""

    ledger: Callable[[], L]

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self._pending: list[_Pending[L]] = []
        # A group that did not fit GROUP_ROWS ran (alone): the operations that fit, queued
        # behind others that do not, go next (``_next_group``).
        self._after_heavy = False
        self._heavy = asyncio.Semaphore(1)
        # Committers running, and their tasks (for close()). The count is given back in
        # the same step in which a committer finds nothing pending, so that a write
        # submitted right after is never left without one.
        self._committers = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._direct = 0  # operations running outside the groups, and when there are none
        self._no_direct = asyncio.Event()
        self._no_direct.set()
        # SQLite has one writer at a time; PostgreSQL overlaps one group's statements
        # with another's commit.
        self._max_committers = _POSTGRES_COMMITTERS if self.postgres else 1
        if self.postgres:
            limit, keep = POSTGRES_POOL_SIZE + POSTGRES_POOL_OVERFLOW, POSTGRES_POOL_SIZE
        else:
            limit = keep = engine.pool.size()  # type: ignore[attr-defined]
        self._lender = _Lender(engine, limit, keep, ping=self.postgres)
        # Observers (metrics): each group's size and seconds, each read's seconds, and
        # how many operations found the database unavailable.
        self.on_group: Callable[[int, float], None] | None = None
        self.on_read: Callable[[float], None] | None = None
        self.unavailable = 0
        # An in-memory database neither waits for a disk nor shares its connection: light
        # writes run right on the event loop, which saves two thread switches per group.
        # Reads (monitoring, peeks, the poller: they may count many rows), groups run
        # alone (sweeps, drains) and heavy writes (large bodies, publishes to many or to
        # topics not known yet) still go to aiosqlite's thread, which lets the loop run
        # while SQLite works.
        self._inline = not self.postgres and engine.url.database in (None, "", ":memory:")
        # The longest body this process stored: what each row counts as of a write that
        # cannot say its bytes (the in-memory database holds only what this process
        # stored, so no body it reads or rewrites is longer).
        self.largest_body = 0

    def stored(self, body_bytes: int) -> None:
        """A body ``body_bytes`` long is about to be stored (``largest_body``)."""
        self.largest_body = max(self.largest_body, body_bytes)

    def prepare(self, stmt: ClauseElement) -> Prepared:
        compiled = stmt.compile(
            dialect=self._engine.dialect, compile_kwargs={"render_postcompile": True}
        )
        assert isinstance(compiled, SQLCompiler)
        # Binds given values at build time (LIMIT 1, IN lists) keep them as defaults.
        return Prepared(compiled.string, tuple(compiled.positiontup or ()), compiled.params)

    def prepare_once(self, key: Hashable, build: Callable[[], ClauseElement]) -> Prepared:
        """``prepare(build())``, compiled once per process for this kind of database (its
        dialect and server version) and ``key``: for statements that take long to compile
        and depend on nothing else (every start, and every test's app, would pay)."""
        dialect = self._engine.dialect
        cache_key = (type(dialect), dialect.server_version_info, key)
        prepared = _PREPARED.get(cache_key)
        if prepared is None:
            prepared = _PREPARED[cache_key] = self.prepare(build())
        return prepared

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[Any]:
        """A pooled driver connection; unreachable-database errors become
        ``errors.Unavailable`` and the broken connection is dropped from the pool."""
        try:
            conn, raw = await self._lender.borrow()
        except exc.TimeoutError as error:  # every pooled connection is in use
            raise errors.Unavailable("The database is busy, try again later.") from error
        except _CONNECT_ERRORS as error:
            raise errors.Unavailable() from error
        healthy = False
        try:
            if self.postgres and raw.is_closed():
                raise _StaleConnection()
            yield raw
            healthy = not self._in_transaction(raw)
        except _StaleConnection:
            await self._invalidate(conn)
            raise
        except _LOST as error:
            await self._invalidate(conn)
            raise errors.Unavailable() from error
        except (sqlite3.OperationalError, asyncpg.DiskFullError) as error:
            if _is_busy(error):
                raise errors.Unavailable("The database is busy, try again later.") from error
            if _is_full(error):
                logger.error("database full: %s", error)
                raise errors.StorageFull() from error
            raise
        except Exception as error:
            if self.postgres and raw.is_closed():
                # Whatever asyncpg raised, a closed connection means the database went away.
                await self._invalidate(conn)
                raise errors.Unavailable() from error
            raise
        finally:
            if healthy:
                await self._lender.give_back((conn, raw))
            elif not conn.invalidated:
                # Failed or cancelled midway: to the pool, whose reset rolls back.
                self._lender.gone()
                await conn.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """One of the driver's connections for work outside operations (maintenance,
        tests); what it began is committed at the end of the block (rolled back on an
        error). No operation runs on it meanwhile."""
        conn, raw = await self._lender.borrow()
        try:
            yield conn
            if conn.in_transaction():
                await conn.commit()
        except BaseException:
            if not conn.invalidated:
                await conn.close()
            self._lender.gone()
            raise
        await self._lender.give_back((conn, raw))

    async def _invalidate(self, conn: AsyncConnection) -> None:
        await conn.invalidate()
        self._lender.gone()

    def _in_transaction(self, raw: Any) -> bool:
        return bool(raw.is_in_transaction() if self.postgres else raw.in_transaction)

    async def read(self, factory: ReadFactory[T], *, heavy: bool = False) -> T:
        """Run a read-only operation on a pooled connection, outside any group. A
        ``heavy`` one (its rows grow with the database: listings, scrapes, peeks of many)
        waits for the one under way, if any: heavy reads hold one connection at a time in
        this process, so that however many clients ask for them at once, the writes and
        the other reads always find one soon (the in-memory database has one)."""
        if heavy:
            async with self._heavy:
                return await self.read(factory)

        async def attempt() -> Outcome:
            async with self._connect() as raw:
                return await _drive_async(_fetcher(raw, self.postgres), factory())

        started = time.perf_counter()
        try:
            result: T = _result(await _skipping_stale(attempt))
        except errors.Unavailable:
            self.unavailable += 1
            raise
        finally:
            if self.on_read is not None:
                self.on_read(time.perf_counter() - started)
        return result

    async def write(
        self,
        factory: Callable[[L], Operation[T]],
        *,
        atomic: bool = True,
        key: tuple[Any, ...] = (),
        alone: bool = False,
        rows: int | None = 1,
        body_bytes: int | None = None,
        lone: ReadFactory[T] | None = None,
        direct: bool = False,
    ) -> T:
        """Run an operation in the next group-committed transaction; return its result
        once that transaction has committed.

        ``atomic=False`` says that each statement of the operation may commit on its own
        (it writes with one statement at most, or its statements are independent, and
        what it notes in the ledger needs no atomicity): when such an operation is alone
        in its group, it runs without BEGIN and COMMIT, which saves two round trips on
        PostgreSQL. ``key`` names the one row an operation may wait to lock: a group runs
        its keyed operations in key order, so that two groups take such locks in the same
        order. ``alone`` runs the operation in a group of its own (one that holds many
        rows, which should hold nothing else).

        ``rows`` is how many messages the operation may write or read (None: it cannot
        say, as a publish to every subscribed channel), ``body_bytes`` how many bytes of
        bodies it writes or reads back (None: it cannot say, so each of its rows counts as
        long as ``largest_body``; SQLite rewrites a whole row, body included, to change a
        column of it, and frees a body's pages to delete it). On the in-memory database,
        operations run on the event loop in groups of at most ``LIGHT_ROWS`` rows and
        ``LIGHT_BYTES`` bytes (such a group commits without waiting for any disk, so
        small groups cost little), and the loop serves other requests between two
        groups; anything heavier runs in aiosqlite's thread, which lets the loop run
        while SQLite works.

        ``lone`` is the operation as one statement that keeps the ledger's counts itself
        (PostgreSQL's data-changing CTEs): when the operation is alone in its group, that
        statement runs and commits on its own, one round trip instead of four (BEGIN, the
        statement, the ledger's, COMMIT). It raises ``Declined`` when it cannot stand for
        the operation (having changed nothing), and the operation runs in a transaction.

        ``direct`` says that the operation is one statement that waits for no other's
        locks (it skips the rows they hold) and notes nothing in the ledger: on PostgreSQL
        it then runs at once on a connection of its own and commits on its own, while
        fewer than ``_DIRECT_LIMIT`` others do. In a group it would wait for the group's
        counter upsert, which waits for the channel's row, and for its COMMIT. Beyond that
        limit, and on SQLite (one writer), it joins the next group.
        """
        if direct and self.postgres and self._direct < _DIRECT_LIMIT:
            return await self._run_direct(factory)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if body_bytes is None:
            body_bytes = (rows or 0) * self.largest_body
        pending = _Pending(
            factory, future, atomic, key, alone, REQUEST_ID.get(), rows, body_bytes, lone
        )
        self._pending.append(pending)
        if self._committers < self._max_committers:
            self._committers += 1
            # A context of its own: it serves many requests, not the one that started it.
            task = asyncio.create_task(self._commit_pending(), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _run_direct(self, factory: Callable[[L], Operation[T]]) -> T:
        async def attempt() -> Outcome:
            async with self._connect() as raw:
                # A ledger of its own, never settled: the operation notes nothing.
                return await _drive_async(_fetcher(raw, postgres=True), factory(self.ledger()))

        self._direct += 1
        self._no_direct.clear()
        try:
            attempts = 0
            while True:
                try:
                    result: T = _result(await _skipping_stale(attempt))
                    break
                except _RETRYABLE as error:
                    attempts += 1
                    if attempts == _RETRY_ATTEMPTS:
                        raise errors.Unavailable() from error
                    await _rerun_after(error, attempts)
        except errors.Unavailable:
            self.unavailable += 1
            raise
        except errors.LingerError:
            raise
        except Exception:
            request_id = REQUEST_ID.get() or None
            logger.exception("database operation failed", extra={"request_id": request_id})
            raise errors.DatabaseError() from None
        finally:
            self._direct -= 1
            if not self._direct:
                self._no_direct.set()
        return result

    async def _commit_pending(self) -> None:
        try:
            while self._pending:
                group, inline = self._next_group()
                size, started = len(group), time.perf_counter()
                await self._commit(group, inline)
                if self.on_group is not None:
                    self.on_group(size, time.perf_counter() - started)
                if inline:  # the group held the loop: the requests it answered go first
                    await asyncio.sleep(0)
        finally:
            self._committers -= 1

    def _next_group(self) -> tuple[list[_Pending[L]], bool]:
        """The next operations to commit together, keyed ones in key order, and whether
        they run on the event loop: at most ``GROUP_ROWS`` rows together (an operation of
        more runs alone, and lets those that fit go first the next time), and on the
        in-memory database, a group that begins with a light operation takes the
        operations after it while they stay light together."""
        pending = self._pending
        if self._after_heavy:
            # After each heavy group, every operation that fits goes before the heavy ones
            # still queued (in their order): a write waits for one heavy group at most,
            # and a heavy one for the groups of what came in while the last one ran.
            self._after_heavy = False
            pending.sort(key=lambda each: not _fits(each, 0))
        size = 1
        inline = self._inline and _light(pending[0], 0, 0)
        self._after_heavy = not _fits(pending[0], 0)
        if not self._after_heavy:
            limit = min(_GROUP_LIMIT, len(pending))
            rows, body_bytes = pending[0].rows or 0, pending[0].body_bytes
            while size < limit and _fits(pending[size], rows):
                if inline and not _light(pending[size], rows, body_bytes):
                    break
                rows += pending[size].rows or 0
                body_bytes += pending[size].body_bytes
                size += 1
        group = pending[:size]
        del pending[:size]
        group.sort(key=lambda each: each.key)
        return group, inline

    async def _commit(self, group: list[_Pending[L]], inline: bool) -> None:
        """Run ``group`` until every operation in it is settled: an operation that fails
        unexpectedly is answered alone and the others run again without it; a lost race
        (deadlock, serialization failure) runs the whole group again."""
        attempts = 0
        while group:
            try:
                outcomes = await self._run_group(group, inline)
            except _OperationFailed as failure:
                failed = group.pop(failure.index)
                logger.error(
                    "database operation failed",
                    exc_info=failure.__cause__,
                    extra={"request_id": failed.request_id},
                )
                _settle(failed.future, error=errors.DatabaseError())
                continue
            except _RETRYABLE as error:
                attempts += 1
                if attempts < _RETRY_ATTEMPTS:
                    await _rerun_after(error, attempts)
                    continue
                self.unavailable += len(group)
                outcomes_error: errors.LingerError = errors.Unavailable()
            except (errors.Unavailable, errors.StorageFull) as error:
                if isinstance(error, errors.Unavailable):
                    self.unavailable += len(group)
                outcomes_error = error
            except Exception:
                ids = ",".join(p.request_id for p in group if p.request_id)
                logger.exception("database transaction failed", extra={"request_id": ids or None})
                outcomes_error = errors.DatabaseError()
            else:
                for pending, outcome in zip(group, outcomes, strict=True):
                    _settle(pending.future, outcome)
                return
            for pending in group:
                _settle(pending.future, error=outcomes_error)
            return

    async def _run_group(self, group: list[_Pending[L]], inline: bool) -> list[Outcome]:
        lone = group[0].lone if len(group) == 1 and self.postgres else None
        if lone is not None:
            outcome = await _skipping_stale(partial(self._run_lone, lone))
            if outcome is not None:
                return [outcome]
        factories = [pending.factory for pending in group]
        autocommit = len(group) == 1 and not group[0].atomic
        return await _skipping_stale(partial(self._run_group_once, factories, autocommit, inline))

    async def _run_lone(self, lone: ReadFactory[Any]) -> Outcome | None:
        """Run an operation's lone form, committing on its own; None: it declined."""
        async with self._connect() as raw:
            try:
                return await _drive_async(_fetcher(raw, postgres=True), lone())
            except Declined:
                return None
            except Exception as error:
                if _is_group_error(error):
                    raise
                raise _OperationFailed(0) from error

    async def _run_group_once(
        self, factories: list[WriteFactory[L]], autocommit: bool, inline: bool
    ) -> list[Outcome]:
        ledger = self.ledger()
        async with self._connect() as raw:
            if not self.postgres:
                run = _sqlite_autocommit if autocommit else _sqlite_group
                if inline:
                    return run(raw._conn, factories, ledger)
                # One hop to aiosqlite's thread for the whole group. aiosqlite runs
                # whatever callable is queued to its worker; _execute is how its own
                # methods do it.
                return await raw._execute(run, raw._conn, factories, ledger)  # type: ignore[no-any-return]
            fetch = _fetcher(raw, postgres=True)
            if autocommit:
                return await _postgres_operations(fetch, factories, ledger)
            transaction = raw.transaction()
            try:
                await transaction.start()
            except _UNREACHABLE as error:
                raise _StaleConnection() from error
            try:
                outcomes = await _postgres_operations(fetch, factories, ledger)
            except BaseException:
                if not raw.is_closed():
                    await transaction.rollback()
                raise
            await transaction.commit()
            return outcomes

    async def close(self) -> None:
        """Wait for the operations already submitted, then give the connections back."""
        while self._tasks or self._direct:  # each may have let another start meanwhile
            if self._tasks:
                await asyncio.wait(self._tasks)
            else:
                await self._no_direct.wait()
        await self._lender.close()


LISTEN_PING_TIMEOUT = 10.0
# How long a stopping listener waits for a connection attempt it started.
_CONNECT_GRACE = 1.0
# Connection arguments that SQLAlchemy's asyncpg adapter takes for itself.
_ADAPTER_ARGS = (
    "prepared_statement_cache_size",
    "prepared_statement_name_func",
    "async_creator_fn",
)


class Listening:
    """A connection LISTENing for notifications: ``lost`` is set when it breaks."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: self.lost.set())

    async def ping(self) -> None:
        """Find a connection that died without closing (network, failover): within
        ``LISTEN_PING_TIMEOUT``."""
        try:
            await asyncio.wait_for(self._conn.execute("SELECT 1"), LISTEN_PING_TIMEOUT)
        except (*_LOST, asyncpg.PostgresError) as error:
            raise errors.Unavailable(str(error)) from error


@asynccontextmanager
async def listen(
    engine: AsyncEngine, channel: str, receive: Callable[[str], None], name: str
) -> AsyncIterator[Listening]:
    """A connection of its own (not the pool's, made with the same arguments: TLS and
    every other option of the URL) LISTENing on ``channel``; ``receive`` gets each
    notification's payload. Failures to connect or listen raise ``errors.Unavailable``."""
    cargs, cparams = engine.dialect.create_connect_args(engine.url)
    cparams = {**cparams, **POSTGRES_CONNECT_ARGS}
    for key in _ADAPTER_ARGS:
        cparams.pop(key, None)
    connecting = asyncio.ensure_future(
        asyncpg.connect(*cargs, **cparams, server_settings={"application_name": name})
    )
    try:
        conn = await asyncio.shield(connecting)
    except asyncio.CancelledError:
        # Stopped while connecting: let the attempt end (briefly) and close what it made,
        # rather than leave a half-made connection behind.
        with suppress(Exception):
            (await asyncio.wait_for(connecting, _CONNECT_GRACE)).terminate()
        raise
    except (*_LOST, asyncpg.PostgresError) as error:
        raise errors.Unavailable(str(error)) from error
    try:
        listening = Listening(conn)
        try:
            await conn.add_listener(channel, lambda _c, _pid, _ch, payload: receive(payload))
        except (*_LOST, asyncpg.PostgresError) as error:
            raise errors.Unavailable(str(error)) from error
        yield listening
    finally:
        conn.terminate()


async def _rerun_after(error: BaseException, attempts: int) -> None:
    """Pause before running again a transaction that lost a race (``_RETRYABLE``): a
    little longer after each loss, and jittered, so that the two sides do not meet
    again."""
    logger.info("transaction lost a race (%s); running it again", error)
    await asyncio.sleep(random.uniform(0.001, 0.01 * attempts))


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


def _result(outcome: Outcome) -> Any:
    if outcome.error is not None:
        raise outcome.error
    return outcome.value


def _settle(
    future: asyncio.Future[Any],
    outcome: Outcome | None = None,
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
