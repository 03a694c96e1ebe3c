"""A message as the API shows it: headers on a single delivery, a JSON object in batches
and peeks."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import hdrs, web

from linger.http import server
from linger.http.responses import header_value, json_response
from linger.store.records import Message

# A list of messages this large is written message by message, yielding between them.
_STREAM_BYTES = 1024 * 1024


def received(message: Message, now_ms: int) -> int:
    """Whole seconds since the message was added."""
    return max(0, now_ms - message.created_at) // 1000


def message_response(message: Message, now_ms: int) -> web.Response:
    """A delivery: the body, its content type, and the metadata in x-linger-* headers."""
    headers = {
        "Content-Type": message.content_type,
        # The body is a client's: a browser opening it (on the dashboard's own address)
        # must not run it as a page of this origin, whatever its content type says.
        "Content-Security-Policy": "sandbox; default-src 'none'",
        "x-linger-msg-id": str(message.id),
        "x-linger-channel": header_value(message.channel),
        "x-linger-priority": str(message.priority),
        "x-linger-timeout": str(message.timeout),
        "x-linger-deliver": str(message.deliver),
        "x-linger-delivered": str(message.deliveries),
        "x-linger-received": str(received(message, now_ms)),
        "x-linger-linger": str(message.linger),
        "x-linger-topic": header_value(message.topic),
    }
    if message.lease is not None:
        headers["x-linger-lease"] = message.lease
    if message.dead_from is not None:
        headers["x-linger-dead-from"] = header_value(message.dead_from)
        headers["x-linger-dead-reason"] = message.dead_reason or ""
    return web.Response(body=message.body, headers=headers)


def message_object(message: Message, now_ms: int) -> dict[str, Any]:
    """The JSON message object: the body as text when it is UTF-8, else base64."""
    try:
        body, encoding = message.body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(message.body).decode("ascii"), "base64"
    lease = message.lease
    shown: dict[str, Any] = (
        {"id": message.id} if lease is None else {"id": message.id, "lease": lease}
    )
    shown |= {
        "channel": message.channel,
        "priority": message.priority,
        "timeout": message.timeout,
        "deliver": message.deliver,
        "delivered": message.deliveries,
        "received": received(message, now_ms),
        "linger": message.linger,
        "topic": message.topic,
        "content_type": message.content_type,
        "body": body,
        "encoding": encoding,
        "dead_from": message.dead_from,
        "dead_reason": message.dead_reason,
    }
    return shown


async def messages_response(
    request: web.Request, found: Sequence[Message], now_ms: int
) -> web.StreamResponse:
    """``{"messages": [...]}``: at once when small, else written message by message (the
    JSON of a large batch is never held whole, nor encoded in one go)."""
    if sum(len(message.body) for message in found) < _STREAM_BYTES:
        return json_response({"messages": [message_object(m, now_ms) for m in found]})
    response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "application/json; charset=utf-8"})
    response.enable_chunked_encoding()
    server.finish(request, response)
    await response.prepare(request)
    await response.write(b'{"messages":[')
    for index, message in enumerate(found):
        text = orjson.dumps(message_object(message, now_ms))
        await response.write(b"," + text if index else text)
    await response.write(b"]}")
    await response.write_eof()
    return response
