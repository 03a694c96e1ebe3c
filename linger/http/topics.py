"""Handlers of topics and subscriptions: subscribe, unsubscribe, publish, listings."""

from __future__ import annotations

from aiohttp import web

from linger.http import access, bodies, params
from linger.http.keys import broker_of


async def get_channel_topics(request: web.Request) -> web.Response:
    topics = await broker_of(request).storage.topics.channel_topics(params.channel(request))
    return web.json_response({"topics": await access.listed(request, topics)})


async def put_subscription(request: web.Request) -> web.Response:
    channel, topic = params.channel(request), params.topic(request, 4)
    options = params.options(await bodies.option_values(request), channel)
    access.require(request, "produce", (options.dead,))
    broker = broker_of(request)
    await broker.storage.topics.subscribe(channel, topic, options)
    broker.counters["subscription-add"] += 1
    return web.Response(status=204)


async def delete_subscription(request: web.Request) -> web.Response:
    broker = broker_of(request)
    if await broker.storage.topics.unsubscribe(params.channel(request), params.topic(request, 4)):
        broker.counters["subscription-delete"] += 1
    return web.Response(status=204)


async def list_topics(request: web.Request) -> web.Response:
    topics = await broker_of(request).storage.topics.list_topics()
    return web.json_response({"topics": await access.listed(request, topics)})


async def post_topic_message(request: web.Request) -> web.Response:
    topic = params.topic(request, 2)
    body = await bodies.message_body(request)
    bodies.require_content(body)
    ids = await broker_of(request).publish(topic, body.data, body.content_type)
    return web.json_response(await access.shown(request, ids), status=202)


async def get_topic_channels(request: web.Request) -> web.Response:
    channels = await broker_of(request).storage.topics.topic_channels(params.topic(request, 2))
    return web.json_response({"channels": await access.listed(request, channels)})
