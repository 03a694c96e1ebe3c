"""Real ``python -m linger`` server processes for tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import aiohttp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def until(predicate: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    """Return once ``predicate()`` holds; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


class Server:
    """``python -m linger`` on a free port."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
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
                    async with session.get(self.base + "/health") as response:
                        if response.status == 200:
                            return
                assert asyncio.get_running_loop().time() < deadline, "server did not start"
                await asyncio.sleep(0.05)

    async def until_waiting(self, session: aiohttp.ClientSession, count: int) -> None:
        """Return once this (single-process) server holds ``count`` waiting long-polls."""

        async def waiting() -> bool:
            async with session.get(self.base + "/stats") as response:
                return bool((await response.json())["current-waiters"] == count)

        await until(waiting, 10)

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


async def start_server(servers: list[Server], *args: str) -> Server:
    server = Server(*args)
    servers.append(server)
    await server.start()
    return server
