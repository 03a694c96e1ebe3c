"""Small helpers shared by the HTTP tests."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient
from yarl import URL

Client = TestClient[Any, Any]


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
