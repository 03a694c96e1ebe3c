"""Benchmark scenario worker: messages per second through the client's worker loop
(``linger.client.Consumer``) with a handler that does nothing, receiving one message or a
batch of 100 at a time. The loop runs in the benchmark's process; every message it handled
must have been handled once and deleted, and nothing may be left hidden."""

from __future__ import annotations

import asyncio
import time

from bench.scenarios import Failed, Run, Size
from bench.servers import Server
from linger.client import AsyncClient, Message

CHANNEL = "worker"
# Concurrent handlers, as the other scenarios' 16 connections; a batch of 100 gets 100 (the
# loop receives no more than it has free handlers for, so that nothing waits leased).
CONCURRENCY = 16
# Messages queued before the loop starts, per second of measurement: more than it can
# take in that time, for either batch size (it stops at the deadline or when they ran out).
_FILL_PER_SECOND = {1: 2_000, 100: 10_000}
_BODY = "x" * 256


def _require(condition: bool, text: str) -> None:
    if not condition:
        raise Failed(text)


async def _fill(client: AsyncClient, count: int) -> None:
    for start in range(0, count, 1000):
        await client.add_many(CHANNEL, [_BODY] * min(1000, count - start))


async def _consume(client: AsyncClient, batch: int, seconds: float) -> tuple[list[int], float]:
    """Run the loop for ``seconds`` (or until the channel is empty); the ids handled, and
    the seconds it ran."""
    handled: list[int] = []

    async def handle(message: Message) -> None:
        handled.append(message.id)

    consumer = client.consumer(
        CHANNEL, handle, concurrency=max(CONCURRENCY, batch), batch=batch, wait=1, signals=False
    )
    started = time.perf_counter()
    running = asyncio.create_task(consumer.run())
    deadline = started + seconds
    while time.perf_counter() < deadline and not running.done():
        await asyncio.sleep(0.05)
        if (await client.channel_stats(CHANNEL)).ready == 0:
            break
    consumer.stop()
    counters = await running
    elapsed = time.perf_counter() - started
    _require(counters.processed == len(handled), f"worker: {counters} for {len(handled)}")
    _require(counters.lost == counters.failed == 0, f"worker: {counters}")
    return handled, elapsed


async def _run(server: Server, batch: int, seconds: float) -> Run:
    token = server.headers.get("Authorization", "").removeprefix("Bearer ") or None
    async with AsyncClient(server.base, token=token, timeout=60) as client:
        filled = int(_FILL_PER_SECOND[batch] * seconds)
        await _fill(client, filled)  # set-up, not measured
        with server.metered() as cpu:
            handled, elapsed = await _consume(client, batch, seconds)
        _require(len(handled) == len(set(handled)), "worker: a message was handled twice")
        stats = await client.channel_stats(CHANNEL)
        _require(
            stats.hidden == 0 and stats.ready == filled - len(handled),
            f"worker: {filled} queued, {len(handled)} handled, {stats} left",
        )
        await client.drain(CHANNEL)
    return Run(len(handled) / elapsed, len(handled), cpu)


def worker(server: Server, size: Size, batch: int) -> Run:
    """Messages handled and deleted per second by the worker loop, ``batch`` at a time."""
    return asyncio.run(_run(server, batch, size.seconds))
