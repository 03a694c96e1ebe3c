"""HTTP handlers, the error middleware and the route table."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from linger import __version__, errors, params
from linger.broker import Broker
from linger.config import Settings
from linger.listener import Listener
from linger.storage import Message

BROKER = web.AppKey("broker", Broker)
SETTINGS = web.AppKey("settings", Settings)
SERVER_ID = web.AppKey("server_id", str)
STARTED = web.AppKey("started", float)
LISTENER = web.AppKey("listener", Listener)
ENGINE = web.AppKey("engine", AsyncEngine)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_STATUS: dict[type[errors.LingerError], int] = {
    errors.InvalidParameter: 400,
    errors.NotFound: 404,
    errors.NotHidden: 409,
    errors.MessageTooLarge: 413,
    errors.Unavailable: 503,
    errors.DatabaseError: 500,
    errors.ChannelFull: 507,
    errors.StorageFull: 507,
    errors.Overloaded: 503,
}
# Header values are ASCII: names and texts outside it are written percent-encoded.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F))


def header_value(text: str) -> str:
    return quote(text, safe=_HEADER_SAFE)


def error_response(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"error": text}, status=status, reason=header_value(text), headers=headers
    )


def _status(error: errors.LingerError) -> int:
    return next(code for cls, code in _STATUS.items() if isinstance(error, cls))


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Domain errors and aiohttp's own HTTP errors become JSON error responses."""
    if not params.path_allowed(request.rel_url.raw_path):
        return error_response(404, "Not Found")
    try:
        return await handler(request)
    except errors.LingerError as error:
        retry = isinstance(error, errors.Unavailable | errors.Overloaded)
        headers = {"Retry-After": "1"} if retry else None
        return error_response(_status(error), str(error), headers)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        allow = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        return error_response(error.status, error.reason, allow)


def _broker(request: web.Request) -> Broker:
    return request.app[BROKER]


def _channel(request: web.Request) -> str:
    return params.name(request, 2, "channel")


def _topic(request: web.Request, segment: int) -> str:
    return params.name(request, segment, "topic")


def _alive(request: web.Request) -> Callable[[], bool]:
    def alive() -> bool:
        transport = request.transport
        return transport is not None and not transport.is_closing()

    return alive


def _message_response(message: Message, now_ms: int) -> web.Response:
    headers = {
        "Content-Type": message.content_type,
        "x-linger-msg-id": str(message.id),
        "x-linger-channel": header_value(message.channel),
        "x-linger-priority": str(message.priority),
        "x-linger-timeout": str(message.timeout),
        "x-linger-deliver": str(message.deliver),
        "x-linger-delivered": str(message.deliveries),
        "x-linger-received": str(max(0, now_ms - message.created_at) // 1000),
        "x-linger-linger": str(message.linger),
        "x-linger-topic": header_value(message.topic),
    }
    return web.Response(body=message.body, headers=headers)


_OPENAPI = (Path(__file__).parent / "openapi.json").read_bytes()


async def get_openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this API."""
    return web.Response(body=_OPENAPI, content_type="application/json", charset="utf-8")


async def get_root(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "Linger": "Welcome",
            "version": __version__,
            "id": request.app[SERVER_ID],
            "hostname": socket.gethostname(),
        }
    )


async def list_channels(request: web.Request) -> web.Response:
    return web.json_response({"channels": await _broker(request).storage.list_channels()})


async def post_message(request: web.Request) -> web.Response:
    channel = _channel(request)
    body = await params.message_body(request, request.app[SETTINGS].max_size)
    options = params.options({**params.query(request), **body.fields})
    params.require_content(body)
    message_id = await _broker(request).add(channel, body.data, body.content_type, options)
    return web.json_response({"id": message_id}, status=202)


async def get_message(request: web.Request) -> web.Response:
    channel = _channel(request)
    wait = 0.0 if params.nowait(request) else request.app[SETTINGS].poll_max
    broker = _broker(request)
    message = await broker.get(channel, wait=wait, alive=_alive(request))
    if message is None:
        return web.Response(status=204, headers={"x-linger-channel": header_value(channel)})
    return _message_response(message, broker.storage.now())


async def delete_channel(request: web.Request) -> web.Response:
    broker = _broker(request)
    await broker.storage.drain_channel(_channel(request))
    broker.counters["channel-drain"] += 1
    return web.Response(status=204)


async def get_channel_stats(request: web.Request) -> web.Response:
    ready, hidden = await _broker(request).storage.channel_stats(_channel(request))
    return web.json_response({"ready": ready, "hidden": hidden})


async def get_channel_topics(request: web.Request) -> web.Response:
    topics = await _broker(request).storage.channel_topics(_channel(request))
    return web.json_response({"topics": topics})


async def put_subscription(request: web.Request) -> web.Response:
    channel, topic = _channel(request), _topic(request, 4)
    options = params.options(await params.option_values(request))
    broker = _broker(request)
    await broker.storage.subscribe(channel, topic, options)
    broker.counters["subscription-add"] += 1
    return web.Response(status=204)


async def delete_subscription(request: web.Request) -> web.Response:
    broker = _broker(request)
    if await broker.storage.unsubscribe(_channel(request), _topic(request, 4)):
        broker.counters["subscription-delete"] += 1
    return web.Response(status=204)


async def list_topics(request: web.Request) -> web.Response:
    return web.json_response({"topics": await _broker(request).storage.list_topics()})


async def post_topic_message(request: web.Request) -> web.Response:
    topic = _topic(request, 2)
    body = await params.message_body(request, request.app[SETTINGS].max_size)
    params.require_content(body)
    ids = await _broker(request).publish(topic, body.data, body.content_type)
    return web.json_response(ids, status=202)


async def get_topic_channels(request: web.Request) -> web.Response:
    channels = await _broker(request).storage.topic_channels(_topic(request, 2))
    return web.json_response({"channels": channels})


async def delete_message(request: web.Request) -> web.Response:
    broker = _broker(request)
    await broker.storage.delete_message(params.message_id(request))
    broker.counters["msg-delete"] += 1
    return web.Response(status=204)


async def touch_message(request: web.Request) -> web.Response:
    broker = _broker(request)
    await broker.storage.touch_message(params.message_id(request))
    broker.counters["msg-touch"] += 1
    return web.Response(status=204)


_COUNTERS = (
    "msg-add",
    "msg-get",
    "delivered",
    "msg-delete",
    "msg-timeouts",
    "msg-retention",
    "msg-discarded",
    "channel-drain",
    "publish",
    "publish-skipped",
    "subscription-add",
    "subscription-delete",
    "msg-touch",
)


async def get_stats(request: web.Request) -> web.Response:
    broker, settings, app = _broker(request), request.app[SETTINGS], request.app
    storage = broker.storage
    totals = await storage.totals()
    subscriptions, topics = await storage.subscription_totals()
    stats: dict[str, object] = {
        "id": app[SERVER_ID],
        "version": __version__,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "start": int(app[STARTED]),
        "current-uptime": int(time.time() - app[STARTED]),
        "current-channels": len(await storage.list_channels()),
        "current-topics": topics,
        "current-subscriptions": subscriptions,
        "current-messages": totals.messages,
        "current-messages-ready": totals.ready,
        "current-messages-hidden": totals.hidden,
        "current-messages-urgent": totals.urgent,
        "current-messages-niced": totals.niced,
        "current-waiters": broker.notifier.count(),
        "msg-max-id": await storage.max_id(),
        "msg-max-size": settings.max_size,
        "db-file": settings.db_display,
        "hlm": settings.hlm,
    }
    stats.update({name: broker.counters[name] for name in _COUNTERS})
    if LISTENER in app:
        stats["listener-connected"] = app[LISTENER].connected.is_set()
    return web.json_response(stats)


_CHANNEL = "/channels/{channel:[^/]+}"
_TOPIC = "{topic:[^/]+}"

ROUTES = [
    web.get("/", get_root, name="root", allow_head=False),
    web.get("/channels", list_channels, name="channels", allow_head=False),
    web.post(_CHANNEL, post_message, name="post_message"),
    web.get(_CHANNEL, get_message, name="get_message", allow_head=False),
    web.delete(_CHANNEL, delete_channel, name="delete_channel"),
    web.get(_CHANNEL + "/stats", get_channel_stats, name="channel_stats", allow_head=False),
    web.get(_CHANNEL + "/topics", get_channel_topics, name="channel_topics", allow_head=False),
    web.put(_CHANNEL + "/topics/" + _TOPIC, put_subscription, name="put_subscription"),
    web.delete(_CHANNEL + "/topics/" + _TOPIC, delete_subscription, name="delete_subscription"),
    web.get("/topics", list_topics, name="topics", allow_head=False),
    web.post("/topics/" + _TOPIC, post_topic_message, name="publish"),
    web.get(
        "/topics/" + _TOPIC + "/channels",
        get_topic_channels,
        name="topic_channels",
        allow_head=False,
    ),
    web.delete("/messages/{id:[0-9]+}", delete_message, name="delete_message"),
    web.post("/messages/{id:[0-9]+}/touch", touch_message, name="touch_message"),
    web.get("/stats", get_stats, name="stats", allow_head=False),
    web.get("/openapi.json", get_openapi, name="openapi", allow_head=False),
]
