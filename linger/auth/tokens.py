"""Token secrets: how they are made, recognised and hashed.

A secret is ``lgr_`` and 43 URL-safe base64 characters: 256 bits from ``secrets``. Only
its SHA-256 digest is stored, and a token is looked up by that digest. A fast hash is the
right one here: slow password hashes (bcrypt, argon2) exist to make guessing a
low-entropy password expensive, and nobody guesses 256 random bits; a fast hash keeps the
lookup of an uncached token at a few microseconds. Looking the digest up in an index (no
comparison of secrets in Python) leaves no timing oracle: what a timing could reveal is
where a digest falls in the index, and a digest says nothing about a secret.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

PREFIX = "lgr_"
_SECRET_BYTES = 32
_WELL_FORMED = re.compile(PREFIX + r"[A-Za-z0-9_-]{43}")


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(_SECRET_BYTES)


def well_formed(text: str) -> bool:
    """Whether ``text`` can be a secret at all: anything else is refused unlooked-up."""
    return _WELL_FORMED.fullmatch(text) is not None


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


@dataclass(frozen=True, slots=True)
class Token:
    """A token as stored (times in epoch milliseconds; None: never)."""

    id: int
    name: str
    scopes: tuple[str, ...]
    created_at: int
    expires_at: int | None
    revoked_at: int | None
    last_used_at: int | None

    def valid_at(self, now_ms: int) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now_ms < self.expires_at)
