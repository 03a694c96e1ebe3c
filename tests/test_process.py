"""The real server process: durability across SIGKILL, graceful SIGTERM, schema checks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import sqlalchemy as sa

from .conftest import _admin, _asyncpg_dsn, run_sync


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``python -m linger`` on a free port."""

    def __init__(self, *args: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.args = ["--port", str(self.port), "--poll-max", "5", "--poll-interval", "0.1", *args]
        self.process: subprocess.Popen[bytes] | None = None
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()

    async def start(self) -> None:
        # Popen only forks: it returns at once, the waiting below is asynchronous.
        self.process = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "linger", *self.args],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        deadline = asyncio.get_running_loop().time() + 15
        async with aiohttp.ClientSession() as session:
            while True:
                assert self.process.poll() is None, self.stderr()
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(self.base + "/") as response:
                        if response.status == 200:
                            return
                assert asyncio.get_running_loop().time() < deadline, "server did not start"
                await asyncio.sleep(0.05)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode()

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def server_args(database_url: str) -> list[str]:
    url = sa.make_url(database_url)
    if url.get_backend_name() == "sqlite":
        return ["--dbfile", str(url.database)]
    return ["--db", database_url]


@pytest.fixture
async def servers() -> AsyncIterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


async def _start(servers: list[Server], *args: str) -> Server:
    server = Server(*args)
    servers.append(server)
    await server.start()
    return server


async def test_acknowledged_message_survives_sigkill(
    servers: list[Server], server_args: list[str]
) -> None:
    server = await _start(servers, *server_args)
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
        restarted = await _start(servers, *server_args)
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
    server = await _start(servers, *server_args)
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
        restarted = await _start(servers, *server_args)
        async with session.get(f"{restarted.base}/channels/c") as response:
            assert response.status == 200
            assert response.headers["x-linger-msg-id"] == str(message_id)
            assert response.headers["x-linger-delivered"] == "2"


async def test_sigterm_answers_waiters_and_exits_zero(
    servers: list[Server], server_args: list[str]
) -> None:
    server = await _start(servers, *server_args)
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
    command = [sys.executable, "-m", "linger", "--port", str(_free_port()), "--db", empty_postgres]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("linger: the database schema")
    assert "alembic upgrade head" in result.stderr


@pytest.mark.postgres
async def test_postgres_migrate_option_upgrades(empty_postgres: str, servers: list[Server]) -> None:
    await _start(servers, "--db", empty_postgres, "--migrate")
    conn = await asyncpg.connect(_asyncpg_dsn(empty_postgres))
    try:
        assert await conn.fetchval("SELECT version_num FROM alembic_version") == "0001"
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
    assert "0001 (head)" in result.stdout
