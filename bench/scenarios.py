"""Benchmark scenarios. Each one drives a running server, checks what it measured (every
acknowledged message consumed, none twice, no errors) and returns a figure; a run with a
loss raises ``Failed`` instead of giving a figure."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.cpu import Cpu
from bench.servers import Server

BENCH = Path(__file__).resolve().parent
_RESULT = re.compile(r"RESULT ops=(\d+) errors=(\d+) empty=(\d+) seconds=([\d.]+)")
HEADERS = {"Content-Type": "text/plain"}


class Failed(Exception):
    """The scenario found a lost, duplicated or failed message."""


@dataclass(frozen=True)
class Size:
    """How big a run is: seconds per measurement and message counts."""

    seconds: float = 10.0
    depth_other: int = 100_000
    depth_same: int = 10_000
    waiters: int = 10_000
    longpoll_messages: int = 1_000
    inflight_ready: int = 100_000
    inflight_hidden: int = 20_000
    observe_messages: int = 1_000_000
    observe_channels: int = 10_000


QUICK = Size(
    seconds=1.0,
    depth_other=1_000,
    depth_same=100,
    waiters=200,
    longpoll_messages=50,
    inflight_ready=1_000,
    inflight_hidden=200,
    observe_messages=2_000,
    observe_channels=20,
)


@dataclass(frozen=True)
class Run:
    """One measurement: its rate, the messages it moved and the CPU they cost."""

    rate: float
    moved: int
    cpu: Cpu

    @property
    def server_us(self) -> float:
        """Server CPU per message moved, in microseconds."""
        return self.cpu.server / max(1, self.moved) * 1e6

    @property
    def database_us(self) -> float | None:
        if self.cpu.database is None:
            return None
        return self.cpu.database / max(1, self.moved) * 1e6


@dataclass(frozen=True)
class Wrk:
    ops: int
    errors: int
    empty: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.ops / self.seconds


def wrk(
    server: Server,
    script: str,
    args: list[str],
    *,
    connections: int,
    seconds: float,
    threads: int | None = None,
) -> Wrk:
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    command = [
        binary,
        f"-t{threads or connections}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(BENCH / script),
        server.base,
        "--",
        *args,
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    match = _RESULT.search(output)
    if match is None:
        raise RuntimeError(f"wrk printed no result: {output}")
    ops, errors, empty, elapsed = match.groups()
    return Wrk(int(ops), int(errors), int(empty), float(elapsed))


async def _json(session: aiohttp.ClientSession, url: str) -> dict[str, object]:
    async with session.get(url) as response:
        result: dict[str, object] = await response.json(content_type=None)
        return result


def _stats(server: Server, path: str) -> dict[str, object]:
    async def fetch() -> dict[str, object]:
        async with server.session() as session:
            return await _json(session, f"{server.base}{path}")

    return asyncio.run(fetch())


def channel_stats(server: Server, channel: str) -> tuple[int, int]:
    stats = _stats(server, f"/channels/{channel}/stats")
    return int(str(stats["ready"])), int(str(stats["hidden"]))


def _names(prefix: str, channels: int) -> list[str]:
    return [prefix] if channels <= 1 else [f"{prefix}{i}" for i in range(channels)]


async def _fill(server: Server, names: list[str], count: int, query: str) -> None:
    body = b"x" * 256
    numbers = iter(range(count))
    async with server.session(connector=aiohttp.TCPConnector(limit=32)) as session:

        async def worker() -> None:
            for number in numbers:
                url = f"{server.base}/channels/{names[number % len(names)]}{query}"
                async with session.post(url, data=body, headers=HEADERS) as response:
                    _require(response.status == 202, f"fill: {response.status}")

        await asyncio.gather(*(worker() for _ in range(32)))


def fill(server: Server, prefix: str, channels: int, count: int, query: str = "") -> None:
    """Queue ``count`` messages over ``channels`` channels (set-up, not measured)."""
    asyncio.run(_fill(server, _names(prefix, channels), count, query))


async def _claim(server: Server, channel: str, count: int) -> None:
    numbers = iter(range(count))
    async with server.session(connector=aiohttp.TCPConnector(limit=32)) as session:

        async def worker() -> None:
            for _ in numbers:
                async with session.get(f"{server.base}/channels/{channel}?nowait") as response:
                    await response.read()
                    _require(response.status == 200, f"claim: {response.status}")

        await asyncio.gather(*(worker() for _ in range(32)))


def claim(server: Server, channel: str, count: int) -> None:
    """Deliver ``count`` messages of ``channel`` and leave them hidden (set-up)."""
    asyncio.run(_claim(server, channel, count))


async def _drain(server: Server, names: list[str]) -> int:
    seen: set[int] = set()
    async with server.session(connector=aiohttp.TCPConnector(limit=32)) as session:

        async def worker(name: str) -> None:
            while True:
                async with session.get(f"{server.base}/channels/{name}?nowait") as response:
                    await response.read()
                    if response.status == 204:
                        return
                    message_id = int(response.headers["x-linger-msg-id"])
                _require(message_id not in seen, f"message {message_id} delivered twice")
                seen.add(message_id)
                async with session.delete(f"{server.base}/messages/{message_id}") as deleted:
                    _require(deleted.status == 204, f"drain delete: {deleted.status}")

        await asyncio.gather(*(worker(names[i % len(names)]) for i in range(max(16, len(names)))))
    return len(seen)


def drain(server: Server, prefix: str, channels: int = 1) -> int:
    """Consume everything left in the channels (verification, not measured); return how
    many messages that was."""
    return asyncio.run(_drain(server, _names(prefix, channels)))


def _require(condition: bool, text: str) -> None:
    if not condition:
        raise Failed(text)


# wrk stops with requests in flight: their effects may land without being counted.
IN_FLIGHT = 16


def _accounted(
    what: str,
    acknowledged: int,
    consumed: int,
    server: Server,
    channels: list[str],
    copies: int = 1,
) -> None:
    """Every acknowledged message was deleted or is still queued (ready, or hidden by a
    request that wrk's stop cut off), and no more than that: nothing lost, nothing
    doubled. The deletes are the server's count (``msg-delete`` of its stats, which the
    original keeps too, but shows only once it is not 0): a DELETE that wrk's stop cut
    off may have landed without wrk counting it. Then the channels are emptied for the
    next run."""
    queued = sum(sum(channel_stats(server, name)) for name in channels)
    deleted = int(str(_stats(server, "/stats").get("msg-delete", 0)))
    _require(
        consumed <= deleted <= consumed + IN_FLIGHT
        and acknowledged <= deleted + queued <= acknowledged + IN_FLIGHT * copies,
        f"{what}: {acknowledged} acknowledged, {consumed} consumed ({deleted} deleted), "
        f"{queued} queued",
    )
    asyncio.run(_empty(server, channels))


async def _empty(server: Server, channels: list[str]) -> None:
    async with server.session() as session:
        for name in channels:
            async with session.delete(f"{server.base}/channels/{name}") as response:
                _require(response.status == 204, f"drain {name}: {response.status}")


def produce(server: Server, size: Size) -> Run:
    """Messages added per second by 16 connections."""
    with server.metered() as cpu:
        result = wrk(
            server, "produce.lua", ["produce", "1"], connections=16, threads=4, seconds=size.seconds
        )
    _require(result.errors == 0, f"produce: {result.errors} errors")
    _accounted("produce", result.ops, 0, server, ["produce"])
    return Run(result.rate, result.ops, cpu)


def consume(server: Server, size: Size) -> Run:
    """Messages got (?nowait) and deleted per second from a prefilled channel."""
    produced = wrk(
        server,
        "produce.lua",
        ["consume", "1"],
        connections=16,
        threads=4,
        seconds=size.seconds * 1.5,
    )
    _require(produced.errors == 0, f"consume: {produced.errors} errors while filling")
    with server.metered() as cpu:
        result = wrk(server, "consume.lua", ["consume", "1"], connections=16, seconds=size.seconds)
    _require(result.errors == 0, f"consume: {result.errors} errors")
    _require(result.empty == 0, "consume: the channel ran dry, the figure would be low")
    _accounted("consume", produced.ops, result.ops, server, ["consume"])
    return Run(result.rate, result.ops, cpu)


def _cycle(server: Server, size: Size, channel: str, connections: int = 16) -> Run:
    """The cycle on ``channel`` for ``size.seconds``; each cycle moves one message."""
    token = server.headers.get("Authorization", "").removeprefix("Bearer ")
    with server.metered() as cpu:
        args = [channel, token] if token else [channel]
        result = wrk(server, "cycle.lua", args, connections=connections, seconds=size.seconds)
    _require(result.errors == 0, f"cycle: {result.errors} errors")
    return Run(result.rate, result.ops, cpu)


def cycle(server: Server, size: Size, connections: int = 16) -> Run:
    """Full cycles (POST, GET ?nowait, DELETE) per second by 16 connections (or
    ``connections``: one is a lightly loaded server, each request waiting for the last)."""
    result = _cycle(server, size, "cycle", connections)
    # wrk stops connections mid-cycle: their last acknowledged messages are still queued.
    leftover = drain(server, "cycle")
    _require(leftover <= IN_FLIGHT, f"cycle: {leftover} messages left behind")
    return result


def depth(server: Server, size: Size) -> Run:
    """The cycle with messages queued in 100 other channels and in the same channel."""
    fill(server, "other", 100, size.depth_other)
    fill(server, "deep", 1, size.depth_same)
    result = _cycle(server, size, "deep")
    ready, hidden = channel_stats(server, "deep")
    _require(
        hidden <= IN_FLIGHT and size.depth_same <= ready <= size.depth_same + IN_FLIGHT,
        f"depth: {ready} ready and {hidden} hidden left",
    )
    asyncio.run(_empty(server, ["deep", *_names("other", 100)]))  # durable backends persist
    return result


def inflight(server: Server, size: Size) -> Run:
    """The cycle on a channel that holds many ready messages and, at its head, many
    delivered ones in flight (hidden for an hour): a claim must not pay for them."""
    fill(server, "inflight", 1, size.inflight_hidden, "?timeout=3600")
    claim(server, "inflight", size.inflight_hidden)
    fill(server, "inflight", 1, size.inflight_ready)
    result = _cycle(server, size, "inflight")
    ready, hidden = channel_stats(server, "inflight")
    _require(
        size.inflight_hidden <= hidden <= size.inflight_hidden + IN_FLIGHT
        and size.inflight_ready - IN_FLIGHT <= ready <= size.inflight_ready + IN_FLIGHT,
        f"inflight: {ready} ready and {hidden} hidden left",
    )
    asyncio.run(_empty(server, ["inflight"]))  # durable backends persist
    return result


def pubsub(server: Server, size: Size, subscribers: int) -> Run:
    """Copies delivered per second: publishes to a topic with ``subscribers`` channels,
    consumers draining them at the same time; every copy is consumed before it counts."""
    topic = f"t{subscribers}"
    prefix = f"s{subscribers}-"

    async def subscribe() -> None:
        async with server.session() as session:
            for i in range(subscribers):
                async with session.put(
                    f"{server.base}/channels/{prefix}{i}/topics/{topic}"
                ) as response:
                    _require(response.status == 204, f"subscribe: {response.status}")

    asyncio.run(subscribe())
    with server.metered() as cpu:
        published, stdout = _publish_while_consuming(server, size, topic, prefix, subscribers)
    during = _RESULT.search(stdout)
    _require(
        published.errors == 0 and during is not None and during.group(2) == "0",
        f"pub-sub: errors (publish {published.errors}, consume {stdout[-300:]})",
    )
    consumed = int(during.group(1)) if during else 0
    copies = published.ops * subscribers
    _accounted("pub-sub", copies, consumed, server, _names(prefix, subscribers), subscribers)
    return Run(copies / published.seconds, copies, cpu)


def _publish_while_consuming(
    server: Server, size: Size, topic: str, prefix: str, subscribers: int
) -> tuple[Wrk, str]:
    consumers = subprocess.Popen(
        [
            "wrk",
            "-t8",
            "-c8",
            f"-d{max(1, round(size.seconds))}s",
            "-s",
            str(BENCH / "consume.lua"),
            server.base,
            "--",
            prefix,
            str(subscribers),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    published = wrk(server, "publish.lua", [topic], connections=8, threads=4, seconds=size.seconds)
    stdout, _ = consumers.communicate()
    return published, stdout


@dataclass(frozen=True)
class LongPoll:
    p50_ms: float
    p99_ms: float
    rss_mb: float


async def _longpoll(server: Server, size: Size, waiters_stat: bool) -> LongPoll:
    channels = 100
    received: dict[int, float] = {}
    duplicates: list[int] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with server.session(connector=connector, timeout=timeout) as session:

        async def wait(i: int) -> None:
            async with session.get(f"{server.base}/channels/lp{i % channels}") as response:
                body = await response.read()
                if response.status == 200:
                    number = int(body.split(b" ")[0])
                    if number in received:
                        duplicates.append(number)
                    received[number] = time.perf_counter()

        tasks = [asyncio.create_task(wait(i)) for i in range(size.waiters)]
        deadline = time.monotonic() + 120
        while True:  # every consumer connected and waiting
            await asyncio.sleep(0.5)
            if waiters_stat:
                stats = await _json(session, f"{server.base}/stats")
                if int(str(stats["current-waiters"])) >= size.waiters:
                    break
            elif all(not task.done() for task in tasks) and time.monotonic() > deadline - 110:
                break
            _require(time.monotonic() < deadline, "long-poll: consumers never all waited")
        rss = server.rss_mb()
        sent: dict[int, float] = {}
        for number in range(size.longpoll_messages):
            body = f"{number} ".encode().ljust(256, b"x")
            sent[number] = time.perf_counter()
            async with session.post(
                # A long timeout: no delivery comes back to another waiter during the run.
                f"{server.base}/channels/lp{number % channels}?timeout=3600",
                data=body,
                headers=HEADERS,
            ) as response:
                _require(response.status == 202, f"long-poll add: {response.status}")
            await asyncio.sleep(0.005)
        # The last messages are on their way; every consumer that got one has finished.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_all_received(received, size.longpoll_messages), 30)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    _require(not duplicates, f"long-poll: {len(duplicates)} messages delivered twice")
    _require(
        len(received) == size.longpoll_messages,
        f"long-poll: {size.longpoll_messages} sent, {len(received)} received",
    )
    latencies = sorted((received[n] - sent[n]) * 1000 for n in sent)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return LongPoll(statistics.median(latencies), p99, rss)


async def _all_received(received: dict[int, float], count: int) -> None:
    while len(received) < count:  # noqa: ASYNC110 - filled by other tasks' callbacks
        await asyncio.sleep(0.05)


def longpoll(server: Server, size: Size, *, waiters_stat: bool = True) -> LongPoll:
    """POST to consumer latency with ``size.waiters`` consumers waiting in one process."""
    return asyncio.run(_longpoll(server, size, waiters_stat))


# The batch scenarios: batches of 100 messages of 256 bytes, 16 connections.
BATCH_SIZE = 100
_JSON = {"Content-Type": "application/json"}


@dataclass
class _Batches:
    produced: list[int]
    received: list[int]
    deleted: list[int]
    in_window: int = 0


async def _batch_run(server: Server, size: Size, channel: str, consumers: int) -> _Batches:
    """16 connections for ``size.seconds``: producers add batches, ``consumers`` receive
    batches (long-poll) and delete them by lease. Then everything left is consumed, and
    every message produced must have been received and deleted exactly once."""
    payload = json.dumps([{"body": "x" * 256}] * BATCH_SIZE).encode()
    add_url = f"{server.base}/channels/{channel}/messages"
    receive_url = f"{add_url}?n={BATCH_SIZE}&wait=1"
    seen = _Batches([], [], [])
    loop = asyncio.get_running_loop()
    stop = loop.time() + size.seconds
    producing = True
    connector = aiohttp.TCPConnector(limit=0)
    async with server.session(connector=connector) as session:

        async def producer() -> None:
            while loop.time() < stop:
                async with session.post(add_url, data=payload, headers=_JSON) as response:
                    _require(response.status == 202, f"batch add: {response.status}")
                    seen.produced.extend((await response.json())["ids"])

        async def consumer() -> None:
            while producing or len(seen.deleted) < len(seen.produced):
                async with session.get(receive_url) as response:
                    _require(response.status == 200, f"batch receive: {response.status}")
                    got = (await response.json())["messages"]
                if not got:
                    continue
                seen.received.extend(m["id"] for m in got)
                body = json.dumps({"leases": [m["lease"] for m in got]})
                url = f"{server.base}/messages/delete"
                async with session.post(url, data=body, headers=_JSON) as response:
                    _require(response.status == 200, f"batch delete: {response.status}")
                    answer = await response.json()
                _require(len(answer["done"]) == len(got), f"batch delete: {answer}")
                seen.deleted.extend(answer["done"])
                if loop.time() < stop:
                    seen.in_window += len(got)

        tasks = [asyncio.create_task(consumer()) for _ in range(consumers)]
        await asyncio.gather(*(producer() for _ in range(16 - consumers)))
        producing = False
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
        except TimeoutError:
            raise Failed(
                f"{channel}: {len(seen.produced) - len(seen.deleted)} never came"
            ) from None
    return seen


def _exactly_once(what: str, seen: _Batches, server: Server, channel: str) -> None:
    produced = set(seen.produced)
    _require(len(produced) == len(seen.produced), f"{what}: an id was given twice")
    _require(len(seen.received) == len(set(seen.received)), f"{what}: a message came twice")
    _require(
        set(seen.received) == produced, f"{what}: received {len(seen.received)} of {len(produced)}"
    )
    _require(sorted(seen.deleted) == sorted(produced), f"{what}: deleted {len(seen.deleted)}")
    _require(channel_stats(server, channel) == (0, 0), f"{what}: messages left behind")


def batch(server: Server, size: Size) -> Run:
    """Messages added, received and deleted per second, in batches of 100: 8 producer and
    8 consumer connections; each message exactly once."""
    with server.metered() as cpu:  # every message's, those received after the window too
        seen = asyncio.run(_batch_run(server, size, "batch", consumers=8))
    _exactly_once("batch", seen, server, "batch")
    return Run(seen.in_window / size.seconds, len(seen.deleted), cpu)


def batch_produce(server: Server, size: Size) -> Run:
    """Messages added per second in batches of 100 by 16 connections."""
    with server.metered() as cpu:
        seen = asyncio.run(_batch_run(server, size, "batch-produce", consumers=0))
    queued = channel_stats(server, "batch-produce")
    _require(queued == (len(seen.produced), 0), f"batch-produce: {queued} queued")
    asyncio.run(_empty(server, ["batch-produce"]))
    return Run(len(seen.produced) / size.seconds, len(seen.produced), cpu)
