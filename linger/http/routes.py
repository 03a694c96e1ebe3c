"""The route table: the whole URL surface in one place."""

from __future__ import annotations

from aiohttp import web

from linger.http import bodies
from linger.http.admin import (
    get_health,
    get_metrics,
    get_openapi,
    get_ready,
    get_root,
    get_stats,
)
from linger.http.batches import (
    ack_limit,
    delete_messages,
    get_messages,
    post_messages,
    publish_messages,
    reject_messages,
    release_messages,
    touch_messages,
)
from linger.http.deadletters import redrive
from linger.http.keys import SETTINGS
from linger.http.leases import delete_message, reject_message, release_message, touch_message
from linger.http.messages import (
    delete_channel,
    get_channel_stats,
    get_message,
    list_channels,
    peek_messages,
    post_message,
)
from linger.http.topics import (
    delete_subscription,
    get_channel_topics,
    get_topic_channels,
    list_topics,
    post_topic_message,
    put_subscription,
)
from linger.http.ui import get_overview, get_ui, get_ui_asset

_CHANNEL = "/channels/{channel:[^/]+}"
# Requests carrying a message refuse an oversized body before it is sent (Expect).
_MESSAGE_BODY = bodies.expect_within(bodies.limit)
_TOPIC = "{topic:[^/]+}"
_BATCH_BODY = bodies.expect_within(lambda request: request.app[SETTINGS].max_batch_bytes)
_ACK_BODY = bodies.expect_within(ack_limit)

ROUTES = [
    web.get("/", get_root, name="root", allow_head=False),
    web.get("/channels", list_channels, name="channels", allow_head=False),
    web.post(_CHANNEL, post_message, name="post_message", expect_handler=_MESSAGE_BODY),
    web.get(_CHANNEL, get_message, name="get_message", allow_head=False),
    web.delete(_CHANNEL, delete_channel, name="delete_channel"),
    web.post(
        _CHANNEL + "/messages", post_messages, name="post_messages", expect_handler=_BATCH_BODY
    ),
    web.get(_CHANNEL + "/messages", get_messages, name="get_messages", allow_head=False),
    web.get(_CHANNEL + "/stats", get_channel_stats, name="channel_stats", allow_head=False),
    web.get(_CHANNEL + "/topics", get_channel_topics, name="channel_topics", allow_head=False),
    web.get(_CHANNEL + "/peek", peek_messages, name="peek", allow_head=False),
    web.post(_CHANNEL + "/redrive", redrive, name="redrive"),
    web.put(
        _CHANNEL + "/topics/" + _TOPIC,
        put_subscription,
        name="put_subscription",
        expect_handler=bodies.expect_within(bodies.options_limit),
    ),
    web.delete(_CHANNEL + "/topics/" + _TOPIC, delete_subscription, name="delete_subscription"),
    web.get("/topics", list_topics, name="topics", allow_head=False),
    web.post("/topics/" + _TOPIC, post_topic_message, name="publish", expect_handler=_MESSAGE_BODY),
    web.post(
        "/topics/" + _TOPIC + "/messages",
        publish_messages,
        name="publish_messages",
        expect_handler=_BATCH_BODY,
    ),
    web.get(
        "/topics/" + _TOPIC + "/channels",
        get_topic_channels,
        name="topic_channels",
        allow_head=False,
    ),
    web.post("/messages/delete", delete_messages, name="delete_messages", expect_handler=_ACK_BODY),
    web.post("/messages/touch", touch_messages, name="touch_messages", expect_handler=_ACK_BODY),
    web.post(
        "/messages/release", release_messages, name="release_messages", expect_handler=_ACK_BODY
    ),
    web.post("/messages/reject", reject_messages, name="reject_messages", expect_handler=_ACK_BODY),
    web.delete("/messages/{id:[0-9]+}", delete_message, name="delete_message"),
    web.post("/messages/{id:[0-9]+}/touch", touch_message, name="touch_message"),
    web.post("/messages/{id:[0-9]+}/release", release_message, name="release_message"),
    web.post("/messages/{id:[0-9]+}/reject", reject_message, name="reject_message"),
    web.get("/stats", get_stats, name="stats", allow_head=False),
    web.get("/openapi.json", get_openapi, name="openapi", allow_head=False),
    web.get("/metrics", get_metrics, name="metrics", allow_head=False),
    web.get("/health", get_health, name="health", allow_head=False),
    web.get("/ready", get_ready, name="ready", allow_head=False),
    web.get("/overview", get_overview, name="overview", allow_head=False),
    web.get("/ui", get_ui, name="ui", allow_head=False),
    web.get("/ui/{asset:[A-Za-z0-9._-]*}", get_ui_asset, name="ui_asset", allow_head=False),
]
