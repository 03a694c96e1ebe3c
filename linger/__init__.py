"""Linger: a message queue and pub-sub service with a REST HTTP API."""

from __future__ import annotations

__version__ = "2.0.0"
