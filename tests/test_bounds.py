"""Hostile requests get a prompt 4xx and hold nobody else up: huge forms, compressed and
trickled bodies, unfinished heads, too many connections, Expect, closed connections."""

from __future__ import annotations

import asyncio
import gzip
import io
import zlib

import pytest
import sqlalchemy as sa

from linger.http.bodies import MAX_FORM_FIELDS, MAX_PREAMBLE
from linger.http.keys import BROKER
from linger.store.db import subscriptions

from .conftest import ClientFactory
from .helpers import (
    Client,
    Probe,
    add,
    connection,
    error,
    get,
    json_body_of,
    raw_request,
    stats,
    status_of,
)


def _multipart(parts: int, boundary: str = "b0undary") -> bytes:
    part = f"--{boundary}\r\nContent-Disposition: form-data; name=x\r\n\r\n\r\n".encode()
    return part * parts + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("parts", [1_000, 16_382])
async def test_form_of_thousands_of_empty_parts_is_refused_at_once(
    client: Client, parts: int
) -> None:
    async with Probe(client) as probe:
        response = await client.post(
            "/channels/c",
            data=io.BytesIO(_multipart(parts)),
            headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
        )
    if parts < MAX_FORM_FIELDS * 20:
        await error(response, 400, "Too many form fields.")
    else:  # also more bytes than a form may have
        assert response.status in (400, 413)
    assert probe.worst < 0.25, probe.worst
    assert (await stats(client, "c"))["ready"] == 0


async def test_chunked_multipart_counts_every_byte(client: Client) -> None:
    """Boundaries and part headers count against the limit, also without a length."""

    async def chunks() -> object:
        for _ in range(20):  # about 5 MB of part headers, no part body at all
            yield (
                b"--b0undary\r\nContent-Disposition: form-data; name=x\r\nX-Pad: "
                + b"p" * 250_000
                + b"\r\n\r\n\r\n"
            )

    async with Probe(client) as probe:
        response = await client.post(
            "/channels/c",
            data=chunks(),
            headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
        )
    assert response.status in (400, 413), await response.text()
    assert "error" in await response.json()
    assert probe.worst < 0.25, probe.worst


_FORM = b"--b0undary\r\nContent-Disposition: form-data; name=msg\r\n\r\nhi\r\n--b0undary--\r\n"
_MULTIPART = {"Content-Type": "multipart/form-data; boundary=b0undary"}
_PREAMBLE_TOO_LONG = f"Invalid form data: more than {MAX_PREAMBLE} bytes before the first boundary."


async def test_multipart_preamble_is_bounded(client: Client) -> None:
    """Lines before the first boundary (which aiohttp's reader skips one by one) count
    too: a long preamble within the form's length is refused at once."""
    async with Probe(client) as probe:
        response = await client.post(
            "/channels/c", data=b"\n" * 800_000 + _FORM, headers=_MULTIPART
        )
        await error(response, 400, _PREAMBLE_TOO_LONG)
        long_line = await client.post(
            "/channels/c", data=b"p" * 800_000 + b"\r\n" + _FORM, headers=_MULTIPART
        )
        await error(long_line, 400, _PREAMBLE_TOO_LONG)
    assert probe.worst < 0.25, probe.worst
    assert (await stats(client, "c"))["ready"] == 0
    for preamble in (b"", b"\r\n", b"a preamble\r\n" * (MAX_PREAMBLE // 12)):
        response = await client.post("/channels/c", data=preamble + _FORM, headers=_MULTIPART)
        assert response.status == 202, await response.text()
    assert await (await get(client, "c")).read() == b"hi"
    for unfinished in (b"\n" * 100, b"\n" * 100 + b"--b0undaryX\r\n"):
        response = await client.post("/channels/c", data=unfinished, headers=_MULTIPART)
        await error(response, 400, "Invalid form data.")


async def test_chunked_multipart_preamble_is_bounded(client: Client) -> None:
    async def chunks() -> object:
        for _ in range(20):  # 5 MB of empty lines before the first boundary
            yield b"\n" * 250_000
        yield _FORM

    async with Probe(client) as probe:
        response = await client.post("/channels/c", data=chunks(), headers=_MULTIPART)
        await error(response, 400, _PREAMBLE_TOO_LONG)
    assert probe.worst < 0.25, probe.worst
    assert (await stats(client, "c"))["ready"] == 0


async def test_urlencoded_form_with_too_many_fields_is_400(client: Client) -> None:
    body = b"&".join(b"a" for _ in range(425_000))
    async with Probe(client) as probe:
        response = await client.post(
            "/channels/c",
            data=io.BytesIO(body),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert response.status in (400, 413)
    assert probe.worst < 0.25, probe.worst
    fields = "&".join(f"f{i}=1" for i in range(MAX_FORM_FIELDS)) + "&msg=m"
    response = await client.post(
        "/channels/c", data=fields, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    await error(response, 400, "Too many form fields.")


async def test_fully_escaped_form_message_is_decoded_off_the_loop(client: Client) -> None:
    body = b"msg=" + b"%41" * 262_144
    async with Probe(client) as probe:
        response = await client.post(
            "/channels/c",
            data=io.BytesIO(body),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert response.status == 202
    assert probe.worst < 0.25, probe.worst
    assert await (await get(client, "c")).read() == b"A" * 262_144


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("br", lambda data: data[:1000])],
)
async def test_compressed_body_is_415_without_inflating_it(
    client: Client, encoding: str, compress: object
) -> None:
    assert callable(compress)
    bomb = compress(b"\0" * 50_000_000)  # inflates to 50 MB
    async with Probe(client) as probe:
        response = await client.post(
            "/channels/c",
            data=io.BytesIO(bomb),
            headers={"Content-Type": "text/plain", "Content-Encoding": encoding},
        )
    await error(response, 415, "Unsupported content encoding: send the body uncompressed.")
    assert probe.worst < 0.25, probe.worst
    assert (await stats(client, "c"))["ready"] == 0
    response = await client.post(
        "/channels/c",
        data=b"plain",
        headers={"Content-Type": "t/p", "Content-Encoding": "identity"},
    )
    assert response.status == 202


async def test_unfinished_request_head_is_408(make_client: ClientFactory) -> None:
    client = await make_client(header_timeout=0.3)
    answer = await raw_request(client, b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Slow: a")
    assert status_of(answer) == 408
    assert json_body_of(answer) == {"error": "Request head not received in time."}
    assert (await client.get("/stats")).status == 200


async def test_trickled_body_is_408_and_closed(make_client: ClientFactory) -> None:
    client = await make_client(body_timeout=0.3)
    answer = await raw_request(
        client,
        b"POST /channels/c HTTP/1.1\r\nHost: x\r\nContent-Type: t/p\r\n"
        b"Content-Length: 100\r\n\r\nonly ten b",
    )
    assert status_of(answer) == 408
    assert json_body_of(answer) == {"error": "Request body not received in time."}
    assert b"Connection: close" in answer
    assert (await stats(client, "c"))["ready"] == 0


async def test_connections_beyond_the_cap_get_503(make_client: ClientFactory) -> None:
    client = await make_client(max_connections=4)
    assert client.port is not None
    held = [await asyncio.open_connection("127.0.0.1", client.port) for _ in range(4)]
    try:
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await writer.wait_closed()
        assert status_of(answer) == 503
        assert json_body_of(answer) == {"error": "Too many connections, try again later."}
    finally:
        for _reader, held_writer in held:
            held_writer.close()
            await held_writer.wait_closed()
    await asyncio.sleep(0.05)
    answer = await raw_request(client, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(answer) == 200


async def test_expect_continue_with_an_oversized_length_is_413_first(client: Client) -> None:
    answer = await raw_request(
        client,
        b"POST /channels/c HTTP/1.1\r\nHost: x\r\nContent-Type: t/p\r\n"
        b"Content-Length: 10000000\r\nExpect: 100-continue\r\n\r\n",
    )
    assert status_of(answer) == 413, answer
    assert b"100 Continue" not in answer
    assert "error" in json_body_of(answer)


async def test_expect_continue_within_the_limit_continues(client: Client) -> None:
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(
        b"POST /channels/c HTTP/1.1\r\nHost: x\r\nContent-Type: t/p\r\n"
        b"Content-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    assert b" 202 " in answer


async def test_query_message_with_invalid_utf8_is_400(client: Client) -> None:
    response = await client.post("/channels/c?msg=%FF%FE", skip_auto_headers=["Content-Type"])
    await error(response, 400, "Invalid UTF-8 in query string.")
    form = await client.post(
        "/channels/c",
        data=b"msg=%FF%FE",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    await error(form, 400, "Invalid UTF-8 in form data.")
    assert (await stats(client, "c"))["ready"] == 0


async def test_responses_name_linger_without_a_version(client: Client) -> None:
    for response in (await client.get("/"), await client.get("/nowhere")):
        assert response.headers["Server"] == "Linger"
        assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_a_delivered_page_cannot_run_as_one_of_linger(client: Client) -> None:
    """A body is a client's: one posted as text/html is delivered as such, sandboxed, so
    that a browser opening it (where the dashboard lives) runs none of its script."""
    posted = await client.post(
        "/channels/c", data=b"<script>alert(1)</script>", headers={"Content-Type": "text/html"}
    )
    assert posted.status == 202
    response = await client.get("/channels/c?nowait")
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.headers["Content-Security-Policy"] == "sandbox; default-src 'none'"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    ("method", "path", "text"),
    [
        ("POST", "/channels/c", "Unsupported expectation."),  # Linger's Expect handler
        ("DELETE", "/channels/c", "Expectation Failed"),  # aiohttp's default one
        ("POST", "/nowhere", "Expectation Failed"),  # no route
    ],
)
async def test_failed_expectations_are_json_from_linger(
    client: Client, method: str, path: str, text: str
) -> None:
    """Expect handlers run before the middlewares: their 417s too say ``Server: Linger``
    (no version) and are JSON errors naming their request."""
    response = await client.request(
        method, path, headers={"Expect": "foo", "X-Request-Id": "expecting"}
    )
    await error(response, 417, text)
    assert response.headers["Server"] == "Linger"
    assert response.headers["X-Request-Id"] == "expecting"
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nExpect: foo\r\nConnection: close\r\n\r\n"
    answer = await raw_request(client, head.encode())
    assert status_of(answer) == 417
    assert b"\r\nServer: Linger\r\n" in answer
    assert json_body_of(answer) == {"error": text}
    assert (await stats(client, "c"))["ready"] == 0


async def test_get_for_a_closed_connection_claims_nothing(client: Client) -> None:
    """A consumer whose connection is already gone when its GET is handled (nowait, or the
    first claim of a long-poll) must not hide a message for its whole timeout."""
    await add(client, "c", "kept")
    broker = client.app[BROKER]
    assert await broker.receive("c", 1, wait=0, alive=lambda: False) == []
    assert await broker.receive("c", 1, wait=1.0, alive=lambda: False) == []
    assert await stats(client, "c") == {"ready": 1, "hidden": 0}


_HUGE = "9" * 5000  # Python refuses to convert more than 4,300 digits to an int


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", f"/channels/c?priority={_HUGE}", b"m", 400),
        ("POST", f"/channels/c?timeout=-{_HUGE}", b"m", 400),
        ("POST", f"/channels/c?delay=000{_HUGE}", b"m", 400),
        ("GET", f"/channels/c?wait={_HUGE}", b"", 400),
        ("GET", f"/channels/c/messages?n={_HUGE}", b"", 400),
        ("GET", f"/channels/c/peek?n={_HUGE}", b"", 400),
        ("PUT", f"/channels/c/topics/t?priority={_HUGE}", b"", 400),
        ("DELETE", f"/messages/{_HUGE}", b"", 404),
        ("POST", f"/messages/1/touch?timeout={_HUGE}", b"", 400),
        ("POST", "/channels/c/messages", f'[{{"body": "m", "priority": {_HUGE}}}]', 400),
        ("POST", "/channels/c/messages", f'[{{"body": "m", "delay": "{_HUGE}"}}]', 400),
        ("POST", "/topics/t/messages", f'[{{"body": "m"}}, {_HUGE}]', 400),
        ("POST", "/messages/delete", f'{{"ids": [{_HUGE}]}}', 400),
    ],
)
@pytest.mark.memory
async def test_integers_of_any_length_are_refused_as_out_of_range(
    client: Client, method: str, path: str, body: str | bytes, status: int
) -> None:
    """An integer of thousands of digits anywhere (query, path, JSON item, JSON field,
    quoted or not) is out of range: a 4xx naming it, never converted (a 500 before)."""
    headers = {"Content-Type": "application/json" if "messages" in path else "text/plain"}
    async with Probe(client) as probe:
        response = await client.request(method, path, data=body or None, headers=headers)
        await error(response, status)
    assert probe.worst < 0.5, probe.worst
    assert (await stats(client, "c")) == {"ready": 0, "hidden": 0}


async def test_options_in_a_form_of_thousands_of_digits_are_refused(client: Client) -> None:
    response = await client.post("/channels/c", data={"msg": "m", "priority": _HUGE})
    await error(response, 400, "Invalid message priority.")


@pytest.mark.memory
async def test_many_listings_at_once_leave_writes_a_connection(client: Client) -> None:
    """40 clients asking at once for listings and scrapes that read 20,000 channels: they
    hold one connection at a time (the in-memory database has only one), so a producer's
    add, receive and delete are answered while they are still under way."""
    rows = [
        {"topic": "t", "channel": f"listed{i:05}", "priority": 0, "timeout": 30, "deliver": 0}
        | {"linger": 0, "delay": 0, "dead": None}
        for i in range(20_000)
    ]
    async with connection(client) as conn:
        await conn.execute(sa.insert(subscriptions), rows)
    done: list[str] = []

    async def read(path: str) -> None:
        response = await client.get(path)
        assert response.status == 200, await response.text()
        await response.read()
        done.append(path)

    async def write() -> None:
        await asyncio.sleep(0.02)
        await add(client, "producer", "m")
        got = await get(client, "producer")
        assert got.status == 200
        response = await client.delete(f"/messages/{got.headers['x-linger-msg-id']}")
        assert response.status == 204
        done.append("write")

    paths = ["/channels", "/metrics", "/stats", "/topics/t/channels"] * 10
    async with Probe(client, "/health") as probe:
        await asyncio.gather(*(read(path) for path in paths), write())
    assert probe.worst < 0.5, probe.worst
    assert done.index("write") < len(paths) // 2, done.index("write")


@pytest.mark.memory
async def test_integers_of_thousands_of_leading_zeros_are_their_value(client: Client) -> None:
    """Leading zeros do not count as digits: 0…03 is 3, and 0…0 followed by 20 digits
    is out of range (the whole text was converted before, a 500 past 4,300 digits)."""
    zeros = "0" * 4400  # one such value fits a request line (8 KiB)
    await add(client, "zeros", "m", priority=f"{zeros}3")
    await add(client, "zeros", "m", timeout=f"+{zeros}45")
    got = [await get(client, "zeros") for _ in range(2)]
    shown = [(m.headers["x-linger-priority"], m.headers["x-linger-timeout"]) for m in got]
    assert shown == [("0", "45"), ("3", "30")]  # priority 0 first
    response = await client.post(
        f"/channels/zeros?priority=-{zeros}99999999999999999999", data=b"m"
    )
    await error(response, 400, "Invalid message priority.")
    response = await client.get(f"/channels/zeros/messages?n={zeros}2&nowait")
    assert response.status == 200
