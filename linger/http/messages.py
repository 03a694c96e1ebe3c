"""Handlers of channels and messages: add, get (long-poll), delete, touch, drain, stats."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from linger.http import bodies, params
from linger.http.keys import SETTINGS, broker_of
from linger.http.responses import header_value
from linger.store.records import Message


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


async def list_channels(request: web.Request) -> web.Response:
    return web.json_response(
        {"channels": await broker_of(request).storage.overview.list_channels()}
    )


async def post_message(request: web.Request) -> web.Response:
    channel = params.channel(request)
    body = await bodies.message_body(request)
    options = params.options({**params.query(request), **body.fields})
    bodies.require_content(body)
    message_id = await broker_of(request).add(channel, body.data, body.content_type, options)
    return web.json_response({"id": message_id}, status=202)


async def get_message(request: web.Request) -> web.Response:
    channel = params.channel(request)
    wait = 0.0 if params.nowait(request) else request.app[SETTINGS].poll_max
    broker = broker_of(request)
    message = await broker.get(channel, wait=wait, alive=_alive(request))
    if message is None:
        return web.Response(status=204, headers={"x-linger-channel": header_value(channel)})
    return _message_response(message, broker.storage.now())


async def delete_channel(request: web.Request) -> web.Response:
    broker = broker_of(request)
    await broker.storage.messages.drain(params.channel(request))
    broker.counters["channel-drain"] += 1
    return web.Response(status=204)


async def get_channel_stats(request: web.Request) -> web.Response:
    ready, hidden = await broker_of(request).storage.messages.channel_stats(params.channel(request))
    return web.json_response({"ready": ready, "hidden": hidden})


async def delete_message(request: web.Request) -> web.Response:
    broker = broker_of(request)
    await broker.storage.messages.delete(params.message_id(request))
    broker.counters["msg-delete"] += 1
    return web.Response(status=204)


async def touch_message(request: web.Request) -> web.Response:
    broker = broker_of(request)
    await broker.storage.messages.touch(params.message_id(request))
    broker.counters["msg-touch"] += 1
    return web.Response(status=204)
