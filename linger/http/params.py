"""Request parsing: names, integers, message options and bounded message bodies."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from linger import errors
from linger.store.db import NAME_LENGTH
from linger.store.records import Options

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INTEGER = re.compile(r"[+-]?[0-9]+")
# Literal characters allowed in a request path; any other does not match a route.
_PATH = re.compile(r"[A-Za-z0-9_\-%.~/]*")
_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")
# Form bodies may percent-encode every byte of the message, plus room for other fields.
_FORM_OVERHEAD = 64 * 1024


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


@dataclass(frozen=True, slots=True)
class Body:
    """A message as posted, and the form fields that came with it."""

    data: bytes
    content_type: str
    fields: dict[str, str]


async def _read_limited(stream: web.Request | BodyPartReader, limit: int) -> bytes | None:
    """Read at most ``limit`` bytes; None when there is more."""
    chunks: list[bytes] = []
    size = 0
    while True:
        if isinstance(stream, web.Request):
            chunk = await stream.content.read(min(65536, limit + 1 - size))
        else:
            chunk = await stream.read_chunk(min(65536, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)


def _decode_urlencoded(data: bytes) -> list[tuple[str, bytes]]:
    fields = []
    for pair in data.split(b"&"):
        if not pair:
            continue
        key, _, value = pair.partition(b"=")
        fields.append(
            (
                unquote_to_bytes(key.replace(b"+", b" ")).decode("utf-8"),
                unquote_to_bytes(value.replace(b"+", b" ")),
            )
        )
    return fields


async def _read_multipart(request: web.Request, limit: int) -> list[tuple[str, bytes]] | None:
    fields = []
    reader = await request.multipart()
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            raise errors.InvalidParameter("Invalid form data.")
        data = await _read_limited(part, limit)
        if data is None:
            return None
        limit -= len(data)
        fields.append((part.name or "", data))
    return fields


async def _read_form(request: web.Request, max_size: int) -> tuple[bytes, dict[str, str]]:
    limit = 3 * max_size + _FORM_OVERHEAD
    too_large = errors.MessageTooLarge(f"Message is larger than {max_size} bytes.")
    if (request.content_length or 0) > limit:
        raise too_large
    try:
        if request.content_type == "multipart/form-data":
            pairs = await _read_multipart(request, limit)
        else:
            raw = await _read_limited(request, limit)
            pairs = None if raw is None else _decode_urlencoded(raw)
        if pairs is None:
            raise too_large
        fields = {key: value.decode("utf-8") for key, value in pairs}
    except UnicodeDecodeError:
        raise errors.InvalidParameter("Invalid UTF-8 in form data.") from None
    except (ValueError, HttpProcessingError) as error:  # malformed multipart framing/headers
        raise errors.InvalidParameter("Invalid form data.") from error
    message = next((value for key, value in reversed(pairs) if key == "msg"), b"")
    return message, fields


async def message_body(request: web.Request, max_size: int) -> Body:
    """The posted message: a form's ``msg`` field (served as text/plain), else the raw
    body with its content type, else ``msg`` from the query string. Never reads more than
    the limit allows."""
    too_large = errors.MessageTooLarge(f"Message is larger than {max_size} bytes.")
    fields: dict[str, str] = {}
    if not request.body_exists:
        data, content_type = request.query.get("msg", "").encode("utf-8"), "text/plain"
    elif hdrs.CONTENT_TYPE in request.headers and request.content_type in _FORMS:
        (data, fields), content_type = await _read_form(request, max_size), "text/plain"
    else:
        if (request.content_length or 0) > max_size:
            raise too_large
        raw = await _read_limited(request, max_size)
        if raw is None:
            raise too_large
        data = raw
        content_type = request.headers.get(hdrs.CONTENT_TYPE, "text/plain")
    if len(data) > max_size:
        raise too_large
    return Body(data, content_type, fields)


def query(request: web.Request) -> dict[str, str]:
    """The query string as a dict; a repeated key takes its last value."""
    return dict(request.query.items())


async def option_values(request: web.Request) -> dict[str, str]:
    """Option values from the query string and a form body (the form wins)."""
    values = query(request)
    if request.body_exists and request.content_type in _FORMS:
        values.update((await _read_form(request, _FORM_OVERHEAD))[1])
    return values


def require_content(body: Body) -> None:
    if not body.data:
        raise errors.EmptyMessage()
