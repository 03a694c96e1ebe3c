"""Response helpers shared by the handlers: JSON errors and header-safe values."""

from __future__ import annotations

from urllib.parse import quote

from aiohttp import web

# Every response's Server header: no version banner.
SERVER = "Linger"
# Header values are ASCII: names and texts outside it are written percent-encoded.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F))


def header_value(text: str) -> str:
    return quote(text, safe=_HEADER_SAFE)


def error_response(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    """The JSON error ``{"error": text}``, with the text as reason phrase."""
    return web.json_response(
        {"error": text}, status=status, reason=header_value(text), headers=headers
    )
