"""Load generators: each runs a bounded number of seconds against one base URL and checks
what it measured (every acknowledged message consumed once, no errors)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp

BODY = b"x" * 256
HEADERS = {"Content-Type": "text/plain"}


@dataclass
class Result:
    operations: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.operations / self.seconds if self.seconds else 0.0


async def cycle(
    base: str, *, clients: int = 16, seconds: float = 10.0, channel: str = "bench"
) -> Result:
    """Each client adds a message, gets one with ?nowait and deletes it, in a loop; the
    figure is completed cycles per second."""
    result = Result()
    added: set[int] = set()
    deleted: set[int] = set()
    stop = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            while time.monotonic() < stop:
                async with session.post(
                    f"{base}/channels/{channel}", data=BODY, headers=HEADERS
                ) as response:
                    if response.status != 202:
                        result.errors.append(f"add {response.status}")
                        continue
                    added.add((await response.json())["id"])
                async with session.get(f"{base}/channels/{channel}?nowait") as response:
                    await response.read()
                    if response.status != 200:
                        result.errors.append(f"get {response.status}")
                        continue
                    message_id = int(response.headers["x-linger-msg-id"])
                if message_id in deleted:
                    result.errors.append(f"message {message_id} delivered after delete")
                async with session.delete(f"{base}/messages/{message_id}") as response:
                    if response.status != 204:
                        result.errors.append(f"delete {response.status}")
                        continue
                deleted.add(message_id)
                result.operations += 1

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        result.seconds = time.monotonic() - started
    if added - deleted:
        result.errors.append(f"{len(added - deleted)} acknowledged messages not consumed")
    return result


async def prefill(
    base: str, *, messages: int, channels: int, prefix: str = "other", clients: int = 32
) -> None:
    """Queue ``messages`` messages spread over ``channels`` channels."""
    connector = aiohttp.TCPConnector(limit=clients)
    counter = iter(range(messages))
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            for i in counter:
                url = f"{base}/channels/{prefix}{i % channels}"
                async with session.post(url, data=BODY, headers=HEADERS) as response:
                    if response.status != 202:
                        raise RuntimeError(f"prefill add: {response.status}")

        await asyncio.gather(*(client() for _ in range(clients)))
