"""Migrations match the tables, and the claim query's plan reads the index in order."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine

from linger.store import db
from linger.store.ledger import LedgerStatements
from linger.store.storage import Storage

from .conftest import _admin


@pytest.fixture
async def fresh_url(database_url: str, request: pytest.FixtureRequest) -> str:
    """An empty database on the test's backend."""
    url = sa.make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database:  # a file: the test's copy of the migrated template, removed
            os.remove(url.database)
        return database_url
    admin = request.getfixturevalue("postgres_admin_url")
    await _admin(
        admin, "DROP DATABASE IF EXISTS linger_fresh WITH (FORCE)", "CREATE DATABASE linger_fresh"
    )
    return url.set(database="linger_fresh").render_as_string(hide_password=False)


def _diff(connection: sa.Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, db.metadata))


def _downgrade(connection: sa.Connection) -> None:
    command.downgrade(db.alembic_config(connection), "base")


def _tables(connection: sa.Connection) -> set[str]:
    return set(sa.inspect(connection).get_table_names())


async def _engine(url: str) -> AsyncEngine:
    return db.create_engine(url)


async def test_upgrade_matches_the_tables_and_downgrade_removes_them(fresh_url: str) -> None:
    engine = await _engine(fresh_url)
    try:
        await db.upgrade(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
        await db.check_schema(engine)
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade)
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) <= {"alembic_version"}
        await db.upgrade(engine)
        async with engine.connect() as conn:
            assert {"messages", "channels", "subscriptions", "server"} <= await conn.run_sync(
                _tables
            )
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_claim_plan_reads_the_queue_in_order_and_only_due_parked_rows(
    postgres_url: str,
) -> None:
    engine = db.create_engine(postgres_url)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("TRUNCATE messages")
            await conn.exec_driver_sql(
                "INSERT INTO messages (channel, priority, timeout, deliver, linger, topic,"
                " content_type, body, created_at, visible_at, dead_at, deliveries)"
                " SELECT 'c' || (i % 100), i % 3, 30, 0, 0, '', 'text/plain', 'x', 0, 0,"
                " NULL, 0 FROM generate_series(1, 60000) AS i"
            )
            await conn.exec_driver_sql("ANALYZE messages")
        claim = Storage(engine, time.time).messages._claim
        args = claim.args({"channel": "c7", "now": int(time.time() * 1000), "n": 1, "nonce": 1})
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            plan = "\n".join(r[0] for r in await raw.fetch("EXPLAIN " + claim.sql, *args))
        # The queue is read in order (no sort of the channel), the parked ones only where
        # they are due; the messages themselves by primary key.
        assert "Index Scan using ix_messages_queue" in plan, plan
        assert "Index Scan using ix_messages_parked" in plan, plan
        assert "Seq Scan" not in plan, plan
    finally:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("TRUNCATE messages")
        await engine.dispose()


async def _plan(engine: AsyncEngine, sql: str, args: list[Any]) -> str:
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        return "\n".join(r[0] for r in await raw.fetch("EXPLAIN " + sql, *args))


@pytest.mark.postgres
async def test_sweep_and_mark_read_only_the_rows_that_can_die(postgres_url: str) -> None:
    engine = db.create_engine(postgres_url)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("TRUNCATE messages")
            await conn.exec_driver_sql(
                "INSERT INTO messages (channel, priority, timeout, deliver, linger, topic,"
                " content_type, body, created_at, visible_at, dead_at, deliveries)"
                " SELECT 'c' || (i % 100), 0, 30, 0, 0, '', 'text/plain', 'x', 0, 0,"
                " CASE WHEN i % 50 = 0 THEN i END, 0 FROM generate_series(1, 60000) AS i"
            )
            await conn.exec_driver_sql("ANALYZE messages")
        storage = Storage(engine, time.time)
        now = int(time.time() * 1000)
        sweep = storage.sweeper._stmts["discard"]
        dead = LedgerStatements(storage.driver).dead
        for stmt, params in ((sweep, {"now": now}), (dead, {"now": now, "channel": "c7"})):
            plan = await _plan(engine, stmt.sql, stmt.args(params))
            assert "ix_messages_dead_at_channel" in plan, plan
            assert "Seq Scan on messages" not in plan, plan
    finally:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("TRUNCATE messages")
        await engine.dispose()


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    return f"'{value}'" if isinstance(value, str) else str(value)


@pytest.mark.postgres
async def test_a_claim_planned_on_an_empty_table_never_scans_it_later(postgres_url: str) -> None:
    """PostgreSQL keeps a generic plan made while the table was empty (a fresh database,
    before autovacuum first looks at it) as the table grows: the claim must find the
    rows it locked again in the primary key, not by a scan of every row."""
    engine = db.create_engine(postgres_url)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("TRUNCATE messages")
        storage = Storage(engine, time.time)
        now = int(time.time() * 1000)
        params = {"channel": "c7", "now": now, "n": 100, "nonce": 1}
        for claim, extra in (
            (storage.messages._claim, {}),
            (storage.messages._claim_bounded, {"budget": 1 << 24, "shared": 1024}),
        ):
            args = claim.args({**params, **extra})
            async with engine.connect() as conn:
                raw = (await conn.get_raw_connection()).driver_connection
                assert raw is not None
                await raw.execute("SET plan_cache_mode = force_generic_plan")
                prepared = await raw.prepare(claim.sql)
                assert await prepared.fetch(*args) == []  # planned now, on no rows
                await raw.execute(
                    "INSERT INTO messages (channel, priority, timeout, deliver, linger, topic,"
                    " content_type, body, created_at, visible_at, dead_at, deliveries)"
                    " SELECT 'c' || (i % 10), 0, 30, 0, 0, '', 'text/plain', 'x', 0, 0, NULL,"
                    " 0 FROM generate_series(1, 20000) AS i"
                )
                values = ", ".join(_literal(a) for a in args)
                explain = f"EXPLAIN EXECUTE {prepared.get_name()}({values})"
                plan = "\n".join(r[0] for r in await raw.fetch(explain))
                await raw.execute("TRUNCATE messages")
            assert "Seq Scan on messages" not in plan, plan
            assert "Index Scan using pk_messages" in plan, plan
    finally:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("TRUNCATE messages")
        await engine.dispose()


@pytest.mark.postgres
async def test_batch_statements_look_messages_up_by_key(postgres_url: str) -> None:
    """Batch acknowledgements find their rows through the primary key, and a bounded
    batch claim reads the queue's index, however large the table."""
    engine = db.create_engine(postgres_url)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("TRUNCATE messages")
            # Half of them queued, half delivered (hidden, leased) for 30 s from now.
            hidden_until = int(time.time() * 1000) + 30_000
            await conn.exec_driver_sql(
                "INSERT INTO messages (channel, priority, timeout, deliver, linger, topic,"
                " content_type, body, created_at, visible_at, dead_at, deliveries, lease)"
                " SELECT 'c' || (i % 100), 0, 30, 0, 0, '', 'text/plain', 'x', 0,"
                f" CASE WHEN i % 2 = 0 THEN 0 ELSE {hidden_until} END, NULL, 1, i"
                " FROM generate_series(1, 60000) AS i"
            )
            await conn.exec_driver_sql("ANALYZE messages")
        storage = Storage(engine, time.time)
        batches = storage.batches
        now = int(time.time() * 1000)
        ids = list(range(1, 2000, 2))
        named = {"ids": ids, "nonces": ids, "now": now, "seconds": None, "delay": 0, "origin": ""}
        named["patterns"] = ["c1%", "c2_"]  # a token's scope: checked on the rows named only
        scoped = (batches._delete[True], batches._touch, batches._release)
        statements = [s.unlimited for s in scoped] + [s.limited for s in scoped]
        for stmt in (*statements, batches._live):
            plan = await _plan(engine, stmt.sql, stmt.args(named))
            assert "Seq Scan on messages" not in plan, plan
            assert "Index Scan using pk_messages" in plan, plan
        claim = storage.messages._claim_bounded
        params = {"channel": "c7", "now": now, "n": 100, "nonce": 1, "budget": 1 << 24}
        plan = await _plan(engine, claim.sql, claim.args({**params, "shared": 1024}))
        assert "Index Scan using ix_messages_queue" in plan, plan
        assert "Seq Scan on messages" not in plan, plan
    finally:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("TRUNCATE messages")
        await engine.dispose()
