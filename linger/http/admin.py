"""Server-wide handlers: welcome, statistics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path

from aiohttp import web

from linger import __version__, errors
from linger.http.keys import LISTENER, METRICS, SERVER_ID, SETTINGS, STARTED, broker_of
from linger.http.metrics import CONTENT_TYPE
from linger.http.responses import error_response
from linger.store import db

logger = logging.getLogger(__name__)
# How long /ready waits for the database.
READY_TIMEOUT = 5.0

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


async def get_metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition; while the database is down, the process's metrics
    with ``linger_database_up 0``."""
    body = await request.app[METRICS].scrape()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def get_health(request: web.Request) -> web.Response:
    """The process runs (a liveness check: it asks nothing of the database)."""
    return web.json_response({"status": "ok"})


async def get_ready(request: web.Request) -> web.Response:
    """200 when the database answers and its schema is current, else 503 and why (for
    load balancers and orchestrators)."""
    overview = broker_of(request).storage.overview
    try:
        revision = await asyncio.wait_for(overview.revision(), READY_TIMEOUT)
    except (errors.LingerError, TimeoutError):
        return error_response(503, "The database is unavailable.", {"Retry-After": "1"})
    except Exception:  # the database answers, but not as a Linger database should
        logger.warning("readiness: the schema revision cannot be read", exc_info=True)
        revision = None
    if revision != db.head():
        return error_response(
            503, f"The database schema is not at revision {db.head()}.", {"Retry-After": "1"}
        )
    return web.json_response({"status": "ready"})
