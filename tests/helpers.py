"""Small helpers shared by the HTTP tests."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncConnection
from yarl import URL

from linger.http.keys import BROKER

Client = TestClient[Any, Any]


@contextlib.asynccontextmanager
async def connection(client: Client) -> AsyncIterator[AsyncConnection]:
    """One of the app's own database connections, in a transaction committed at the end
    (the driver keeps its connections: the engine's pool may have none to spare)."""
    async with client.app[BROKER].storage.driver.connection() as conn:
        yield conn


def raw(path: str) -> URL:
    """A path sent exactly as written (no re-encoding by the client)."""
    return URL(path, encoded=True)


async def add(client: Client, channel: str, body: bytes | str = b"hello", **options: Any) -> int:
    """Add a raw text message and return its id."""
    data = body.encode() if isinstance(body, str) else body
    response = await client.post(
        raw(f"/channels/{channel}"),
        data=data,
        params={k: str(v) for k, v in options.items()},
        headers={"Content-Type": "text/plain"},
    )
    assert response.status == 202, await response.text()
    return int((await response.json())["id"])


async def get(client: Client, channel: str, *, wait: bool = False) -> Any:
    """GET a message (``nowait`` unless ``wait``); returns the response, body read."""
    response = await client.get(raw(f"/channels/{channel}"), params={} if wait else {"nowait": ""})
    await response.read()
    return response


async def stats(client: Client, channel: str) -> dict[str, int]:
    response = await client.get(raw(f"/channels/{channel}/stats"))
    assert response.status == 200
    result: dict[str, int] = await response.json()
    return result


async def server_stats(client: Client) -> dict[str, Any]:
    response = await client.get("/stats")
    assert response.status == 200
    result: dict[str, Any] = await response.json()
    return result


async def error(response: Any, status: int, text: str | None = None) -> None:
    """Assert an error response: status, JSON body and the text as reason phrase."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    if text is not None:
        assert body == {"error": text}
        assert response.reason == text


class Probe:
    """Another client's requests during an attack: ``worst`` is the slowest answer (s).

    While it runs, the objects the test session has piled up are frozen out of the
    garbage collector: a full collection of a whole suite's heap is a pause of the test
    process (server and probe alike) that no Linger process would have."""

    def __init__(self, client: Client, path: str = "/") -> None:
        self.client = client
        self.path = path
        self.worst = 0.0
        self.answered = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            response = await self.client.get(self.path)
            await response.read()
            assert response.status == 200, response.status
            self.worst = max(self.worst, time.monotonic() - started)
            self.answered += 1
            await asyncio.sleep(0.005)

    async def __aenter__(self) -> Probe:
        gc.collect()
        gc.freeze()
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *_: object) -> None:
        gc.unfreeze()
        assert self._task is not None
        if self._task.done():
            self._task.result()  # the probe's own failure, if any
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        assert self.answered > 0


async def raw_request(client: Client, data: bytes, *, close: bool = False) -> bytes:
    """Send ``data`` on a connection of its own and return everything the server sent
    back until it closed (or 5 s passed)."""
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(data)
        await writer.drain()
        if close:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def json_body_of(raw: bytes) -> Any:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])
