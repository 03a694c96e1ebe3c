"""The values storage operations take and return: frozen, free of rows and connections."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Options:
    """Per-message options: priority, visibility timeout, delivery limit, retention."""

    priority: int = 0
    timeout: int = 30
    deliver: int = 0
    linger: int = 0


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    channel: str
    body: bytes
    content_type: str
    priority: int
    timeout: int
    deliver: int
    deliveries: int
    linger: int
    topic: str
    created_at: int


@dataclass(frozen=True, slots=True)
class Totals:
    messages: int
    ready: int
    hidden: int
    urgent: int
    niced: int
