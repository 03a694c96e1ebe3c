"""Crash safety: producers and consumers against a real server that is SIGKILLed at random
moments and restarted. Nothing acknowledged may be lost, nothing deleted may come back and
no id may be given to two messages.

The CI run kills each backend's server a few times; set LINGER_TEST_CRASH_KILLS (e.g. 25) for
the full run: ``LINGER_TEST_CRASH_KILLS=25 pytest -m crash -s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from dataclasses import dataclass, field

import aiohttp
import pytest

from .processes import Server, start_server

KILLS = int(os.environ.get("LINGER_TEST_CRASH_KILLS", "4"))
TIMEOUT = 1  # visibility timeout of every message: hidden ones come back quickly
pytestmark = pytest.mark.crash


@dataclass
class Ledger:
    """What the clients were told."""

    acknowledged: dict[int, bytes] = field(default_factory=dict)  # id -> body, on 202
    delivered: dict[int, bytes] = field(default_factory=dict)  # id -> body, on 200
    deleted_at: dict[int, float] = field(default_factory=dict)  # id -> time of its 204
    delivered_after_delete: list[int] = field(default_factory=list)
    id_reused: list[int] = field(default_factory=list)
    sequence: int = 0

    def received(self, message_id: int, body: bytes, asked_at: float) -> None:
        """A delivery for a GET sent at ``asked_at``: after its deletion was confirmed,
        the message must be gone."""
        if self.deleted_at.get(message_id, asked_at) < asked_at:
            self.delivered_after_delete.append(message_id)
        self.remember(self.delivered, message_id, body)

    def remember(self, table: dict[int, bytes], message_id: int, body: bytes) -> None:
        for known in (self.acknowledged, self.delivered):
            if known.get(message_id, body) != body:
                self.id_reused.append(message_id)
        table[message_id] = body


async def _produce(session: aiohttp.ClientSession, server: Server, ledger: Ledger) -> None:
    while True:
        ledger.sequence += 1
        body = f"message {ledger.sequence}".encode()
        async with session.post(
            f"{server.base}/channels/crash?timeout={TIMEOUT}",
            data=body,
            headers={"Content-Type": "text/plain"},
        ) as response:
            if response.status == 202:
                ledger.remember(ledger.acknowledged, (await response.json())["id"], body)


async def _consume(
    session: aiohttp.ClientSession, server: Server, ledger: Ledger, *, delete: bool = True
) -> None:
    while True:
        started = time.monotonic()
        async with session.get(f"{server.base}/channels/crash?nowait") as response:
            body = await response.read()
            if response.status != 200:
                await asyncio.sleep(0.01)
                continue
            message_id = int(response.headers["x-linger-msg-id"])
        ledger.received(message_id, body, started)
        if delete and random.random() < 0.8:  # some deliveries are "lost" by the consumer
            async with session.delete(f"{server.base}/messages/{message_id}") as deleted:
                if deleted.status == 204:
                    ledger.deleted_at[message_id] = time.monotonic()


async def _round(
    server: Server, ledger: Ledger, seconds: float, signum: int = signal.SIGKILL
) -> tuple[int, float]:
    """Load the server until ``signum`` stops it after ``seconds``; return its exit code
    and how long it took to exit."""
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(_produce(session, server, ledger)) for _ in range(4)]
        tasks += [asyncio.create_task(_consume(session, server, ledger)) for _ in range(4)]
        await asyncio.sleep(seconds)
        stopping = time.monotonic()
        server.signal(signum)
        code = await asyncio.to_thread(server.wait, 10)
        took = time.monotonic() - stopping
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError, OSError):
                await task
    return code, took


async def _drain(server: Server, ledger: Ledger) -> None:
    """Consume everything that is left, hidden messages included once they come back."""
    async with aiohttp.ClientSession() as session:

        async def consumer() -> None:
            while True:
                started = time.monotonic()
                async with session.get(f"{server.base}/channels/crash?nowait") as response:
                    body = await response.read()
                    if response.status == 204:
                        return
                    message_id = int(response.headers["x-linger-msg-id"])
                ledger.received(message_id, body, started)
                async with session.delete(f"{server.base}/messages/{message_id}") as deleted:
                    if deleted.status == 204:
                        ledger.deleted_at[message_id] = time.monotonic()

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            await asyncio.gather(*(consumer() for _ in range(8)))
            async with session.get(f"{server.base}/channels/crash/stats") as response:
                if await response.json() == {"ready": 0, "hidden": 0}:
                    return
            await asyncio.sleep(TIMEOUT / 4)  # hidden ones come back after their timeout
        pytest.fail("the channel did not drain")


async def test_sigkill_loses_nothing_acknowledged(
    servers: list[Server], server_args: list[str]
) -> None:
    ledger = Ledger()
    rng = random.Random(os.environ.get("LINGER_TEST_CRASH_SEED", "linger"))
    for _ in range(KILLS):
        server = await start_server(servers, *server_args)
        await _round(server, ledger, rng.uniform(0.2, 0.8))
    final = await start_server(servers, *server_args)
    await _drain(final, ledger)
    lost = set(ledger.acknowledged) - set(ledger.delivered)
    print(
        f"\ncrash test: {KILLS} kills, {len(ledger.acknowledged)} acknowledged, "
        f"{len(ledger.delivered)} delivered, {len(lost)} lost, "
        f"{len(ledger.delivered_after_delete)} delivered after deletion, "
        f"{len(ledger.id_reused)} ids reused"
    )
    assert len(ledger.acknowledged) > KILLS * 10, "the load was too light to mean anything"
    assert not lost
    assert not ledger.delivered_after_delete
    assert not ledger.id_reused


async def test_sigterm_under_load_exits_zero_and_loses_nothing(
    servers: list[Server], server_args: list[str]
) -> None:
    ledger = Ledger()
    server = await start_server(servers, *server_args)
    async with aiohttp.ClientSession() as session:
        waiting = [
            asyncio.create_task(session.get(f"{server.base}/channels/idle{i}")) for i in range(8)
        ]
        await server.until_waiting(session, 8)
        code, took = await _round(server, ledger, 1.0, signal.SIGTERM)
        answers = await asyncio.gather(*waiting, return_exceptions=True)
    assert code == 0
    assert took < 5
    assert [getattr(a, "status", a) for a in answers] == [204] * 8
    final = await start_server(servers, *server_args)
    await _drain(final, ledger)
    assert ledger.acknowledged
    assert not set(ledger.acknowledged) - set(ledger.delivered)
    assert not ledger.delivered_after_delete
