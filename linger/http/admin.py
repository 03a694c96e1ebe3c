"""Server-wide handlers: welcome, statistics and the OpenAPI document."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from aiohttp import web

from linger import __version__
from linger.http.keys import LISTENER, SERVER_ID, SETTINGS, STARTED, broker_of

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
    "msg-release",
    "msg-reject",
    "msg-dead",
    "msg-redriven",
)


async def get_stats(request: web.Request) -> web.Response:
    broker, settings, app = broker_of(request), request.app[SETTINGS], request.app
    storage = broker.storage
    totals = await storage.overview.totals()
    subscriptions, topics = await storage.topics.totals()
    stats: dict[str, object] = {
        "id": app[SERVER_ID],
        "version": __version__,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "start": int(app[STARTED]),
        "current-uptime": int(time.time() - app[STARTED]),
        "current-channels": await storage.overview.channel_count(),
        "current-topics": topics,
        "current-subscriptions": subscriptions,
        "current-messages": totals.messages,
        "current-messages-ready": totals.ready,
        "current-messages-hidden": totals.hidden,
        "current-messages-urgent": totals.urgent,
        "current-messages-niced": totals.niced,
        "current-waiters": broker.notifier.asleep(),
        "msg-max-id": await storage.overview.max_id(),
        "msg-max-size": settings.max_size,
        "db-file": settings.db_display,
        "hlm": settings.hlm,
    }
    stats.update({name: broker.counters[name] for name in _COUNTERS})
    if LISTENER in app:
        stats["listener-connected"] = app[LISTENER].connected.is_set()
    return web.json_response(stats)
