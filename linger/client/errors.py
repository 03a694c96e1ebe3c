"""The client's errors: one class per kind of answer, each carrying the HTTP status and the
server's error text."""

from __future__ import annotations


class LingerError(Exception):
    """A request failed: ``status`` is the HTTP status (0 when no answer came), ``text``
    the server's error text (its ``{"error": ...}``, else its reason phrase)."""

    def __init__(self, status: int, text: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {text}" if status else text)
        self.status = status
        self.text = text
        # Seconds the server asked the client to wait before trying again (503).
        self.retry_after = retry_after


class BadRequest(LingerError):
    """400: the request was refused as invalid (a bad option, name, lease or batch)."""


class Unauthenticated(LingerError):
    """401: no token, or one that is unknown, revoked or expired."""


class NotAllowed(LingerError):
    """403: the token's scopes do not cover the request."""


class NotFound(LingerError):
    """404: the message is gone (or the route does not exist)."""


class Conflict(LingerError):
    """409: the message is not in a state that allows the action."""


class LeaseStale(Conflict):
    """409 ``Lease is stale.``: the message was delivered again, released or rejected
    since this lease was given: someone else may be working on it."""


class NotHidden(Conflict):
    """409 ``Message is not hidden.``: its visibility timeout ran out (or it was never
    delivered)."""


class TooLarge(LingerError):
    """413: a message or request body is larger than the server takes."""


class ChannelFull(LingerError):
    """507: the channel is at the high-level mark (or the database is out of space);
    nothing was stored."""


class ServerError(LingerError):
    """5xx: the server failed to answer the request."""


class Unavailable(ServerError):
    """503: the server cannot serve the request now (database unavailable, too many
    waiting consumers); ``retry_after`` says when to try again."""


class ConnectionFailed(LingerError):
    """No answer: the server could not be reached, the connection broke, or the answer
    took longer than the timeout."""

    def __init__(self, text: str, *, retryable: bool = False) -> None:
        super().__init__(0, text)
        # Whether trying again may help (refused or broken, not timed out).
        self.retryable = retryable


class ClientClosed(LingerError, RuntimeError):
    """The client was closed (a request under way when it was, or one made after), or is
    used from another event loop than its own."""

    def __init__(self, text: str) -> None:
        super().__init__(0, text)


class InvalidResponse(LingerError):
    """The server answered, but not as a Linger server does (a body that is not the
    JSON expected, a delivery without its headers, an answer larger than allowed)."""


_BY_STATUS: dict[int, type[LingerError]] = {
    400: BadRequest,
    401: Unauthenticated,
    403: NotAllowed,
    404: NotFound,
    413: TooLarge,
    503: Unavailable,
    507: ChannelFull,
}
_CONFLICTS: dict[str, type[Conflict]] = {
    "Lease is stale.": LeaseStale,
    "Message is not hidden.": NotHidden,
}


def for_status(status: int, text: str, retry_after: float | None = None) -> LingerError:
    """The error for an answer of ``status`` with the server's ``text``."""
    if status == 409:
        return _CONFLICTS.get(text, Conflict)(status, text)
    kind = _BY_STATUS.get(status) or (ServerError if status >= 500 else LingerError)
    return kind(status, text, retry_after=retry_after)
