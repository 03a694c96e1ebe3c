"""Typed keys of the application's state."""

from __future__ import annotations

import asyncio

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from linger.config import Settings
from linger.http.budget import Budget
from linger.http.metrics import Metrics
from linger.queue.broker import Broker
from linger.queue.listener import Listener

BROKER = web.AppKey("broker", Broker)
SETTINGS = web.AppKey("settings", Settings)
SERVER_ID = web.AppKey("server_id", str)
STARTED = web.AppKey("started", float)
LISTENER = web.AppKey("listener", Listener)
ENGINE = web.AppKey("engine", AsyncEngine)
METRICS = web.AppKey("metrics", Metrics)
# The bytes that the batch bodies being read at once may hold.
BATCH_BUDGET = web.AppKey("batch_budget", Budget)
# Set when the process stops: every response from then on closes its connection.
DRAINING = web.AppKey("draining", asyncio.Event)


def broker_of(request: web.Request) -> Broker:
    return request.app[BROKER]
