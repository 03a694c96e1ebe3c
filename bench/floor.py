"""The cycle's statements with nothing around them: Linger's own SQL for an add, a claim
and a delete, run through the database driver alone, with no HTTP, no group machinery
and no Python of Linger's between them. What the driver and the database cost per cycle
on this machine is a floor under Linger's cycle, as the no-database aiohttp server is
the floor of its HTTP side; Linger's own CPU per cycle is what is left above the two.

    python -m bench.floor --backend memory|file|postgres [--db URL] [--database-pid PID]

SQLite runs on one connection, as Linger does, with Linger's pragmas (a file: WAL and
synchronous FULL), sixteen cycles' statements of a kind to a transaction (Linger's write
groups are about that size under sixteen clients). PostgreSQL runs sixteen clients on
connections of their own, each statement committed on its own (synchronous_commit on):
one round trip per statement, fewer than Linger's groups make. Prints one JSON object:
cycles, seconds, and the CPU seconds of this process and of the database server.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import sqlite3
import time
from pathlib import Path
from typing import Any

import asyncpg
import sqlalchemy as sa

from bench.cpu import tree_seconds
from linger.store import db
from linger.store.driver import Driver, Prepared
from linger.store.messages import _claim_stmt
from linger.store.sql import READY, insert_one, param

WIDTH = 16  # clients, as in the cycle scenario
_BODY = b"x" * 256


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def statements(driver: Driver[Any]) -> tuple[Prepared, Prepared, Prepared]:
    """The add (Linger's INSERT, without the NOTIFY of a PostgreSQL add), Linger's claim,
    and a delete by id and lease."""
    m = db.messages
    add = driver.prepare(insert_one().returning(m.c.id))
    claim = driver.prepare(_claim_stmt(driver.postgres))
    delete = driver.prepare(
        sa.delete(m)
        .where(m.c.id == param("id"), m.c.lease == param("lease"))
        .returning(m.c.channel, m.c.body_id)
    )
    return add, claim, delete


def _add_params(now: int) -> dict[str, Any]:
    return {
        "channel": "floor",
        "priority": 0,
        "timeout": 30,
        "deliver": 0,
        "linger": 0,
        "topic": "",
        "content_type": "text/plain",
        "body": _BODY,
        "body_id": None,
        "dead": None,
        "created_at": now,
        "visible_at": READY,
        "dead_at": None,
        "deliveries": 0,
    }


def _now() -> int:
    return int(time.time() * 1000)


def _sqlite_rounds(conn: sqlite3.Connection, prepared: tuple[Prepared, ...], seconds: float) -> int:
    add, claim, delete = prepared
    cycles = 0
    nonce = 1
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        now = _now()
        conn.execute("BEGIN IMMEDIATE")
        for _ in range(WIDTH):
            conn.execute(add.sql, add.args(_add_params(now))).fetchall()
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        leases = []
        for _ in range(WIDTH):
            nonce += 1
            params = {"channel": "floor", "now": now, "n": 1, "nonce": nonce}
            for row in conn.execute(claim.sql, claim.args(params)).fetchall():
                leases.append((int(row[0]), nonce))
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        for message_id, lease in leases:
            conn.execute(delete.sql, delete.args({"id": message_id, "lease": lease})).fetchall()
        conn.execute("COMMIT")
        cycles += len(leases)
    return cycles


async def _postgres_client(
    conn: Any, prepared: tuple[Prepared, ...], stop: float, nonces: Any
) -> int:
    add, claim, delete = prepared
    cycles = 0
    while time.monotonic() < stop:
        await conn.fetch(add.sql, *add.args(_add_params(_now())))
        nonce = next(nonces)
        params = {"channel": "floor", "now": _now(), "n": 1, "nonce": nonce}
        for row in await conn.fetch(claim.sql, *claim.args(params)):
            await conn.fetch(delete.sql, *delete.args({"id": int(row[0]), "lease": nonce}))
            cycles += 1
    return cycles


async def run(backend: str, url: str, seconds: float, database_pid: int | None) -> dict[str, Any]:
    engine = db.create_engine(url)
    try:
        await db.upgrade(engine)
        prepared = statements(Driver(engine))
        if backend == "postgres":
            dsn = url.replace("postgresql+asyncpg://", "postgresql://")
            conns = [await asyncpg.connect(dsn, ssl=False) for _ in range(WIDTH)]
            nonces = itertools.count(1)
            try:
                cpu, database = _cpu(), tree_seconds(database_pid) if database_pid else None
                started = time.monotonic()
                counts = await asyncio.gather(
                    *(_postgres_client(c, prepared, started + seconds, nonces) for c in conns)
                )
                cycles = sum(counts)
            finally:
                for conn in conns:
                    await conn.close()
        else:
            async with engine.connect() as connection:
                raw: Any = (await connection.get_raw_connection()).driver_connection
                conn = raw._conn  # aiosqlite's sqlite3 connection, used here on one thread
                conn.isolation_level = None
                cpu, database = _cpu(), None
                started = time.monotonic()
                cycles = _sqlite_rounds(conn, prepared, seconds)
        elapsed = time.monotonic() - started
        return {
            "cycles": cycles,
            "seconds": elapsed,
            "cpu": _cpu() - cpu,
            "database_cpu": tree_seconds(database_pid) - database
            if database_pid and database is not None
            else None,
        }
    finally:
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--backend", choices=("memory", "file", "postgres"), required=True)
    parser.add_argument("--db", help="the database URL (file: a path; postgres: a URL)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--database-pid", type=int)
    args = parser.parse_args()
    if args.backend == "memory":
        url = "sqlite+aiosqlite://"
    elif args.backend == "file":
        url = f"sqlite+aiosqlite:///{Path(args.db).resolve()}"
    else:
        url = args.db
    print(json.dumps(asyncio.run(run(args.backend, url, args.seconds, args.database_pid))))


if __name__ == "__main__":
    main()
