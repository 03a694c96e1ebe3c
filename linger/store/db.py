"""Schema (SQLAlchemy Core tables), engine creation and migrations."""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from linger import errors
from linger.config import is_memory_sqlite

logger = logging.getLogger(__name__)

NAME_LENGTH = 250

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only reuses no id when the rowid column is an AUTOINCREMENT INTEGER PRIMARY KEY.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Times are integer milliseconds since the epoch, computed from Linger's clock, so that
# the SQL is the same on every backend and tests can move time without sleeping.
messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("channel", sa.String(NAME_LENGTH), nullable=False),
    sa.Column("priority", sa.BigInteger, nullable=False),
    sa.Column("timeout", sa.BigInteger, nullable=False),
    sa.Column("deliver", sa.BigInteger, nullable=False),
    sa.Column("linger", sa.BigInteger, nullable=False),
    sa.Column("topic", sa.String(NAME_LENGTH), nullable=False),
    sa.Column("content_type", sa.Text, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    # 0: queued, ready. Otherwise the message is parked: delivered (leased) or delayed, and
    # ready again from visible_at on. The state is always visible_at compared with the
    # clock; the sweeper puts parked messages that are due back to 0 only to keep the
    # claim's second look (at parked messages that are due) short.
    sa.Column("visible_at", sa.BigInteger, nullable=False),
    # Not deliverable, counted or deletable from dead_at on: the retention end, or the end
    # of the last allowed delivery's timeout. NULL: never. The sweeper deletes dead rows
    # (or moves them to their dead channel).
    sa.Column("dead_at", sa.BigInteger, nullable=True),
    sa.Column("deliveries", sa.BigInteger, nullable=False),
    # A body published to many channels is stored once, in ``bodies``; such a copy's own
    # body is empty.
    sa.Column("body_id", sa.BigInteger, nullable=True),
    # The current lease: set by each delivery, cleared by a release or a move. A lease
    # token names the message and this value.
    sa.Column("lease", sa.BigInteger, nullable=True),
    # The dead-letter channel (option ``dead``).
    sa.Column("dead", sa.String(NAME_LENGTH), nullable=True),
    # A dead letter: where it died, why ("deliveries" or "rejected"), and the options that
    # do not apply in a dead channel (no delivery limit, no retention) for a redrive.
    sa.Column("dead_from", sa.String(NAME_LENGTH), nullable=True),
    sa.Column("dead_reason", sa.String(16), nullable=True),
    sa.Column("origin_deliver", sa.BigInteger, nullable=True),
    sa.Column("origin_linger", sa.BigInteger, nullable=True),
    # The claim reads the first queued message in (priority, id) order from here: parked
    # messages are not in it, so however many are in flight, a claim reads one entry.
    # created_at: the age of a channel's oldest queued message, from the index alone.
    sa.Index(
        "ix_messages_queue",
        "channel",
        "priority",
        "id",
        "created_at",
        sqlite_where=sa.text("visible_at = 0"),
        postgresql_where=sa.text("visible_at = 0"),
    ),
    # Parked messages by the time they are due: the claim's second look (the few that are
    # due now), the sweeper putting them back in the queue, the poller's next wake-up.
    sa.Index(
        "ix_messages_parked",
        "visible_at",
        "channel",
        sqlite_where=sa.text("visible_at > 0"),
        postgresql_where=sa.text("visible_at > 0"),
    ),
    # /stats' urgent and niced counts: only the messages whose priority is not 0.
    sa.Index(
        "ix_messages_priority",
        "priority",
        sqlite_where=sa.text("priority != 0"),
        postgresql_where=sa.text("priority <> 0"),
    ),
    # The sweeper's range, and the dead rows of one channel that the high-level mark must
    # not count, both read from the index alone; only rows that can die are in it (most
    # messages have no retention and no delivery limit: their inserts skip this index).
    sa.Index(
        None,
        "dead_at",
        "channel",
        sqlite_where=sa.text("dead_at IS NOT NULL"),
        postgresql_where=sa.text("dead_at IS NOT NULL"),
    ),
    sqlite_autoincrement=True,
    # Room on each page for updates in place, and vacuum that keeps up with a table whose
    # rows live for seconds (the default waits for 20% of it to be dead).
    postgresql_with={
        "fillfactor": 80,
        "autovacuum_vacuum_scale_factor": 0.0,
        "autovacuum_vacuum_threshold": 1000,
        "autovacuum_vacuum_insert_scale_factor": 0.0,
        "autovacuum_vacuum_insert_threshold": 10000,
        "autovacuum_vacuum_cost_delay": 0,
    },
)

channels = sa.Table(
    "channels",
    metadata,
    sa.Column("name", sa.String(NAME_LENGTH), primary_key=True),
    # Last time a consumer long-polled the channel; it is listed for 180 s after that.
    sa.Column("polled_at", sa.BigInteger, nullable=False),
    # Rows of the channel in ``messages`` (dead ones not yet swept included), kept in the
    # same transaction as every change to them: the high-level mark reads it, not a count.
    sa.Column("messages", sa.BigInteger, nullable=False, server_default="0"),
)

bodies = sa.Table(
    "bodies",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    # Messages that refer to this body; the last one to go deletes it.
    sa.Column("refs", sa.BigInteger, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sqlite_autoincrement=True,
)

subscriptions = sa.Table(
    "subscriptions",
    metadata,
    sa.Column("topic", sa.String(NAME_LENGTH), primary_key=True),
    sa.Column("channel", sa.String(NAME_LENGTH), primary_key=True),
    sa.Column("priority", sa.BigInteger, nullable=False),
    sa.Column("timeout", sa.BigInteger, nullable=False),
    sa.Column("deliver", sa.BigInteger, nullable=False),
    sa.Column("linger", sa.BigInteger, nullable=False),
    sa.Column("delay", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("dead", sa.String(NAME_LENGTH), nullable=True),
    sa.Index(None, "channel"),
)

# Access tokens (``--auth``): only each secret's SHA-256 digest is kept, looked up by
# its unique index. Scopes are a JSON array of ``<action>:<pattern>`` strings. A revoked
# token keeps its row (``linger token list`` shows it), and never works again.
tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(NAME_LENGTH), nullable=False),
    sa.Column("digest", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("scopes", sa.Text, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=True),
    sa.Column("revoked_at", sa.BigInteger, nullable=True),
    # Written at most once a minute per process and token, never on a request's path.
    sa.Column("last_used_at", sa.BigInteger, nullable=True),
    sqlite_autoincrement=True,
)

server = sa.Table(
    "server",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


# PostgreSQL connections per process: kept open, and opened beyond them under load.
POSTGRES_POOL_SIZE = 10
POSTGRES_POOL_OVERFLOW = 10
# A request that finds every pooled connection busy this long gets 503.
POOL_TIMEOUT = 3.0
# A database that does not answer makes requests fail (503) in seconds, not hang.
POSTGRES_CONNECT_ARGS: dict[str, Any] = {"timeout": 5, "command_timeout": 30}


def create_engine(
    url: str | sa.URL, *, sqlite_synchronous: str = "FULL", sqlite_busy_timeout: float = 10.0
) -> AsyncEngine:
    """An async engine for ``url``; SQLite connections get WAL, a busy timeout and
    ``BEGIN IMMEDIATE`` transactions, so writers queue instead of failing."""
    url = sa.make_url(url)
    if url.get_backend_name() != "sqlite":
        return create_async_engine(
            url,
            pool_size=POSTGRES_POOL_SIZE,
            max_overflow=POSTGRES_POOL_OVERFLOW,
            pool_timeout=POOL_TIMEOUT,
            connect_args=POSTGRES_CONNECT_ARGS,
        )
    # A rollback on every check-in would cost a thread hop; the reset hook below rolls
    # back only a connection that is really inside a transaction.
    options: dict[str, Any] = {"connect_args": {"timeout": 10}, "pool_reset_on_return": None}
    if is_memory_sqlite(url):
        # One connection holds the whole in-memory database: checkouts must queue for it
        # (StaticPool would share it between concurrent transactions), and it must never
        # be recycled.
        # The driver runs its short statements on the event loop's thread as well as
        # in aiosqlite's (one user at a time: it lends the connection to one operation).
        options["connect_args"]["check_same_thread"] = False
        options.update(
            poolclass=AsyncAdaptedQueuePool,
            pool_size=1,
            max_overflow=0,
            pool_recycle=-1,
            pool_timeout=POOL_TIMEOUT,
        )
    else:
        options.update(pool_size=8, max_overflow=0, pool_timeout=POOL_TIMEOUT)
    engine = create_async_engine(url, **options)
    memory = is_memory_sqlite(url)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Autocommit at the driver: one statement is one transaction; multi-statement
        # transactions say BEGIN IMMEDIATE themselves.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not memory:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={sqlite_synchronous}")
            # Deep queues outgrow SQLite's 2 MB page cache: read the file through a shared
            # memory map and keep more pages per connection.
            cursor.execute("PRAGMA mmap_size=1073741824")
            cursor.execute("PRAGMA cache_size=-16384")
        # Writers queue for the lock this long (other processes sharing the file), then
        # the request fails with 503.
        cursor.execute(f"PRAGMA busy_timeout={int(sqlite_busy_timeout * 1000)}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "reset")
    def _on_reset(dbapi_connection: Any, _record: Any, state: Any) -> None:
        if state.asyncio_safe and dbapi_connection.driver_connection.in_transaction:
            dbapi_connection.rollback()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def migrations_dir() -> Path:
    return Path(importlib.import_module("linger.migrations").__path__[0])


def alembic_config(connection: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def head() -> str:
    """The newest migration revision."""
    return str(ScriptDirectory.from_config(alembic_config()).get_current_head())


def _upgrade(connection: sa.Connection) -> None:
    command.upgrade(alembic_config(connection), "head")


def _is_current(connection: sa.Connection) -> bool:
    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    current = set(MigrationContext.configure(connection).get_current_heads())
    return current == heads


async def upgrade(engine: AsyncEngine) -> None:
    """Apply every pending migration on a connection of ``engine``."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)


async def check_schema(engine: AsyncEngine) -> None:
    """Raise ``SchemaOutdated`` unless the database is at the newest migration."""
    async with engine.connect() as conn:
        if not await conn.run_sync(_is_current):
            raise errors.SchemaOutdated(
                f"the database schema is behind this Linger (it needs revision {head()}): "
                "run `alembic upgrade head` (or start once with --migrate)"
            )


async def prepare(engine: AsyncEngine, *, migrate: bool) -> None:
    """Migrate SQLite (or any database when ``migrate``), otherwise check the schema.
    Raise ``Misconfigured`` when the driver refuses the URL's options."""
    try:
        if migrate or engine.dialect.name == "sqlite":
            await upgrade(engine)
        else:
            await check_schema(engine)
    except (TypeError, ValueError) as error:  # an unknown or malformed connect argument
        raise errors.Misconfigured(f"the database URL is not usable: {error}") from error
    except sa.exc.DBAPIError as error:
        if engine.dialect.name != "sqlite":
            raise
        # A file that cannot be opened or is not a SQLite database: one line, not a trace.
        await engine.dispose()
        await _failed_connections_ended()
        raise errors.Misconfigured(
            f"cannot use the SQLite database {engine.url.database}: {error.orig}"
        ) from error


# Longest wait for the threads of SQLite connections that failed to open.
_THREADS_JOINED_WITHIN = 1.0


async def _failed_connections_ended() -> None:
    """Wait (off the event loop, a second at most) for the threads of SQLite connections
    to end. aiosqlite stops the thread of a connection that failed to open without waiting
    for it, and that thread's last callback needs the event loop still open: a process
    that stops at once because it cannot open its database would print the thread's
    traceback after its one line."""
    ending = [t for t in threading.enumerate() if t.name.endswith("(_connection_worker_thread)")]
    if ending:
        await asyncio.to_thread(_join, ending, time.monotonic() + _THREADS_JOINED_WITHIN)


def _join(threads: list[threading.Thread], deadline: float) -> None:
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


async def server_id(conn: AsyncConnection, new_id: str) -> str:
    """The server id kept in the database, created as ``new_id`` on first use."""
    dialect_insert: Any
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    await conn.execute(
        dialect_insert(server).values(key="id", value=new_id).on_conflict_do_nothing()
    )
    value = await conn.scalar(sa.select(server.c.value).where(server.c.key == "id"))
    return str(value)
