"""The ``observe`` scenario: how long the monitoring reads take on a big queue, and how
much they hold up the traffic beside them.

It fills ``size.observe_messages`` messages over ``size.observe_channels`` channels (in
batches), then, while producers and consumers cycle on another channel, reads each of
``/stats``, ``/metrics``, ``/channels`` and ``/channels/<c>/stats?detail`` several times.
Figures: each read's median and slowest latency, and the slowest add or claim of the
traffic during those reads."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass

import aiohttp

from bench.servers import Server

READS = ("/stats", "/metrics", "/channels", "/channels/o0/stats?detail")
_TIMES = 5
_JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Observed:
    latencies_ms: dict[str, tuple[float, float]]  # path: (median, slowest)
    traffic_worst_ms: float
    messages: int
    channels: int

    def describe(self) -> str:
        reads = ", ".join(
            f"{path.split('?')[0].replace('/channels/o0', '/channels/c')} "
            f"{median:.0f}/{worst:.0f} ms"
            for path, (median, worst) in self.latencies_ms.items()
        )
        return (
            f"{self.messages:,} msgs in {self.channels:,} channels: {reads} (median/slowest); "
            f"slowest add or claim meanwhile {self.traffic_worst_ms:.0f} ms"
        )


async def _fill(
    session: aiohttp.ClientSession, server: Server, messages: int, channels: int
) -> None:
    per_channel = max(1, messages // channels)
    numbers = iter(range(channels))

    async def worker() -> None:
        for number in numbers:
            left = per_channel
            while left:
                n = min(left, 1000)
                body = json.dumps([{"body": "x" * 64}] * n)
                url = f"{server.base}/channels/o{number}/messages"
                async with session.post(url, data=body, headers=_JSON) as response:
                    if response.status != 202:
                        raise RuntimeError(f"observe fill: {response.status}")
                left -= n

    await asyncio.gather(*(worker() for _ in range(8)))


async def _analyze(server: Server) -> None:
    """On PostgreSQL, refresh the planner's statistics after the bulk fill, as autovacuum
    does within a minute of such a change (with the statistics of an empty table, the
    planner would pick scans that no running deployment sees)."""
    if "--db" not in server.command:
        return
    import asyncpg

    # Without the URL's query: SQLAlchemy's options (?ssl=...) are not asyncpg's DSN ones.
    url = server.command[server.command.index("--db") + 1].split("?", 1)[0]
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def _observe(server: Server, messages: int, channels: int) -> Observed:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await _fill(session, server, messages, channels)
        await _analyze(server)
        stop = asyncio.Event()
        worst = 0.0

        async def traffic() -> None:
            nonlocal worst
            while not stop.is_set():
                for method, url in (
                    ("POST", f"{server.base}/channels/beside"),
                    ("GET", f"{server.base}/channels/beside?nowait"),
                ):
                    started = time.perf_counter()
                    async with session.request(method, url, data=b"m") as response:
                        await response.read()
                    worst = max(worst, time.perf_counter() - started)
                await asyncio.sleep(0.005)

        latencies: dict[str, tuple[float, float]] = {}
        tasks = [asyncio.create_task(traffic()) for _ in range(2)]
        try:
            for path in READS:
                times = []
                for _ in range(_TIMES):
                    started = time.perf_counter()
                    async with session.get(server.base + path) as response:
                        await response.read()
                        if response.status != 200:
                            raise RuntimeError(f"observe {path}: {response.status}")
                    times.append((time.perf_counter() - started) * 1000)
                latencies[path] = (statistics.median(times), max(times))
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    return Observed(latencies, worst * 1000, messages, channels)


def observe(server: Server, messages: int, channels: int) -> Observed:
    return asyncio.run(_observe(server, messages, channels))
