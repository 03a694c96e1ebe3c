"""Handlers of channels and messages: add, get (long-poll), delete, drain, stats, peek."""

from __future__ import annotations

from aiohttp import web

from linger import errors
from linger.http import access, bodies, params, server
from linger.http.keys import SETTINGS, broker_of
from linger.http.objects import message_response, messages_response
from linger.http.responses import header_value, json_response
from linger.store.messages import STATES


async def list_channels(request: web.Request) -> web.Response:
    channels = await broker_of(request).storage.overview.list_channels()
    return web.json_response({"channels": await access.listed(request, channels)})


async def post_message(request: web.Request) -> web.Response:
    channel = params.channel(request)
    body = await bodies.message_body(request)
    options = params.options({**params.query(request), **body.fields}, channel)
    access.require(request, "produce", (options.dead,))
    bodies.require_content(body)
    message_id = await broker_of(request).add(channel, body.data, body.content_type, options)
    return json_response({"id": message_id}, status=202)


async def get_message(request: web.Request) -> web.Response:
    channel = params.channel(request)
    wait = params.wait(request, request.app[SETTINGS].poll_max)
    broker = broker_of(request)
    with access.lasting(request, server.connected(request)) as alive:
        # receive, not a wrapper of it: one coroutine less held by every waiting consumer.
        delivered = await broker.receive(channel, 1, wait=wait, alive=alive)
    if not delivered:
        return web.Response(status=204, headers={"x-linger-channel": header_value(channel)})
    return message_response(delivered[0], broker.storage.now())


async def delete_channel(request: web.Request) -> web.Response:
    broker = broker_of(request)
    await broker.storage.messages.drain(params.channel(request))
    broker.counters["channel-drain"] += 1
    return web.Response(status=204)


async def get_channel_stats(request: web.Request) -> web.Response:
    messages = broker_of(request).storage.messages
    channel = params.channel(request)
    if params.flag(request, "detail"):
        detail = await messages.detail(channel)
        return web.json_response(
            {
                "ready": detail.ready,
                "hidden": detail.hidden,
                "delayed": detail.delayed,
                "oldest_ready_age": detail.oldest_ready_age,
                "dead_from": await access.listed(request, detail.dead_from),
            }
        )
    ready, hidden = await messages.channel_stats(channel)
    return web.json_response({"ready": ready, "hidden": hidden})


async def peek_messages(request: web.Request) -> web.StreamResponse:
    channel = params.channel(request)
    n = params.batch_size(request, request.app[SETTINGS].max_batch)
    state = request.query.get("state", "ready")
    if state not in STATES:
        raise errors.InvalidParameter("Invalid state.")
    storage = broker_of(request).storage
    found = await storage.messages.peek(channel, state, n)
    return await messages_response(request, found, storage.now())
