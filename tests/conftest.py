"""Fixtures: every test that takes ``database_url`` runs once on SQLite and once on PostgreSQL.

PostgreSQL comes from LINGER_TEST_POSTGRES_URL (an admin URL) or, when that is unset, from
a throwaway cluster started for the session with the machine's PostgreSQL binaries. With
neither, the PostgreSQL half skips, unless LINGER_TEST_REQUIRE_POSTGRES=1 (CI) makes that
a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer

from linger.app import create_app
from linger.config import Settings
from linger.http.server import Runner
from linger.store import db

from .pgcluster import Cluster, asyncpg_dsn
from .processes import Server

for _name in [name for name in os.environ if name.startswith("LINGER_")]:
    if not _name.startswith("LINGER_TEST_"):
        del os.environ[_name]

BACKENDS = [
    pytest.param("sqlite", marks=pytest.mark.sqlite),
    pytest.param("postgres", marks=pytest.mark.postgres),
    # The in-memory database (the default), whose statements the driver runs on the
    # event loop itself: the message paths run on it too (MEMORY_MODULES).
    pytest.param("memory", marks=pytest.mark.sqlite),
]
MEMORY_MODULES = frozenset({"test_messages", "test_batches", "test_batch_invariants"})
TEST_DB = "linger_test"
T = TypeVar("T")


class Clock:
    """Real time plus an offset that tests move forward instead of sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to completion from sync code, even inside a running event loop
    (session fixtures may be set up from a test's loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked for one backend does not run on the other one's parameter; the
    in-memory database runs the modules of the message paths, and tests marked for it."""
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("database_url") if callspec else None
        other = {"sqlite": "postgres", "postgres": "sqlite", "memory": "postgres"}.get(str(backend))
        elsewhere = backend == "memory" and (
            (item.path.stem not in MEMORY_MODULES and item.get_closest_marker("memory") is None)
            or item.get_closest_marker("durable") is not None
        )
        (drop if elsewhere or (other and item.get_closest_marker(other)) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster | None]:
    """The session's own PostgreSQL cluster, or None with LINGER_TEST_POSTGRES_URL."""
    if os.environ.get("LINGER_TEST_POSTGRES_URL"):
        yield None
        return
    try:
        cluster = Cluster()
        cluster.start()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
        if os.environ.get("LINGER_TEST_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required but could not start: {error}")
        pytest.skip(f"no PostgreSQL: {error}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_admin_url(postgres_cluster: Cluster | None) -> str:
    """An admin URL of a PostgreSQL server for the whole session."""
    if postgres_cluster is None:
        return os.environ["LINGER_TEST_POSTGRES_URL"]
    return postgres_cluster.url


class NoDeadlocks:
    """Checks that PostgreSQL reported no deadlock while a test ran: in the server's log
    when the suite runs its own cluster, else in pg_stat_database's counter."""

    def __init__(self, cluster: Cluster | None, url: str) -> None:
        self.cluster = cluster
        self.url = url
        self.since = cluster.log_size() if cluster else 0
        self.counted = 0

    async def _counter(self) -> int:
        conn = await asyncpg.connect(asyncpg_dsn(self.url))
        try:
            return int(await conn.fetchval("SELECT sum(deadlocks) FROM pg_stat_database") or 0)
        finally:
            await conn.close()

    async def start(self) -> NoDeadlocks:
        self.counted = await self._counter()
        return self

    async def check(self) -> None:
        if self.cluster is not None:
            assert self.cluster.deadlocks(self.since) == []
        else:
            assert await self._counter() == self.counted


@pytest.fixture
async def no_deadlocks(backend: str, request: pytest.FixtureRequest) -> NoDeadlocks | None:
    """On PostgreSQL, a started ``NoDeadlocks``; None on SQLite (one writer, no locks to
    order)."""
    if backend != "postgresql":
        return None
    cluster = request.getfixturevalue("postgres_cluster")
    return await NoDeadlocks(cluster, request.getfixturevalue("postgres_url")).start()


@pytest.fixture(scope="session")
def postgres_url(postgres_admin_url: str) -> str:
    """A migrated database of its own for the session's tests."""

    async def setup() -> str:
        await _admin(
            postgres_admin_url,
            f"DROP DATABASE IF EXISTS {TEST_DB} WITH (FORCE)",
            f"CREATE DATABASE {TEST_DB}",
        )
        url = sa.make_url(postgres_admin_url).set(database=TEST_DB)
        engine = db.create_engine(url)
        await db.upgrade(engine)
        await engine.dispose()
        return url.render_as_string(hide_password=False)

    return run_sync(setup())


async def _truncate(url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute(
            "TRUNCATE messages, channels, subscriptions, bodies, tokens RESTART IDENTITY"
        )
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that each test on a file database starts from: the
    migrations run once per session rather than once per test (their own tests start
    from nothing, in test_migrations and test_schema)."""
    path = tmp_path_factory.mktemp("template") / "linger.db"

    async def migrate() -> None:
        engine = db.create_engine(f"sqlite+aiosqlite:///{path}")
        await db.upgrade(engine)
        await engine.dispose()

    run_sync(migrate())
    assert not path.with_name("linger.db-wal").exists()  # all of it in the one file
    return path


@pytest.fixture(params=BACKENDS)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        database = tmp_path / "linger.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), database)
        return f"sqlite+aiosqlite:///{database}"
    if request.param == "memory":
        return "sqlite+aiosqlite://"
    url: str = request.getfixturevalue("postgres_url")
    await _truncate(url)
    return url


@pytest.fixture
def backend(database_url: str) -> str:
    return sa.make_url(database_url).get_backend_name()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def settings(database_url: str) -> Settings:
    # Short intervals so that wake-ups and sweeps happen within test deadlines.
    return Settings(db=database_url, poll_interval=0.05, sweep_interval=0.05, poll_max=2.0)


ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


class LingerTestServer(TestServer):
    """aiohttp's test server, serving with Linger's runner (its protocol and limits)."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return Runner(self.app, **kwargs)


def test_server(app: web.Application) -> BaseTestServer:
    return LingerTestServer(app)


@pytest.fixture
def make_client(aiohttp_client: Any, settings: Settings, clock: Clock) -> ClientFactory:
    """A test client of the real app; keyword arguments override settings."""

    async def make(**overrides: Any) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = await aiohttp_client(
            test_server(create_app(replace(settings, **overrides), clock))
        )
        return client

    return make


@pytest.fixture
async def client(make_client: ClientFactory) -> TestClient[Any, Any]:
    return await make_client()


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
