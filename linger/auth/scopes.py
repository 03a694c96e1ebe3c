"""Scopes: what a token may do, as ``<action>:<pattern>`` strings.

Actions: ``produce`` (add, publish), ``consume`` (receive, acknowledge, peek), ``manage``
(drain, subscribe, unsubscribe, redrive), ``read`` (stats, lists, metrics) and ``admin``
(every action). A pattern is a glob over channel and topic names in which ``*`` stands
for any run of characters (dots included) and every other character for itself: names
may hold any printable character, so there is no escape and no other wildcard; a name
with a literal ``*`` is matched by the ``*`` of a pattern. ``*`` alone is every name.

The same pattern is matched in Python (names in a request) and in SQL (a message's
channel, in the statement that acts on it): ``Patterns`` gives both renditions.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property

ACTIONS = ("produce", "consume", "manage", "read", "admin")
ADMIN = "admin"
# What listings show: the names a token may do one of these with.
LISTED = ("read", "consume", "produce")
EVERY_NAME = "*"
PATTERN_LENGTH = 250


class InvalidScope(ValueError):
    """A scope string that is not ``<action>:<pattern>``."""


def parse(text: str) -> tuple[str, str]:
    """(action, pattern) of scope ``text``; ``InvalidScope`` saying what is wrong."""
    action, colon, pattern = text.partition(":")
    if not colon:
        raise InvalidScope(f"scope {text!r} is not <action>:<pattern>")
    if action not in ACTIONS:
        known = ", ".join(ACTIONS)
        raise InvalidScope(f"scope {text!r}: unknown action {action!r} (one of {known})")
    if not 1 <= len(pattern) <= PATTERN_LENGTH:
        raise InvalidScope(f"scope {text!r}: a pattern has 1 to {PATTERN_LENGTH} characters")
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in pattern):
        raise InvalidScope(f"scope {text!r}: the pattern has a control or undecodable character")
    if pattern != pattern.strip():
        # Names may start or end with a space; a scope that does is a typo far more often.
        raise InvalidScope(f"scope {text!r}: the pattern starts or ends with a space")
    return action, pattern


@dataclass(frozen=True)
class Patterns:
    """The patterns one action is allowed on (admin's included)."""

    globs: tuple[str, ...]

    @property
    def everything(self) -> bool:
        return EVERY_NAME in self.globs

    @property
    def nothing(self) -> bool:
        return not self.globs

    def allows(self, name: str) -> bool:
        return self.everything or any(match(name) for match in self._matchers)

    @cached_property
    def _matchers(self) -> tuple[Callable[[str], bool], ...]:
        return tuple(matcher(glob) for glob in self.globs)

    def like(self) -> list[str]:
        """The globs as LIKE patterns (backslash escapes ``%``, ``_`` and itself)."""
        table = str.maketrans({"\\": "\\\\", "%": "\\%", "_": "\\_", "*": "%"})
        return [glob.translate(table) for glob in self.globs]

    def glob(self) -> list[str]:
        """The globs as SQLite GLOB patterns (``?`` and ``[`` stand for themselves)."""
        table = str.maketrans({"?": "[?]", "[": "[[]"})
        return [glob.translate(table) for glob in self.globs]


class Grant:
    """What a token's scopes allow, by action."""

    def __init__(self, scopes: Iterable[str]) -> None:
        self.scopes = tuple(scopes)
        parsed = [parse(scope) for scope in self.scopes]
        admin = [pattern for action, pattern in parsed if action == ADMIN]
        self._by_action = {
            action: Patterns(_simplest(admin + [p for a, p in parsed if a == action]))
            for action in ACTIONS
        }

    def patterns(self, action: str) -> Patterns:
        return self._by_action[action]

    def allows(self, action: str, name: str) -> bool:
        return self._by_action[action].allows(name)

    def allows_everything(self, action: str) -> bool:
        return self._by_action[action].everything

    def lists(self, name: str) -> bool:
        """Whether a listing shows ``name``: the token may read, consume or produce it."""
        return self._listed.allows(name)

    @property
    def lists_everything(self) -> bool:
        return self._listed.everything

    @cached_property
    def _listed(self) -> Patterns:
        globs = [g for action in LISTED for g in self._by_action[action].globs]
        return Patterns(_simplest(globs))


def matcher(glob: str) -> Callable[[str], bool]:
    """``matches`` for one glob, with the common shapes as string methods: no star, one
    at the end (``orders.*``), at the start (``*.dead``), or both."""
    stars = glob.count("*")
    if stars == 0:
        return glob.__eq__
    head, _star, tail = glob.partition("*")
    if stars == 1:
        least = len(head) + len(tail)
        return lambda name: len(name) >= least and name.startswith(head) and name.endswith(tail)
    return lambda name: matches(glob, name)


def matches(glob: str, name: str) -> bool:
    """Whether ``name`` matches ``glob`` (``*``: any run of characters). Linear in the
    two lengths' product at worst, whatever the stars: a star only ever moves forward, so
    no pattern backtracks exponentially (as a regular expression of many ``.*`` can)."""
    g = n = 0
    star, resume = -1, 0
    while n < len(name):
        if g < len(glob) and glob[g] != "*" and glob[g] == name[n]:
            g, n = g + 1, n + 1
        elif g < len(glob) and glob[g] == "*":
            star, resume = g, n
            g += 1
        elif star >= 0:
            resume += 1
            g, n = star + 1, resume
        else:
            return False
    return all(char == "*" for char in glob[g:])


def _simplest(globs: list[str]) -> tuple[str, ...]:
    """The globs without repeats, or ``*`` alone when one of them is ``*``."""
    return (EVERY_NAME,) if EVERY_NAME in globs else tuple(dict.fromkeys(globs))
