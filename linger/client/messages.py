"""What the client returns: delivered messages, acknowledgement outcomes and counts, read
from the server's ``x-linger-*`` headers or JSON objects."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from linger.client.errors import InvalidResponse


@dataclass(frozen=True, slots=True)
class Message:
    """A message as delivered (``lease`` set) or looked at by a peek (``lease`` None).

    ``delivered`` counts the deliveries so far, this one included; ``received`` is the
    whole seconds since it was added; ``topic`` is None unless it came from a topic, and
    ``dead_from`` / ``dead_reason`` are set on a dead letter (``deliveries`` or
    ``rejected``)."""

    id: int
    lease: str | None
    channel: str
    body: bytes
    content_type: str
    priority: int
    timeout: int
    deliver: int
    delivered: int
    received: int
    linger: int
    topic: str | None = None
    dead_from: str | None = None
    dead_reason: str | None = None

    def text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.body.decode(encoding, errors)

    def json(self) -> Any:
        """The body parsed as JSON (``ValueError`` when it is not)."""
        return json.loads(self.body)

    def to_json(self) -> dict[str, Any]:
        """The message as the server's JSON message object shows it (the body as text
        when it is UTF-8, else base64)."""
        try:
            body, encoding = self.body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            body, encoding = base64.b64encode(self.body).decode("ascii"), "base64"
        shown: dict[str, Any] = {"id": self.id}
        if self.lease is not None:
            shown["lease"] = self.lease
        shown.update(
            channel=self.channel,
            priority=self.priority,
            timeout=self.timeout,
            deliver=self.deliver,
            delivered=self.delivered,
            received=self.received,
            linger=self.linger,
            topic=self.topic or "",
            content_type=self.content_type,
            body=body,
            encoding=encoding,
            dead_from=self.dead_from,
            dead_reason=self.dead_reason,
        )
        return shown


@dataclass(frozen=True, slots=True)
class Acknowledged:
    """What a batch acknowledgement did: ``done`` the ids it acted on, ``stale`` the
    leases that are no longer current, ``missing`` the leases or ids of messages that are
    gone."""

    done: list[int]
    stale: list[str]
    missing: list[str | int]


@dataclass(frozen=True, slots=True)
class ChannelStats:
    """A channel's counts, 1.0.1 style: ``hidden`` counts delayed messages too."""

    ready: int
    hidden: int


@dataclass(frozen=True, slots=True)
class ChannelDetail:
    """A channel's counts by state (``hidden``: leased only), the age in seconds of its
    oldest ready message (0 when none) and the channels whose dead letters it holds."""

    ready: int
    hidden: int
    delayed: int
    oldest_ready_age: int
    dead_from: list[str]


@dataclass(frozen=True, slots=True)
class Item:
    """One message of a batch add or publish; options left None take the request's
    defaults (a publish ignores them: each copy takes its subscription's)."""

    body: bytes | str
    content_type: str | None = None
    priority: int | None = None
    timeout: int | None = None
    deliver: int | None = None
    linger: int | None = None
    delay: int | None = None
    dead: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON item: text as UTF-8, bytes as base64."""
        if isinstance(self.body, str):
            shown: dict[str, Any] = {"body": self.body}
        else:
            shown = {"body": base64.b64encode(self.body).decode("ascii"), "encoding": "base64"}
        for key in ("content_type", "priority", "timeout", "deliver", "linger", "delay", "dead"):
            value = getattr(self, key)
            if value is not None:
                shown[key] = value
        return shown


# What the server percent-encodes in a header: the UTF-8 bytes of what is not printable
# ASCII (a name's own "%41" is sent as it is). A run of encoded bytes above 0x7F.
_ENCODED = re.compile(r"(?:%[89A-Fa-f][0-9A-Fa-f])+")


def _decoded(run: re.Match[str]) -> str:
    try:
        return unquote(run.group(0), errors="strict")
    except UnicodeDecodeError:
        return run.group(0)


def header_name(value: str | None) -> str | None:
    """A channel or topic name as a header carries it: its characters outside printable
    ASCII percent-encoded as UTF-8, the rest verbatim (a ``%`` included), so that only
    the encoded UTF-8 sequences are decoded. A name that itself holds such a sequence
    (``%C3%A9``) cannot be told from an encoded one: batch receives and peeks carry names
    exactly."""
    if value is None or "%" not in value:
        return value
    return _ENCODED.sub(_decoded, value)


def _integer(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise InvalidResponse(200, f"Invalid {what} in the answer: {value!r}")
    try:
        return int(str(value))
    except ValueError:
        raise InvalidResponse(200, f"Invalid {what} in the answer: {value!r}") from None


def from_headers(headers: Mapping[str, str], body: bytes, channel: str) -> Message:
    """The message of a single delivery: its body and ``x-linger-*`` headers."""

    def get(name: str) -> str:
        value = headers.get(f"x-linger-{name}")
        if value is None:
            raise InvalidResponse(200, f"The delivery has no x-linger-{name} header.")
        return value

    def number(name: str) -> int:
        return _integer(get(name), f"x-linger-{name}")

    return Message(
        id=number("msg-id"),
        lease=headers.get("x-linger-lease"),
        channel=channel,
        body=body,
        content_type=headers.get("Content-Type", "text/plain"),
        priority=number("priority"),
        timeout=number("timeout"),
        deliver=number("deliver"),
        delivered=number("delivered"),
        received=number("received"),
        linger=number("linger"),
        topic=header_name(headers.get("x-linger-topic")) or None,
        dead_from=header_name(headers.get("x-linger-dead-from")),
        dead_reason=headers.get("x-linger-dead-reason"),
    )


def from_json(item: object) -> Message:
    """A message of a batch receive or a peek: the JSON message object."""
    if not isinstance(item, dict):
        raise InvalidResponse(200, "A message in the answer is not a JSON object.")
    body = item.get("body")
    if not isinstance(body, str):
        raise InvalidResponse(200, "A message in the answer has no body.")
    if item.get("encoding") == "base64":
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidResponse(200, "A message body in the answer is not base64.") from None
    else:
        data = body.encode("utf-8", "surrogatepass")
    lease = item.get("lease")
    return Message(
        id=_integer(item.get("id"), "message id"),
        lease=str(lease) if lease is not None else None,
        channel=str(item.get("channel", "")),
        body=data,
        content_type=str(item.get("content_type") or "text/plain"),
        priority=_integer(item.get("priority", 0), "priority"),
        timeout=_integer(item.get("timeout", 0), "timeout"),
        deliver=_integer(item.get("deliver", 0), "deliver"),
        delivered=_integer(item.get("delivered", 0), "delivered"),
        received=_integer(item.get("received", 0), "received"),
        linger=_integer(item.get("linger", 0), "linger"),
        topic=str(item["topic"]) if item.get("topic") else None,
        dead_from=str(item["dead_from"]) if item.get("dead_from") is not None else None,
        dead_reason=str(item["dead_reason"]) if item.get("dead_reason") is not None else None,
    )
