"""The real server process: durability across SIGKILL, graceful SIGTERM, schema checks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import sqlalchemy as sa

from linger.store import db

from .conftest import _admin, run_sync
from .pgcluster import asyncpg_dsn
from .processes import Server, free_port, start_server


async def test_acknowledged_message_survives_sigkill(
    servers: list[Server], server_args: list[str]
) -> None:
    server = await start_server(servers, *server_args)
    async with aiohttp.ClientSession() as session:
        ids = []
        for i in range(20):
            async with session.post(
                f"{server.base}/channels/durable",
                data=f"m{i}".encode(),
                headers={"Content-Type": "text/plain"},
            ) as response:
                assert response.status == 202
                ids.append((await response.json())["id"])
        server.signal(signal.SIGKILL)
        server.wait(5)
        restarted = await start_server(servers, *server_args)
        got = []
        for _ in ids:
            async with session.get(f"{restarted.base}/channels/durable?nowait") as response:
                assert response.status == 200
                got.append(int(response.headers["x-linger-msg-id"]))
        assert got == ids
        async with session.post(
            f"{restarted.base}/channels/durable",
            data=b"new",
            headers={"Content-Type": "text/plain"},
        ) as response:
            assert (await response.json())["id"] > max(ids)


async def test_unacknowledged_delivery_comes_back_after_restart(
    servers: list[Server], server_args: list[str]
) -> None:
    server = await start_server(servers, *server_args)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.base}/channels/c?timeout=1",
            data=b"work",
            headers={"Content-Type": "text/plain"},
        ) as response:
            message_id = (await response.json())["id"]
        async with session.get(f"{server.base}/channels/c?nowait") as response:
            assert response.status == 200
        server.signal(signal.SIGKILL)
        server.wait(5)
        restarted = await start_server(servers, *server_args)
        async with session.get(f"{restarted.base}/channels/c") as response:
            assert response.status == 200
            assert response.headers["x-linger-msg-id"] == str(message_id)
            assert response.headers["x-linger-delivered"] == "2"


async def test_sigterm_answers_waiters_and_exits_zero(
    servers: list[Server], server_args: list[str]
) -> None:
    server = await start_server(servers, *server_args)
    async with aiohttp.ClientSession() as session:

        async def poll(channel: str) -> int:
            async with session.get(f"{server.base}/channels/{channel}") as response:
                await response.read()
                return response.status

        waiters = [asyncio.create_task(poll(f"c{i}")) for i in range(5)]
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            async with session.get(f"{server.base}/stats") as response:
                if (await response.json())["current-waiters"] == 5:
                    break
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        server.signal(signal.SIGTERM)
        assert await asyncio.wait_for(asyncio.gather(*waiters), 5) == [204] * 5
    assert await asyncio.to_thread(server.wait, 5) == 0


def test_default_server_is_in_memory_and_refuses_bad_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "linger", "--port", "nope"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "--port" in result.stderr


@pytest.mark.sqlite
@pytest.mark.parametrize("kind", ["not a database", "missing directory"])
def test_an_unusable_sqlite_file_is_one_line(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.db"
    if kind == "not a database":
        path.write_bytes(b"garbage, not SQLite " * 100)
    else:
        path = tmp_path / "missing" / "x.db"
    command = [sys.executable, "-m", "linger", "--port", str(free_port()), "--dbfile", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith("linger: ")
    ]
    assert f"linger: cannot use the SQLite database {path}" in result.stderr


@pytest.fixture
def empty_postgres(postgres_admin_url: str) -> str:
    async def create() -> None:
        await _admin(
            postgres_admin_url,
            "DROP DATABASE IF EXISTS linger_empty WITH (FORCE)",
            "CREATE DATABASE linger_empty",
        )

    run_sync(create())
    return sa.make_url(postgres_admin_url).set(database="linger_empty").render_as_string(False)


@pytest.mark.postgres
def test_postgres_schema_behind_is_refused_until_migrated(empty_postgres: str) -> None:
    command = [sys.executable, "-m", "linger", "--port", str(free_port()), "--db", empty_postgres]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("linger: the database schema")
    assert "alembic upgrade head" in result.stderr
    assert f"revision {db.head()}" in result.stderr


@pytest.mark.postgres
async def test_postgres_migrate_option_upgrades(empty_postgres: str, servers: list[Server]) -> None:
    await start_server(servers, "--db", empty_postgres, "--migrate")
    conn = await asyncpg.connect(asyncpg_dsn(empty_postgres))
    try:
        assert await conn.fetchval("SELECT version_num FROM alembic_version") == db.head()
    finally:
        await conn.close()


def test_alembic_command_line_upgrades_a_database(tmp_path: Path) -> None:
    database = tmp_path / "admin.db"
    env = {**os.environ, "LINGER_DB": f"sqlite+aiosqlite:///{database}"}
    root = Path(__file__).parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "current"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"{db.head()} (head)" in result.stdout
