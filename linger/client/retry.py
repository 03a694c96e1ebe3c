"""When to try a request again: capped exponential backoff with full jitter, and the
server's Retry-After."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


@dataclass(frozen=True, slots=True)
class Retry:
    """``attempts`` tries in all (1: never again). Before try k+1 the client sleeps a
    random time between 0 and ``min(cap, base * 2**k)`` seconds (full jitter), or what the
    server's Retry-After says (a Retry-After of 0 gets the backoff all the same); a
    Retry-After longer than ``longest`` is not waited for: the error is raised at once."""

    attempts: int = 5
    base: float = 0.1
    cap: float = 5.0
    longest: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to sleep after failed try ``attempt`` (counted from 0), or None when
        there is to be no further try."""
        if attempt + 1 >= self.attempts:
            return None
        if retry_after is not None and retry_after > 0:
            return retry_after if retry_after <= self.longest else None
        return random.uniform(0, min(self.cap, self.base * 2**attempt))


NEVER = Retry(attempts=1)


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """The seconds of a Retry-After header (delay-seconds or an HTTP date), or None when
    there is none or it cannot be read."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
