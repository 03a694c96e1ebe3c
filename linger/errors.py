"""Domain errors, free of HTTP; ``web`` maps each class to a status code."""

from __future__ import annotations


class LingerError(Exception):
    """Linger error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__)


class InvalidParameter(LingerError):
    """Invalid parameter."""


class EmptyMessage(InvalidParameter):
    """Message is empty."""


class MessageTooLarge(LingerError):
    """Message is too large."""


class UnsupportedEncoding(LingerError):
    """Unsupported content encoding: send the body uncompressed."""


class UnsupportedMediaType(LingerError):
    """Unsupported content type: send application/json or application/x-ndjson."""


class RequestTimeout(LingerError):
    """Request body not received in time."""


class NotFound(LingerError):
    """Message not found."""


class NotHidden(LingerError):
    """Message is not hidden."""


class InvalidLease(InvalidParameter):
    """Invalid lease."""


class LeaseStale(LingerError):
    """Lease is stale."""


class Unauthenticated(LingerError):
    """Authentication required."""


class NotAllowed(LingerError):
    """Not allowed."""


class ChannelFull(LingerError):
    """Channel is at the high-level mark."""


class StorageFull(LingerError):
    """The database is out of space: nothing was stored."""


class Overloaded(LingerError):
    """Too many consumers are waiting, try again later."""


class DatabaseError(LingerError):
    """Internal database error."""


class Unavailable(LingerError):
    """Database unavailable, try again later."""


class Misconfigured(LingerError):
    """The database URL has options its driver does not take."""


class SchemaOutdated(LingerError):
    """The database schema is not at the version this Linger needs."""
