"""Request bodies, read within bounds: every byte counted, a deadline, few form fields.

A body is read only as far as its limit (a larger one is 413 without being read into
memory), within ``--body-timeout`` (408), and only when it is not compressed (415): the
server never inflates a request. Forms have at most ``MAX_FORM_FIELDS`` fields or parts,
a multipart form at most ``MAX_PREAMBLE`` bytes before its first boundary, and a large
urlencoded form is decoded off the event loop, so that no request, however built, holds
up the others.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qsl, unquote_to_bytes

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from linger import errors
from linger.http import params, server
from linger.http.keys import SETTINGS
from linger.http.responses import error_response

FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")
# Form bodies may percent-encode every byte of the message, plus room for other fields.
FORM_OVERHEAD = 64 * 1024
# Fields of a urlencoded form, or parts of a multipart one.
MAX_FORM_FIELDS = 64
# Bytes a multipart form may send before its first boundary (a preamble, which form
# clients do not send): aiohttp's reader would skip any number of them line by line, on the
# event loop, before Linger could count them.
MAX_PREAMBLE = 1024
# A boundary's line beyond the boundary: "--" (the last one), padding, CRLF.
_BOUNDARY_LINE_EXTRA = 64
# Longest Content-Type kept with a message.
MAX_CONTENT_TYPE = 1024
# Urlencoded forms longer than this are decoded in a thread: percent-decoding is Python
# code, about 0.6 µs per escaped byte.
_THREAD_DECODE = 16 * 1024
_CHUNK = 65536
_UNCOMPRESSED = ("", "identity")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Body:
    """A message as posted, and the form fields that came with it."""

    data: bytes
    content_type: str
    fields: dict[str, str]


def _too_large(max_size: int) -> errors.MessageTooLarge:
    return errors.MessageTooLarge(f"Message is larger than {max_size} bytes.")


def is_form(request: web.Request) -> bool:
    return hdrs.CONTENT_TYPE in request.headers and request.content_type in FORMS


def form_limit(max_size: int) -> int:
    """The most bytes of a form carrying at most ``max_size`` bytes: it may escape every
    byte, and has other fields."""
    return 3 * max_size + FORM_OVERHEAD


def limit(request: web.Request) -> int:
    """The most bytes a message-carrying request may send."""
    max_size = request.app[SETTINGS].max_size
    return form_limit(max_size) if is_form(request) else max_size


def options_limit(_request: web.Request) -> int:
    """The most bytes of a request that carries options only (subscribe)."""
    return form_limit(FORM_OVERHEAD)


def check_encoding(request: web.Request) -> None:
    """Refuse a compressed body (Linger does not inflate requests)."""
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
    if encoding not in _UNCOMPRESSED and request.body_exists:
        raise errors.UnsupportedEncoding()


def expect_within(
    limit_of: Callable[[web.Request], int],
) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    """An ``Expect: 100-continue`` handler: a body that would be refused is refused before
    the client sends it, not after."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        expect = request.headers.get(hdrs.EXPECT, "").lower()
        if expect != "100-continue":
            return error_response(417, "Unsupported expectation.")
        try:
            check_encoding(request)
        except errors.UnsupportedEncoding as error:
            return _refused(request, error_response(415, str(error)))
        size = limit_of(request)
        if (request.content_length or 0) > size:
            text = f"Request body is larger than {size} bytes."
            return _refused(request, error_response(413, text))
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    return expect


def _refused(request: web.Request, response: web.Response) -> web.Response:
    """The body will not come: close the connection after the answer, reading nothing."""
    response.force_close()
    server.abandon(request)
    return response


def content_type(value: str, default: str = "text/plain") -> str:
    """A content type to keep with a message: printable UTF-8 (a header with other bytes
    arrives surrogate-escaped and could not be stored), of bounded length; an empty one
    (or blanks) is ``default``, since a delivery could not carry it as a header."""
    if len(value) > MAX_CONTENT_TYPE or not value.replace("\t", " ").isprintable():
        raise errors.InvalidParameter("Invalid content type.")
    return value.strip(" \t") or default


async def read_limited(stream: web.Request | BodyPartReader, limit: int) -> bytes | None:
    """Read at most ``limit`` bytes; None when there is more."""
    chunks: list[bytes] = []
    size = 0
    while True:
        if isinstance(stream, web.Request):
            chunk = await stream.content.read(min(_CHUNK, limit + 1 - size))
        else:
            chunk = await stream.read_chunk(min(_CHUNK, limit + 1 - size))
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


async def _read_urlencoded(request: web.Request, limit: int) -> list[tuple[str, bytes]] | None:
    raw = await read_limited(request, limit)
    if raw is None:
        return None
    if raw.count(b"&") >= MAX_FORM_FIELDS:
        raise errors.InvalidParameter("Too many form fields.")
    if len(raw) > _THREAD_DECODE:
        return await asyncio.to_thread(_decode_urlencoded, raw)
    return _decode_urlencoded(raw)


async def _read_multipart(request: web.Request, limit: int) -> list[tuple[str, bytes]] | None:
    """The parts of a multipart form; None when the body (boundaries, part headers and
    empty parts counted) passes ``limit``."""
    fields: list[tuple[str, bytes]] = []
    reader = await request.multipart()  # checks the boundary, reads nothing
    await _to_first_boundary(request)
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            raise errors.InvalidParameter("Invalid form data.")
        if len(fields) == MAX_FORM_FIELDS:
            raise errors.InvalidParameter("Too many form fields.")
        data = await read_limited(part, limit)
        if data is None or request.content.total_bytes > limit:
            return None
        fields.append((part.name or "", data))
    return fields


async def _to_first_boundary(request: web.Request) -> None:
    """Read a multipart body's preamble, at most ``MAX_PREAMBLE`` bytes of it (counted with
    the rest of the body), and give the first boundary's line back for the multipart
    reader to find at once."""
    parameters = parse_mimetype(request.headers[hdrs.CONTENT_TYPE]).parameters
    boundary = ("--" + parameters["boundary"]).encode()  # as the multipart reader has it
    longest = len(boundary) + _BOUNDARY_LINE_EXTRA
    read = 0
    while read <= MAX_PREAMBLE:
        try:
            # Room for the rest of the preamble, or for the boundary's line.
            line = await request.content.readline(max_line_length=MAX_PREAMBLE - read + longest)
        except LineTooLong:
            break
        if not line:
            raise errors.InvalidParameter("Invalid form data.")
        if line.rstrip() in (boundary, boundary + b"--"):  # the reader's own test
            # unread_data() is deprecated, but the multipart reader gives boundaries back
            # with it too.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                request.content.unread_data(line)
            return
        read += len(line)
    text = f"Invalid form data: more than {MAX_PREAMBLE} bytes before the first boundary."
    raise errors.InvalidParameter(text)


async def _read_form(request: web.Request, max_size: int) -> tuple[bytes, dict[str, str]]:
    size = form_limit(max_size)
    if (request.content_length or 0) > size:
        raise _too_large(max_size)
    try:
        if request.content_type == "multipart/form-data":
            pairs = await _read_multipart(request, size)
        else:
            pairs = await _read_urlencoded(request, size)
        if pairs is None:
            raise _too_large(max_size)
        fields = {key: value.decode("utf-8") for key, value in pairs}
    except UnicodeDecodeError:
        raise errors.InvalidParameter("Invalid UTF-8 in form data.") from None
    except (ValueError, HttpProcessingError) as error:  # malformed multipart framing/headers
        raise errors.InvalidParameter("Invalid form data.") from error
    message = next((value for key, value in reversed(pairs) if key == "msg"), b"")
    return message, fields


def _query_message(request: web.Request) -> bytes:
    """The last ``msg`` of the query string, held to the same UTF-8 rule as a form's."""
    try:
        pairs = parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise errors.InvalidParameter("Invalid UTF-8 in query string.") from None
    return next((value for key, value in reversed(pairs) if key == "msg"), "").encode("utf-8")


async def within_deadline(request: web.Request, read: Awaitable[T]) -> T:
    """``read`` (of the request's body), given at most ``--body-timeout`` seconds (no
    timer at all for a body that has already arrived whole)."""
    if request.content.is_eof():
        return await read
    try:
        async with asyncio.timeout(request.app[SETTINGS].body_timeout):
            return await read
    except TimeoutError:
        raise errors.RequestTimeout() from None


async def message_body(request: web.Request) -> Body:
    """The posted message: a form's ``msg`` field (served as text/plain), else the raw
    body with its content type, else ``msg`` from the query string. Never reads more than
    the limit allows, nor for longer than the body deadline."""
    return await within_deadline(request, _message_body(request))


async def _message_body(request: web.Request) -> Body:
    max_size = request.app[SETTINGS].max_size
    fields: dict[str, str] = {}
    if not request.body_exists:
        data, kind = _query_message(request), "text/plain"
    elif is_form(request):
        (data, fields), kind = await _read_form(request, max_size), "text/plain"
    else:
        kind = content_type(request.headers.get(hdrs.CONTENT_TYPE, "text/plain"))
        if (request.content_length or 0) > max_size:
            raise _too_large(max_size)
        raw = await read_limited(request, max_size)
        if raw is None:
            raise _too_large(max_size)
        data = raw
    if len(data) > max_size:
        raise _too_large(max_size)
    return Body(data, kind, fields)


async def option_values(request: web.Request) -> dict[str, str]:
    """Option values from the query string and a form body (the form wins)."""
    values = params.query(request)
    if request.body_exists and is_form(request):
        values.update((await within_deadline(request, _read_form(request, FORM_OVERHEAD)))[1])
    return values


def require_content(body: Body) -> None:
    if not body.data:
        raise errors.EmptyMessage()
