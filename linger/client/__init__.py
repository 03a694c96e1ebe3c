"""The Python client of Linger: ``AsyncClient`` and the blocking ``Client`` (the same
implementation), typed results and errors, and the worker loop (``consume``)."""

from __future__ import annotations

from linger.client.aio import AsyncClient
from linger.client.blocking import BlockingConsumer, Client
from linger.client.errors import (
    BadRequest,
    ChannelFull,
    ClientClosed,
    Conflict,
    ConnectionFailed,
    InvalidResponse,
    LeaseStale,
    LingerError,
    NotAllowed,
    NotFound,
    NotHidden,
    ServerError,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from linger.client.messages import Acknowledged, ChannelDetail, ChannelStats, Item, Message
from linger.client.retry import Retry
from linger.client.worker import Consumer, Counters, Reject

__all__ = [
    "Acknowledged",
    "AsyncClient",
    "BadRequest",
    "BlockingConsumer",
    "ChannelDetail",
    "ChannelFull",
    "ChannelStats",
    "Client",
    "ClientClosed",
    "Conflict",
    "ConnectionFailed",
    "Consumer",
    "Counters",
    "InvalidResponse",
    "Item",
    "LeaseStale",
    "LingerError",
    "Message",
    "NotAllowed",
    "NotFound",
    "NotHidden",
    "Reject",
    "Retry",
    "ServerError",
    "TooLarge",
    "Unauthenticated",
    "Unavailable",
]
