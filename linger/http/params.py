"""Request parsing: names, integers, message options and the query string."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from urllib.parse import unquote_to_bytes

from aiohttp import web

from linger import errors
from linger.store.db import NAME_LENGTH
from linger.store.records import Options

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INTEGER = re.compile(r"[+-]?[0-9]+")
# Literal characters allowed in a request path; any other does not match a route.
_PATH = re.compile(r"[A-Za-z0-9_\-%.~/]*")


def path_allowed(raw_path: str) -> bool:
    return _PATH.fullmatch(raw_path) is not None


def integer(text: str) -> int | None:
    """An ASCII decimal integer within the signed 64-bit range, or None."""
    if not _INTEGER.fullmatch(text):
        return None
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else None


def name(request: web.Request, segment: int, kind: str) -> str:
    """The percent-decoded channel or topic name at path ``segment``."""
    raw = request.rel_url.raw_path.split("/")[segment]
    try:
        value = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise errors.InvalidParameter(f"Invalid {kind} name.") from None
    if not 1 <= len(value) <= NAME_LENGTH or any(
        unicodedata.category(char) == "Cc" for char in value
    ):
        raise errors.InvalidParameter(f"Invalid {kind} name.")
    return value


def channel(request: web.Request) -> str:
    return name(request, 2, "channel")


def topic(request: web.Request, segment: int) -> str:
    return name(request, segment, "topic")


def message_id(request: web.Request) -> int:
    value = integer(request.match_info["id"])
    if value is None:
        raise errors.NotFound()
    return value


def nowait(request: web.Request) -> bool:
    """``nowait`` present with no value or any value but 0/false/no."""
    if "nowait" not in request.query:
        return False
    return request.query.getall("nowait")[-1].strip().lower() not in ("0", "false", "no")


_OPTION_RULES: tuple[tuple[str, int, int, str], ...] = (
    ("priority", 0, INT64_MIN, "Invalid message priority."),
    ("timeout", 30, 1, "Invalid message visibility timeout."),
    ("deliver", 0, 0, "Invalid message delivery limit."),
    ("linger", 0, 0, "Invalid message retention period."),
)


def options(values: Mapping[str, str]) -> Options:
    """Message options from ``values``, checked in the documented order."""
    parsed: dict[str, int] = {}
    for key, default, low, text in _OPTION_RULES:
        raw = values.get(key)
        value = default if raw is None else integer(raw)
        if value is None or value < low:
            raise errors.InvalidParameter(text)
        parsed[key] = value
    return Options(**parsed)


def query(request: web.Request) -> dict[str, str]:
    """The query string as a dict; a repeated key takes its last value."""
    return dict(request.query.items())
