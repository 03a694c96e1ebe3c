"""``python -m bench.attacks``: the loads that once stalled, deadlocked or slowed Linger,
measured against any Linger (this checkout by default, or another installation's Python
with ``--python``), so that a fix can be shown before and after on the same machine.

- ``stranded``: bursts of 16 simultaneous POSTs (in memory), and one client's sequential
  POSTs with ``--sweep-interval 5``: how many took longer than 0.5 s, the slowest.
- ``deadlock-mark``: 16 clients adding to 4 channels with ``--hlm`` (PostgreSQL), while 8
  consume: requests/s, server errors, deadlocks in the PostgreSQL log.
- ``deadlock-drain``: drains racing consumers' deletes (PostgreSQL): server errors,
  deadlocks.
- ``bad-type``: good clients' adds/s on a ``--dbfile`` alone, then with two clients
  sending a Content-Type that is not UTF-8.
- ``deep-mark``: adds to a channel holding 99,000 messages with ``--hlm 100000`` (SQLite
  file), and the latency of adds to other channels meanwhile.
- ``fanout``: a 256 KiB publish to 2,000 subscribers (SQLite file): how long it took and
  how long an add to another channel waited meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.servers import ROOT, Server

HEADERS = {"Content-Type": "text/plain"}


class Lab:
    """Starts the servers under attack: each PostgreSQL one on a fresh database of a
    throwaway cluster (fsync on), migrated by that Linger itself."""

    def __init__(self, python: str, workdir: Path, stack: ExitStack) -> None:
        self.python = python
        self.workdir = workdir
        self.stack = stack
        self.cluster: Any = None
        self._databases = 0

    def _postgres_url(self) -> str:
        if self.cluster is None:
            sys.path.insert(0, str(ROOT))
            from tests.pgcluster import Cluster, asyncpg_dsn

            self.cluster = Cluster(durable=True)
            self.cluster.start()
            self.stack.callback(self.cluster.stop)
            self._dsn = asyncpg_dsn(self.cluster.url)
        self._databases += 1
        name = f"attack{self._databases}"

        async def create() -> None:
            conn = await asyncpg.connect(self._dsn)
            try:
                await conn.execute(f"CREATE DATABASE {name}")
            finally:
                await conn.close()

        asyncio.run(create())
        return str(self.cluster.url).rsplit("/", 1)[0] + "/" + name

    async def start(self, backend: str, *options: str) -> Server:
        """A started server (started in a thread: its start-up waits synchronously)."""
        return await asyncio.to_thread(self._start, backend, *options)

    def _start(self, backend: str, *options: str) -> Server:
        # -I: the installation's own linger, never the one in the working directory.
        command = [self.python, "-I", "-m", "linger", "--log-level", "ERROR"]
        if backend == "file":
            command += ["--dbfile", str(self.workdir / f"a{time.monotonic_ns()}.db")]
        elif backend == "postgres":
            command += ["--db", self._postgres_url(), "--migrate"]
        server = Server(backend, [*command, *options])
        server.start()
        self.stack.callback(server.stop)
        return server

    def log_size(self) -> int:
        return int(self.cluster.log_size()) if self.cluster else 0

    def deadlocks(self, since: int) -> int:
        return len(self.cluster.deadlocks(since)) if self.cluster else 0


Attack = Callable[[Lab], Coroutine[Any, Any, str]]


async def _post(
    session: aiohttp.ClientSession, url: str, body: bytes = b"m", headers: dict[str, str] = HEADERS
) -> tuple[int, float]:
    started = time.perf_counter()
    async with session.post(url, data=body, headers=headers) as response:
        await response.read()
        return response.status, time.perf_counter() - started


def _summary(latencies: list[float]) -> str:
    slow = sum(1 for latency in latencies if latency > 0.5)
    return f"{slow} of {len(latencies)} over 0.5 s, slowest {max(latencies) * 1000:.0f} ms"


async def stranded(lab: Lab) -> str:
    server = await lab.start("memory")
    async with aiohttp.ClientSession() as session:
        bursts: list[float] = []
        for _ in range(42):
            results = await asyncio.gather(
                *(_post(session, f"{server.base}/channels/burst") for _ in range(16))
            )
            bursts += [latency for _status, latency in results]
        steady: list[float] = []
        stop = time.monotonic() + 5.0

        async def client() -> None:
            while time.monotonic() < stop:
                steady.append((await _post(session, f"{server.base}/channels/steady"))[1])

        await asyncio.gather(*(client() for _ in range(16)))
    server.stop()
    server = await lab.start("memory", "--sweep-interval", "5")
    async with aiohttp.ClientSession() as session:
        single = [(await _post(session, f"{server.base}/channels/one"))[1] for _ in range(60)]
    server.stop()
    return (
        f"bursts of 16: {_summary(bursts)}; 16 clients for 5 s: {_summary(steady)}; "
        f"single POSTs (--sweep-interval 5): {_summary(single)}"
    )


async def _mark_load(server: Server, seconds: float) -> tuple[int, list[int], list[float]]:
    statuses: list[int] = []
    latencies: list[float] = []
    stop = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:

        async def producer(offset: int) -> None:
            k = 0
            while time.monotonic() < stop:
                status, latency = await _post(
                    session, f"{server.base}/channels/m{(offset + k) % 4}"
                )
                statuses.append(status)
                latencies.append(latency)
                k += 1

        async def consumer(channel: str) -> None:
            while time.monotonic() < stop:
                async with session.get(f"{server.base}/channels/{channel}?nowait") as got:
                    await got.read()
                    statuses.append(got.status)
                    if got.status != 200:
                        continue
                    message = got.headers["x-linger-msg-id"]
                async with session.delete(f"{server.base}/messages/{message}") as deleted:
                    statuses.append(deleted.status)

        await asyncio.gather(
            *(producer(i) for i in range(16)), *(consumer(f"m{i % 4}") for i in range(8))
        )
    return len(statuses), statuses, latencies


async def deadlock_mark(lab: Lab) -> str:
    server = await lab.start("postgres", "--hlm", "100000")
    since = lab.log_size()
    seconds = 8.0
    count, statuses, latencies = await _mark_load(server, seconds)
    errors = sum(1 for status in statuses if status >= 500)
    p99 = sorted(latencies)[int(len(latencies) * 0.99)]
    deadlocks = lab.deadlocks(since)
    server.stop()
    return (
        f"{count / seconds:,.0f} requests/s, {errors} server errors, p99 add {p99 * 1000:.0f} ms, "
        f"{deadlocks} deadlocks in the PostgreSQL log"
    )


async def deadlock_drain(lab: Lab) -> str:
    server = await lab.start("postgres")
    since = lab.log_size()
    statuses: list[int] = []
    stop = time.monotonic() + 8.0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:

        async def producer() -> None:
            while time.monotonic() < stop:
                await asyncio.gather(
                    *(_post(session, f"{server.base}/channels/race") for _ in range(8))
                )

        async def consumer() -> None:
            while time.monotonic() < stop:
                async with session.get(f"{server.base}/channels/race?nowait") as got:
                    await got.read()
                    if got.status != 200:
                        continue
                    message = got.headers["x-linger-msg-id"]
                async with session.delete(f"{server.base}/messages/{message}") as deleted:
                    statuses.append(deleted.status)

        async def drainer() -> None:
            while time.monotonic() < stop:
                async with session.delete(f"{server.base}/channels/race") as drained:
                    statuses.append(drained.status)
                await asyncio.sleep(0.01)

        await asyncio.gather(producer(), drainer(), drainer(), *(consumer() for _ in range(8)))
    errors = sum(1 for status in statuses if status >= 500)
    deadlocks = lab.deadlocks(since)
    server.stop()
    return f"{errors} server errors in 8 s, {deadlocks} deadlocks in the PostgreSQL log"


async def _adds_per_second(
    server: Server, seconds: float, hostile: int, *, bad: bool = True
) -> float:
    done = 0
    stop = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:

        async def good() -> None:
            nonlocal done
            while time.monotonic() < stop:
                status, _latency = await _post(session, f"{server.base}/channels/good")
                done += status == 202

        async def evil() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            # A Content-Type that is not UTF-8, or (as a yardstick) a bad priority: both
            # are refused requests, one used to reach the database.
            kind, query = (b"text/\xff\xfe", b"") if bad else (b"text/plain", b"?priority=x")
            head = (
                b"POST /channels/evil"
                + query
                + b" HTTP/1.1\r\nHost: x\r\nContent-Type: "
                + kind
                + b"\r\nContent-Length: 1\r\n\r\nm"
            )
            while time.monotonic() < stop:
                writer.write(head)
                line = await reader.readline()
                if not line:
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                    continue
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                await reader.read(200)  # the short error body
                await asyncio.sleep(0.01)  # about 100 requests/s each
            writer.close()

        await asyncio.gather(*(good() for _ in range(8)), *(evil() for _ in range(hostile)))
    return done / seconds


async def bad_type(lab: Lab) -> str:
    server = await lab.start("file")
    alone = await _adds_per_second(server, 5.0, 0)
    beside_good = await _adds_per_second(server, 5.0, 2, bad=False)
    attacked = await _adds_per_second(server, 5.0, 2)
    server.stop()
    return (
        f"8 clients' adds: {alone:,.0f}/s alone, {beside_good:,.0f}/s beside 2 clients "
        f"sending bad priorities (400), {attacked:,.0f}/s beside 2 clients sending a "
        "Content-Type that is not UTF-8 (each about 100 requests/s)"
    )


async def deep_mark(lab: Lab) -> str:
    server = await lab.start("file", "--hlm", "100000")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
        numbers = iter(range(99_000))

        async def fill() -> None:
            for _ in numbers:
                await _post(session, f"{server.base}/channels/deep")

        await asyncio.gather(*(fill() for _ in range(32)))
        deep: list[float] = []
        other: list[float] = []

        async def to_deep() -> None:
            for _ in range(100):
                deep.append((await _post(session, f"{server.base}/channels/deep"))[1])
                async with session.get(f"{server.base}/channels/deep?nowait") as got:
                    await got.read()
                    message = got.headers["x-linger-msg-id"]
                async with session.delete(f"{server.base}/messages/{message}") as deleted:
                    await deleted.read()

        async def to_other(i: int) -> None:
            for _ in range(100):
                other.append((await _post(session, f"{server.base}/channels/other{i}"))[1])

        await asyncio.gather(*(to_deep() for _ in range(4)), *(to_other(i) for i in range(4)))
    server.stop()
    return (
        f"add to the deep channel p50 {statistics.median(deep) * 1000:.1f} ms; other channels' "
        f"adds meanwhile p50 {statistics.median(other) * 1000:.1f} ms, "
        f"max {max(other) * 1000:.0f} ms"
    )


async def fanout(lab: Lab) -> str:
    server = await lab.start("file")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
        numbers = iter(range(2000))

        async def subscribe() -> None:
            for i in numbers:
                async with session.put(f"{server.base}/channels/sub{i}/topics/wide") as response:
                    assert response.status == 204

        await asyncio.gather(*(subscribe() for _ in range(16)))
        body = b"x" * 262_144
        publishing = asyncio.create_task(
            _post(session, f"{server.base}/topics/wide", body, {"Content-Type": "t/p"})
        )
        await asyncio.sleep(0.05)
        _status, waited = await _post(session, f"{server.base}/channels/bystander")
        status, took = await publishing
        assert status == 202, status
    server.stop()
    return (
        f"publish of 256 KiB to 2,000 subscribers {took * 1000:,.0f} ms; an add to another "
        f"channel meanwhile waited {waited * 1000:,.0f} ms"
    )


ATTACKS: dict[str, Attack] = {
    "stranded": stranded,
    "deadlock-mark": deadlock_mark,
    "deadlock-drain": deadlock_drain,
    "bad-type": bad_type,
    "deep-mark": deep_mark,
    "fanout": fanout,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attacks", description=__doc__)
    parser.add_argument(
        "--python", default=sys.executable, help="the Python of the Linger installation to attack"
    )
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated names")
    args = parser.parse_args(argv)
    chosen = [name for name in args.attacks.split(",") if name]
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="attacks-") as workdir:
        lab = Lab(args.python, Path(workdir), stack)
        for name in chosen:
            print(f"{name}: {asyncio.run(ATTACKS[name](lab))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
