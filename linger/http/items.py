"""Batch request bodies: a JSON array or NDJSON of messages, parsed as it is read.

The body is read in chunks and each item is decoded as soon as it is whole, so a batch
costs about its messages' bytes and never a copy of the whole body beside them; a body
past ``--max-batch-bytes`` is refused (413) as soon as it gets there. The batch bodies
being read at once share one byte budget (``budget.BUDGET_BATCHES`` batches of the
largest size): a request takes bytes from it as they arrive, and waits for room (its
client waits too, the rest of the body left unread in the socket) while other batches
hold it all; the oldest batch being read never waits, so the batches under way finish.
Parsing yields to the event loop between chunks, so other clients are served meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import hdrs, web

from linger import errors
from linger.config import Settings
from linger.http import bodies, params
from linger.http.budget import Budget, Share
from linger.store.records import NewMessage, Options

NDJSON = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")
_JSON = ("", "application/json")
_FIELDS = frozenset(
    (
        "body",
        "encoding",
        "content_type",
        "priority",
        "timeout",
        "deliver",
        "linger",
        "delay",
        "dead",
    )
)
_OPTIONS = ("priority", "timeout", "deliver", "linger", "delay", "dead")
# An item with no other fields takes the batch's options (the query string's) as they are.
_PLAIN = frozenset(("body", "encoding", "content_type"))
_WHITESPACE = " \t\n\r"
# Room in one item's JSON for the fields beside its body.
_ITEM_OVERHEAD = 64 * 1024


def _json_integer(digits: str) -> int:
    """A JSON integer; past 20 digits, one that every range check refuses (never
    converted: Python refuses more than 4,300 digits, and is quadratic up to that)."""
    if len(digits) > 20:
        return -(2**64) if digits.startswith("-") else 2**64
    return int(digits)


_DECODER = json.JSONDecoder(parse_int=_json_integer)


def parse_json(text: str | bytes) -> Any:
    """A JSON document (``ValueError`` or ``RecursionError`` when it is not one), its
    integers bounded as ``_json_integer`` says."""
    return _DECODER.decode(text if isinstance(text, str) else text.decode("utf-8"))


_CHUNK = 65536


class _Reader:
    """Reads the body in chunks of at most 64 KiB, each counted against the limit and
    taken from the batches' shared budget."""

    def __init__(self, request: web.Request, limit: int, share: Share) -> None:
        self._request = request
        self._limit = limit
        self._share = share
        self.read = 0

    async def chunk(self) -> bytes:
        """The next chunk, b"" at the end of the body, taken from the budget once it has
        arrived (room taken before reading would let clients that send nothing hold it)."""
        data = await self._request.content.read(_CHUNK)
        self.read += len(data)
        if self.read > self._limit:
            raise errors.MessageTooLarge(f"Request body is larger than {self._limit} bytes.")
        await self._share.take(len(data))
        # Reading a buffered body does not yield: let other clients in between chunks.
        await asyncio.sleep(0)
        return data


@asynccontextmanager
async def reading(
    request: web.Request, settings: Settings, budget: Budget
) -> AsyncIterator[_Reader]:
    """A reader of the batch body, its bytes counted in ``budget`` until the block ends
    (``Budget``: as they arrive; a body waits for room when others hold it all). One that
    is still waiting for room at its body deadline is told to come back (503 with
    Retry-After) rather than that its body came too late."""
    limit = settings.max_batch_bytes
    if (request.content_length or 0) > limit:
        raise errors.MessageTooLarge(f"Request body is larger than {limit} bytes.")
    share = budget.open()
    try:
        yield _Reader(request, limit, share)
    except errors.RequestTimeout:
        if share.waiting:
            raise errors.Overloaded("Too many large batches at once, try again later.") from None
        raise
    finally:
        share.close()


def _label(ndjson: bool, index: int) -> str:
    return f"Line {index}" if ndjson else f"Item {index}"


def item_limit(max_size: int) -> int:
    """The most JSON text of one item: every byte of its body escaped (``\\u0001``), and
    its other fields."""
    return 6 * max_size + _ITEM_OVERHEAD


def _too_large(label: str, max_size: int) -> errors.MessageTooLarge:
    return errors.MessageTooLarge(f"{label}: Message is larger than {max_size} bytes.")


def _decoded(decode: Any, text: Any, label: str) -> Any:
    """``decode(text)``, any failure (nesting too deep included) an error naming ``label``."""
    try:
        return decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise errors.InvalidParameter(f"{label}: Invalid JSON.") from error


async def _json_items(reader: _Reader, max_size: int) -> AsyncIterator[tuple[int, Any]]:
    """(index, value) of each element of a JSON array, counted from 0."""
    decode = codecs.getincrementaldecoder("utf-8")()
    text, pos, eof = "", 0, False
    # Text read but not yet joined to ``text``: an item that arrives in many small chunks
    # is joined once per attempt at it, not once per chunk (no quadratic copying).
    parts: list[str] = []
    waiting = 0
    index, state = 0, "start"  # start, first, item, after, end
    tried = 0  # text after pos at the last incomplete attempt at an item

    async def more() -> None:
        nonlocal eof, waiting
        data = await reader.chunk()
        try:
            chunk = decode.decode(data, final=not data)
        except UnicodeDecodeError:
            raise errors.InvalidParameter("Invalid UTF-8 in the batch.") from None
        parts.append(chunk)
        waiting += len(chunk)
        eof = not data

    def join() -> None:
        nonlocal text, pos, waiting
        text, pos, waiting = text[pos:] + "".join(parts), 0, 0
        parts.clear()

    while True:
        while pos < len(text) and text[pos] in _WHITESPACE:
            pos += 1
        if pos == len(text):
            if parts:
                join()
            elif eof:
                break
            else:
                await more()
            continue
        char = text[pos]
        if state == "start":
            if char != "[":
                raise errors.InvalidParameter("Invalid batch: expected a JSON array.")
            pos, state = pos + 1, "first"
        elif state in ("first", "item"):
            if state == "first" and char == "]":
                pos, state = pos + 1, "end"
                continue
            # An item is decoded once it is whole: after each chunk while it is not, with
            # at least as much text again as the last try (no quadratic re-parsing).
            if not eof and len(text) - pos + waiting < 2 * tried:
                await more()
                continue
            join()
            try:
                value, end = _DECODER.raw_decode(text, pos)
            except RecursionError as error:
                raise errors.InvalidParameter(f"Item {index}: Invalid JSON.") from error
            except json.JSONDecodeError as error:
                if eof:
                    raise errors.InvalidParameter(f"Item {index}: Invalid JSON.") from error
                if len(text) - pos > item_limit(max_size):
                    raise _too_large(f"Item {index}", max_size) from None
                tried = len(text) - pos
                await more()
                continue
            tried = 0
            yield index, value
            index, pos, state = index + 1, end, "after"
        elif state == "after":
            if char == ",":
                pos, state = pos + 1, "item"
            elif char == "]":
                pos, state = pos + 1, "end"
            else:
                raise errors.InvalidParameter(f"Item {index}: Invalid JSON.")
        else:
            raise errors.InvalidParameter("Invalid batch: text after the JSON array.")
    if state != "end":
        raise errors.InvalidParameter(
            "Invalid batch: expected a JSON array."
            if state == "start"
            else f"Item {index}: Invalid JSON."
        )


async def _ndjson_items(reader: _Reader, max_size: int) -> AsyncIterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line, counted from 1."""
    # The line under way, in the chunks it came in: each chunk is searched for line ends
    # once, and a long line joined once (no quadratic copying of a trickled line).
    partial: list[bytes] = []
    partial_size = 0
    number = 0
    while True:
        data = await reader.chunk()
        lines = data.split(b"\n") if data else [b""]
        if data and len(lines) == 1:
            partial.append(data)
            partial_size += len(data)
            if partial_size > item_limit(max_size):
                raise _too_large(f"Line {number + 1}", max_size)
            continue
        lines[0] = b"".join([*partial, lines[0]])
        rest = lines.pop() if data else b""
        partial, partial_size = [rest], len(rest)
        if partial_size > item_limit(max_size):
            raise _too_large(f"Line {number + len(lines) + 1}", max_size)
        for line in lines:
            number += 1
            if line.strip():
                yield number, _decoded(parse_json, line, f"Line {number}")
        if not data:
            return


def _option_values(item: dict[str, Any]) -> dict[str, str]:
    """An item's options as the query string would give them (JSON null: not given)."""
    values: dict[str, str] = {}
    for key in _OPTIONS:
        value = item.get(key)
        if value is None:
            continue
        kinds = str if key == "dead" else int | str
        if isinstance(value, bool) or not isinstance(value, kinds):
            value = "\x00"  # not a valid value of any option
        values[key] = str(value)
    return values


def message(
    item: Any,
    label: str,
    defaults: dict[str, str],
    channel: str | None,
    max_size: int,
    base: Options | None = None,
) -> NewMessage:
    """The message an item describes; ``InvalidParameter`` (400) or ``MessageTooLarge``
    (413) naming ``label`` when it is not a valid one. ``base``: the options of
    ``defaults``, for an item that gives none of its own."""
    if not isinstance(item, dict):
        raise errors.InvalidParameter(f"{label}: An item must be a JSON object.")
    own_options = not item.keys() <= _PLAIN
    if own_options:
        unknown = item.keys() - _FIELDS
        if unknown:
            name = json.dumps(sorted(unknown)[0])
            raise errors.InvalidParameter(f"{label}: Unknown field {name}.")
    text = item.get("body")
    if not isinstance(text, str):
        raise errors.InvalidParameter(f"{label}: An item needs a body (a string).")
    encoding = item.get("encoding", "utf-8")
    if encoding == "utf-8":
        try:
            body = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escaped in the JSON
            raise errors.InvalidParameter(f"{label}: Invalid UTF-8 in the body.") from None
        kind = "text/plain"
    elif encoding == "base64":
        try:
            body = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise errors.InvalidParameter(f"{label}: Invalid base64.") from None
        kind = "application/octet-stream"
    else:
        raise errors.InvalidParameter(f"{label}: Invalid encoding.")
    if not body:
        raise errors.InvalidParameter(f"{label}: {errors.EmptyMessage.__doc__}")
    if len(body) > max_size:
        raise _too_large(label, max_size)
    given = item.get("content_type")
    try:
        if given is not None:
            if not isinstance(given, str):
                raise errors.InvalidParameter("Invalid content type.")
            kind = bodies.content_type(given, kind)
        if channel is None:  # published: the subscriptions' options apply
            return NewMessage(body, kind)
        if base is not None and not own_options:
            return NewMessage(body, kind, base)
        options = params.options({**defaults, **_option_values(item)}, channel)
    except errors.InvalidParameter as error:
        raise errors.InvalidParameter(f"{label}: {error}") from None
    return NewMessage(body, kind, options)


async def read_batch(
    reader: _Reader,
    request: web.Request,
    settings: Settings,
    defaults: dict[str, str],
    channel: str | None,
    base: Options | None = None,
) -> list[NewMessage]:
    """The messages of a batch add (``channel``) or publish (None), the query-string
    options ``defaults`` (parsed: ``base``) of every item; all valid, or an error naming
    the first bad one.
    Their bytes stay counted in the budget until ``reading`` ends."""
    kind = request.content_type if hdrs.CONTENT_TYPE in request.headers else ""
    ndjson = kind in NDJSON
    if not ndjson and kind not in _JSON:
        raise errors.UnsupportedMediaType()
    batch: list[NewMessage] = []
    items = (_ndjson_items if ndjson else _json_items)(reader, settings.max_size)
    async for index, item in items:
        if len(batch) == settings.max_batch:
            raise errors.InvalidParameter("Too many items.")
        label = _label(ndjson, index)
        batch.append(message(item, label, defaults, channel, settings.max_size, base))
    if not batch:
        raise errors.InvalidParameter("No messages.")
    return batch
