"""Channel names in paths: allowed characters, decoding, limits and headers."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from .helpers import Client, add, error, get, raw


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("a.b~c", "a.b~c"),
        ("a%20b", "a b"),
        ("a%2Fb", "a/b"),
        ("a%2Bb", "a+b"),
        ("A-z_0", "A-z_0"),
        ("%25", "%"),
        ("x" * 250, "x" * 250),
    ],
)
async def test_name_is_percent_decoded(client: Client, path: str, name: str) -> None:
    await add(client, path, "m")
    response = await get(client, path)
    assert response.status == 200
    assert response.headers["x-linger-channel"] == name
    assert name in (await (await client.get("/channels")).json())["channels"]


async def test_non_ascii_name_is_percent_encoded_in_headers(client: Client) -> None:
    await add(client, "%C3%A9t%C3%A9", "m")
    response = await get(client, "%C3%A9t%C3%A9")
    assert response.status == 200
    assert response.headers["x-linger-channel"] == "%C3%A9t%C3%A9"
    assert (await (await client.get("/channels")).json())["channels"] == ["été"]
    empty = await get(client, "%C3%A9t%C3%A9")
    assert empty.headers["x-linger-channel"] == "%C3%A9t%C3%A9"


async def test_hlm_error_with_non_ascii_name(make_client) -> None:  # type: ignore[no-untyped-def]
    client = await make_client(hlm=1)
    await add(client, "%C3%A9", "m")
    response = await client.post(
        raw("/channels/%C3%A9"), data=b"m", headers={"Content-Type": "text/plain"}
    )
    assert response.status == 507
    assert (await response.json()) == {
        "error": "Channel é is at the high-level mark with 1 messages"
    }


@pytest.mark.parametrize("path", ["%01x", "a%0Ab", "%7F", "x" * 251, "%C2%85", "%FF", "%C3"])
async def test_bad_name_is_400(client: Client, path: str) -> None:
    for method in ("GET", "POST", "DELETE"):
        response = await client.request(
            method, raw(f"/channels/{path}"), data=b"m", headers={"Content-Type": "text/plain"}
        )
        await error(response, 400, "Invalid channel name.")
    await error(await client.get(raw(f"/channels/{path}/stats")), 400)
    await error(await client.post(raw(f"/topics/{path}"), data=b"m"), 400, "Invalid topic name.")


@pytest.mark.parametrize(
    "path", ["a+b", "a'b", "a*b", "a!b", "a,b", "a:b", "a@b", "a(b)", "a//b", "a;b", "a$b"]
)
async def test_literal_characters_outside_the_set_do_not_match(client: Client, path: str) -> None:
    await error(
        await client.post(
            raw(f"/channels/{path}"), data=b"m", headers={"Content-Type": "text/plain"}
        ),
        404,
    )


def _request_line(port: int, path: str) -> tuple[str, bytes]:
    """Send ``path`` byte for byte (clients normalise dot segments) and read the reply."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body


async def test_dot_segments_are_names_not_traversal(client: Client) -> None:
    await add(client, "%2E%2E", "dots")
    assert client.port is not None
    status, body = await asyncio.to_thread(_request_line, client.port, "/channels/../stats")
    assert status == "HTTP/1.1 200 OK"
    assert json.loads(body) == {"ready": 1, "hidden": 0}
    status, _ = await asyncio.to_thread(_request_line, client.port, "/channels/a/../b")
    assert status.startswith("HTTP/1.1 404")


async def test_percent_name_is_literal(client: Client) -> None:
    await add(client, "%", "m")
    await add(client, "%zz", "m")
    assert (await (await client.get("/channels")).json())["channels"] == ["%", "%zz"]
