"""Request parsing: names, integers, message options and the query string."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, unquote_to_bytes

from aiohttp import web

from linger import errors
from linger.store import leases
from linger.store.db import NAME_LENGTH
from linger.store.records import Options

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INTEGER = re.compile(r"[+-]?[0-9]+")
_INT64_DIGITS = len(str(INT64_MAX))
# Literal characters allowed in a request path; any other does not match a route.
_PATH = re.compile(r"[A-Za-z0-9_\-%.~/]*")


def path_allowed(raw_path: str) -> bool:
    return _PATH.fullmatch(raw_path) is not None


def integer(text: str) -> int | None:
    """An ASCII decimal integer within the signed 64-bit range, or None."""
    if not _INTEGER.fullmatch(text):
        return None
    sign, digits = ("-", text[1:]) if text[0] == "-" else ("", text.lstrip("+"))
    digits = digits.lstrip("0") or "0"
    if len(digits) > _INT64_DIGITS:
        # Past 19 significant digits, it is out of range: never converted (Python refuses
        # to convert more than 4,300 digits, leading zeros included, and is quadratic).
        return None
    value = int(sign + digits)
    return value if INT64_MIN <= value <= INT64_MAX else None


# Unicode's control characters (category Cc) and surrogates (Cs).
_NOT_IN_NAMES = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def valid_name(value: str) -> bool:
    """1 to 250 characters, none of them a control character nor half of a surrogate
    pair (a JSON string may escape one alone, and no database can store it)."""
    return 1 <= len(value) <= NAME_LENGTH and _NOT_IN_NAMES.search(value) is None


def name(request: web.Request, segment: int, kind: str) -> str:
    """The percent-decoded channel or topic name at path ``segment``."""
    raw = request.rel_url.raw_path.split("/")[segment]
    try:
        value = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise errors.InvalidParameter(f"Invalid {kind} name.") from None
    if not valid_name(value):
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


def flag(request: web.Request, key: str) -> bool:
    """``key`` present with no value or any value but 0/false/no."""
    if key not in request.query:
        return False
    return request.query.getall(key)[-1].strip().lower() not in ("0", "false", "no")


def nowait(request: web.Request) -> bool:
    return flag(request, "nowait")


def bounded(value: str | None, default: int, low: int, high: int, text: str) -> int:
    """An integer parameter between ``low`` and ``high``, ``default`` when absent;
    ``InvalidParameter(text)`` otherwise."""
    if value is None:
        return default
    number = integer(value)
    if number is None or not low <= number <= high:
        raise errors.InvalidParameter(text)
    return number


def wait(request: web.Request, poll_max: float) -> float:
    """How long a GET may long-poll: 0 with ``nowait``, else ``wait`` (0 to --poll-max
    whole seconds), else --poll-max."""
    if nowait(request):
        return 0.0
    if "wait" not in request.query:
        return poll_max
    return float(bounded(request.query["wait"], 0, 0, int(poll_max), "Invalid wait."))


def batch_size(request: web.Request, max_batch: int, default: int = 10) -> int:
    return bounded(
        request.query.get("n"), min(default, max_batch), 1, max_batch, "Invalid batch size."
    )


_OPTION_RULES: tuple[tuple[str, int, int, str], ...] = (
    ("priority", 0, INT64_MIN, "Invalid message priority."),
    ("timeout", 30, 1, "Invalid message visibility timeout."),
    ("deliver", 0, 0, "Invalid message delivery limit."),
    ("linger", 0, 0, "Invalid message retention period."),
    ("delay", 0, 0, "Invalid message delay."),
)
_INVALID_DEAD = "Invalid dead-letter channel."
_OPTION_KEYS = frozenset(rule[0] for rule in _OPTION_RULES) | {"dead"}
_DEFAULT_OPTIONS = Options()


def option(request: web.Request, key: str) -> int | None:
    """A message option given alone in the query string (touch's ``timeout``, release's
    ``delay``), checked as for add; None when absent."""
    value = request.query.get(key)
    if value is None:
        return None
    _key, default, low, text = next(rule for rule in _OPTION_RULES if rule[0] == key)
    return bounded(value, default, low, INT64_MAX, text)


def options(values: Mapping[str, str], channel: str) -> Options:
    """Message options from ``values`` for a message of ``channel``, checked in the
    documented order (``dead`` last: a channel name, not ``channel`` itself)."""
    if _OPTION_KEYS.isdisjoint(values):
        return _DEFAULT_OPTIONS
    parsed: dict[str, int] = {}
    for key, default, low, text in _OPTION_RULES:
        parsed[key] = bounded(values.get(key), default, low, INT64_MAX, text)
    dead = values.get("dead")
    if dead is not None and (not valid_name(dead) or dead == channel):
        raise errors.InvalidParameter(_INVALID_DEAD)
    return Options(**parsed, dead=dead)


# Query parameters that carry names: decoded strictly, like names in the path.
_NAME_KEYS = ("dead", "to")


def query(request: web.Request) -> dict[str, str]:
    """The query string as a dict; a repeated key takes its last value. Names that are
    not valid UTF-8 come out invalid (a control character), not with U+FFFD in them."""
    values = dict(request.query.items())
    for key in _NAME_KEYS:
        if key in values:
            values[key] = _strict(request, key)
    return values


def _strict(request: web.Request, key: str) -> str:
    raw = [
        v
        for k, v in parse_qsl(
            request.rel_url.raw_query_string, keep_blank_values=True, errors="surrogateescape"
        )
        if k == key
    ]
    value = raw[-1] if raw else ""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "\x00"  # not valid UTF-8: no name
    return value


def name_option(request: web.Request, key: str, text: str) -> str | None:
    """A channel name given as query parameter ``key``; ``InvalidParameter(text)`` when it
    is not a valid name."""
    if key not in request.query:
        return None
    value = _strict(request, key)
    if not valid_name(value):
        raise errors.InvalidParameter(text)
    return value


def lease(request: web.Request, message_id: int) -> int | None:
    """The lease value of the ``lease`` parameter (a token of this message), or None."""
    token = request.query.get("lease")
    return None if token is None else leases.nonce_of(token, message_id)
