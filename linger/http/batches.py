"""Handlers of batches: add and publish many, receive many, and delete, touch, release
or reject many by lease. Each batch is one transaction: all of it, or (after any 4xx)
none of it."""

from __future__ import annotations

from typing import Any

from aiohttp import hdrs, web

from linger import errors
from linger.http import access, bodies, items, params, server
from linger.http.keys import BATCH_BUDGET, SETTINGS, broker_of
from linger.http.objects import messages_response
from linger.http.responses import json_response
from linger.store import leases
from linger.store.batches import Named
from linger.store.records import DONE, MISSING, STALE

# Bytes of one item of an acknowledgement body, at most ("<19 digits>.<19 digits>", ).
_ITEM_BYTES = 48
_ACK_OVERHEAD = 4096


async def post_messages(request: web.Request) -> web.Response:
    channel = params.channel(request)
    defaults = params.query(request)
    base = params.options(defaults, channel)  # a bad default is the request's error
    settings = request.app[SETTINGS]
    async with items.reading(request, settings, request.app[BATCH_BUDGET]) as reader:
        read = items.read_batch(reader, request, settings, defaults, channel, base)
        batch = await bodies.within_deadline(request, read)
        access.require(request, "produce", (m.options.dead for m in batch if m.options))
        ids = await broker_of(request).add_many(channel, batch)
    return json_response({"ids": ids}, status=202)


async def publish_messages(request: web.Request) -> web.Response:
    topic = params.topic(request, 2)
    settings = request.app[SETTINGS]
    async with items.reading(request, settings, request.app[BATCH_BUDGET]) as reader:
        read = items.read_batch(reader, request, settings, {}, None)
        batch = await bodies.within_deadline(request, read)
        published = await broker_of(request).publish_many(topic, batch)
    shown = [await access.shown(request, ids) for ids in published]
    return json_response({"messages": shown}, status=202)


async def get_messages(request: web.Request) -> web.StreamResponse:
    channel = params.channel(request)
    settings = request.app[SETTINGS]
    wait = params.wait(request, settings.poll_max)
    n = params.batch_size(request, settings.max_batch)
    broker = broker_of(request)
    budget = (settings.max_batch_bytes, settings.max_size)
    with access.lasting(request, server.connected(request)) as alive:
        delivered = await broker.receive(channel, n, wait=wait, alive=alive, budget=budget)
    return await messages_response(request, delivered, broker.storage.now())


async def _acknowledgement(request: web.Request) -> dict[str, Any]:
    """The JSON object of an acknowledgement body, read within its bound."""
    kind = request.content_type if hdrs.CONTENT_TYPE in request.headers else ""
    if kind not in ("", "application/json"):
        raise errors.UnsupportedMediaType()
    limit = ack_limit(request)
    if (request.content_length or 0) > limit:
        raise errors.MessageTooLarge(f"Request body is larger than {limit} bytes.")
    raw = await bodies.within_deadline(request, bodies.read_limited(request, limit))
    if raw is None:
        raise errors.MessageTooLarge(f"Request body is larger than {limit} bytes.")
    try:
        value = items.parse_json(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise errors.InvalidParameter("Invalid JSON.") from None
    if not isinstance(value, dict):
        raise errors.InvalidParameter("Invalid JSON: expected an object.")
    return value


def ack_limit(request: web.Request) -> int:
    """The most bytes of an acknowledgement body: ``--max-batch`` leases and options."""
    return request.app[SETTINGS].max_batch * _ITEM_BYTES + _ACK_OVERHEAD


def _named(body: dict[str, Any], max_batch: int, *, ids: bool) -> tuple[list[Named], list[Any]]:
    """The messages a body names, each once (a token given twice counts once), and the
    values as given (to answer with)."""
    key = "ids" if ids else "leases"
    given = body.get(key)
    if not isinstance(given, list):
        wanted = '"leases" (or "ids")' if ids else '"leases"'
        raise errors.InvalidParameter(f"Invalid batch: {wanted} must be a list.")
    if not given:
        raise errors.InvalidParameter("No messages.")
    if len(given) > max_batch:
        raise errors.InvalidParameter("Too many items.")
    named: dict[int, int | None] = {}
    shown: list[Any] = []
    for index, value in enumerate(given):
        if ids:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise errors.InvalidParameter(f"Item {index}: Invalid message id.")
            message_id, nonce = value, None
        else:
            if not isinstance(value, str):
                raise errors.InvalidParameter(f"Item {index}: {errors.InvalidLease.__doc__}")
            try:
                message_id, nonce = leases.parse(value)
            except errors.InvalidLease as error:
                raise errors.InvalidParameter(f"Item {index}: {error}") from None
        if message_id in named:
            if named[message_id] == nonce:
                continue
            raise errors.InvalidParameter(f"Item {index}: Message {message_id} is named twice.")
        named[message_id] = nonce
        shown.append(value)
    return list(named.items()), shown


def _answer(shown: list[Any], named: list[Named], outcomes: list[str]) -> web.Response:
    answer: dict[str, list[Any]] = {DONE: [], STALE: [], MISSING: []}
    for value, (message_id, _nonce), outcome in zip(shown, named, outcomes, strict=True):
        answer[outcome].append(message_id if outcome == DONE else value)
    return json_response(answer)


def _option(body: dict[str, Any], key: str, low: int, text: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**63:
        raise errors.InvalidParameter(text)
    return value


async def _named_in(
    request: web.Request, *, ids: bool = False
) -> tuple[dict[str, Any], list[Named], list[Any]]:
    """The body of an acknowledgement, the messages it names and the values as given;
    with ``ids``, it may name messages by id instead of by lease."""
    body = await _acknowledgement(request)
    named, shown = _named(body, request.app[SETTINGS].max_batch, ids=ids and "leases" not in body)
    return body, named, shown


async def delete_messages(request: web.Request) -> web.Response:
    body, named, shown = await _named_in(request, ids=True)
    outcomes = await broker_of(request).delete_many(
        named, by_lease="leases" in body, scope=access.scope(request, "consume")
    )
    return _answer(shown, named, outcomes)


async def touch_messages(request: web.Request) -> web.Response:
    body, named, shown = await _named_in(request)
    seconds = _option(body, "timeout", 1, "Invalid message visibility timeout.")
    scope = access.scope(request, "consume")
    return _answer(shown, named, await broker_of(request).touch_many(named, seconds, scope))


async def release_messages(request: web.Request) -> web.Response:
    body, named, shown = await _named_in(request)
    delay = _option(body, "delay", 0, "Invalid message delay.") or 0
    scope = access.scope(request, "consume")
    return _answer(shown, named, await broker_of(request).release_many(named, delay, scope))


async def reject_messages(request: web.Request) -> web.Response:
    _body, named, shown = await _named_in(request)
    scope = access.scope(request, "consume")
    return _answer(shown, named, await broker_of(request).reject_many(named, scope))
