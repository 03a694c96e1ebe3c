"""Handlers of one delivered message: delete, touch, release and reject, each with the
lease of its delivery (or, 1.0.1 style, without)."""

from __future__ import annotations

from aiohttp import web

from linger.http import access, params
from linger.http.keys import broker_of

_NO_CONTENT = 204


async def delete_message(request: web.Request) -> web.Response:
    message_id = params.message_id(request)
    broker = broker_of(request)
    lease = params.lease(request, message_id)
    await broker.storage.messages.delete(message_id, lease, access.scope(request, "consume"))
    broker.counters["msg-delete"] += 1
    return web.Response(status=_NO_CONTENT)


async def touch_message(request: web.Request) -> web.Response:
    message_id = params.message_id(request)
    lease = params.lease(request, message_id)
    seconds = params.option(request, "timeout")
    broker = broker_of(request)
    await broker.storage.leases.touch(message_id, lease, seconds, access.scope(request, "consume"))
    broker.counters["msg-touch"] += 1
    return web.Response(status=_NO_CONTENT)


async def release_message(request: web.Request) -> web.Response:
    message_id = params.message_id(request)
    lease = params.lease(request, message_id)
    delay = params.option(request, "delay") or 0
    await broker_of(request).release(message_id, lease, delay, access.scope(request, "consume"))
    return web.Response(status=_NO_CONTENT)


async def reject_message(request: web.Request) -> web.Response:
    message_id = params.message_id(request)
    lease = params.lease(request, message_id)
    await broker_of(request).reject(message_id, lease, access.scope(request, "consume"))
    return web.Response(status=_NO_CONTENT)
