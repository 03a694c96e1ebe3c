"""Servers under test, started by the benchmark itself on 127.0.0.1: Linger on each backend,
and the original Linger 1.0.1 in a virtual environment of its own."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from bench.cpu import Cpu, metered

if TYPE_CHECKING:
    from tests.pgcluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
ORIGINAL_VENV = ROOT / "bench" / ".original-venv"
ORIGINAL_VERSION = "1.0.1"
# The original binds every interface; this wrapper makes it listen on 127.0.0.1 only.
_ORIGINAL_WRAPPER = """
import sys
import tornado.tcpserver
_listen = tornado.tcpserver.TCPServer.listen
def listen(self, port, address=None, *args, **kwargs):
    return _listen(self, port, "127.0.0.1", *args, **kwargs)
tornado.tcpserver.TCPServer.listen = listen
sys.argv[0] = "linger"
from linger.__main__ import main
main()
"""
OPEN_FILES = 65536


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_open_files() -> None:
    """Long-poll runs hold thousands of connections: lift the open-files limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


@dataclass
class Server:
    """One running server process."""

    name: str
    command: list[str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    # The PostgreSQL server it uses, whose CPU counts with its own.
    database_pid: int | None = None
    # Sent with every request the benchmark's own clients make (a token, with --auth).
    headers: dict[str, str] = field(default_factory=dict)

    def session(self, **kwargs: Any) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(headers=self.headers, **kwargs)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log = Path(tempfile.mkstemp(prefix=f"bench-{self.name}-", suffix=".log")[1])
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [*self.command, f"--port={self.port}"],
                stdout=log,
                stderr=log,
                preexec_fn=raise_open_files,
            )
        asyncio.run(self._wait_ready())

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as session:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self.log_text()[-2000:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(self.base + "/stats") as response:
                        if response.status in (200, 401):  # 401: up, with --auth
                            return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start")
                await asyncio.sleep(0.1)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""

    def rss_mb(self) -> float:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    @contextlib.contextmanager
    def metered(self) -> Iterator[Cpu]:
        """The CPU this server (and its database) used while the block runs."""
        assert self.process is not None
        with metered(self.process.pid, self.database_pid) as cpu:
            yield cpu

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log is not None:
            self.log.unlink(missing_ok=True)


def fresh_database(url: str) -> str:
    """A new, empty database on the benchmark's cluster (each run starts from nothing,
    whatever version of the schema the previous one left)."""
    name = f"bench{time.monotonic_ns()}"

    async def create() -> None:
        import asyncpg

        dsn = url.replace("postgresql+asyncpg://", "postgresql://")
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()

    asyncio.run(create())
    return url.rsplit("/", 1)[0] + "/" + name


def original_python() -> Path:
    """The interpreter of a virtual environment holding the original Linger 1.0.1."""
    python = ORIGINAL_VENV / "bin" / "python"
    marker = ORIGINAL_VENV / f"linger-{ORIGINAL_VERSION}"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(ORIGINAL_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"linger=={ORIGINAL_VERSION}"], check=True
        )
        marker.touch()
    return python


@contextlib.contextmanager
def postgres_cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL with its defaults for durability (fsync and
    synchronous_commit on) for the length of the benchmark; each Linger started on it
    migrates it (``--migrate``), so that any version of Linger can be measured."""
    sys.path.insert(0, str(ROOT))
    from tests.pgcluster import Cluster

    cluster = Cluster(durable=True)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def linger_command(
    backend: str, workdir: Path, postgres_url: str | None, python: str = sys.executable
) -> list[str]:
    """The command of a Linger on ``backend``, run by ``python`` (-I: that installation's
    own linger, never one in the working directory)."""
    base = [python, "-I", "-m", "linger", "--log-level", "WARNING"]
    if backend == "memory":
        return base
    if backend == "file":
        database = workdir / f"bench-{time.monotonic_ns()}.db"
        return [*base, "--dbfile", str(database)]
    if backend == "postgres":
        assert postgres_url is not None
        # The database is on this host: no TLS, as the README advises for that case (the
        # cluster offers it, and asyncpg's default would take it).
        url = fresh_database(postgres_url) + "?ssl=disable"
        return [*base, "--db", url, "--migrate"]
    if backend == "original":
        # -I: isolated, so that this checkout's own linger package is not the one imported.
        return [str(original_python()), "-I", "-c", _ORIGINAL_WRAPPER, "--logging=warning"]
    raise ValueError(backend)
