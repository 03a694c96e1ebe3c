"""The HTTP side of the client: two aiohttp sessions (one for long-polls, one for every
other request, so that acknowledgements and lease extensions never wait for a connection
behind long-polls), requests with their timeout, bounded answers, retries, and answers
turned into typed errors."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from linger.client import errors
from linger.client.retry import NEVER, Retry, retry_after

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8989"
# The most bytes of one answer the client reads (a batch of 1,000 messages of 256 KiB and
# their JSON, with room to spare); a larger one is an InvalidResponse.
MAX_RESPONSE = 64 * 1024 * 1024
# Error texts are shown on one line, at most this long.
_TEXT_LENGTH = 300


def path_name(name: str) -> str:
    """A channel or topic name as a path segment: every character but ``A-Za-z0-9_.-~``
    percent-encoded (the server decodes it)."""
    return quote(name, safe="")


def base_url(url: str) -> str:
    """``url`` checked to be an http(s) URL with a host, without its trailing slash."""
    try:
        parsed = URL(url)
    except (TypeError, ValueError) as error:
        raise ValueError(f"Invalid Linger URL {url!r}: {error}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"Invalid Linger URL {url!r}: expected http://host[:port]")
    if parsed.query_string or parsed.fragment:
        raise ValueError(f"Invalid Linger URL {url!r}: no query or fragment expected")
    return str(parsed).rstrip("/")


def one_line(text: str) -> str:
    shown = " ".join(text.split())
    return shown if len(shown) <= _TEXT_LENGTH else shown[: _TEXT_LENGTH - 3] + "..."


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> dict[str, Any]:
        """The body as a JSON object; InvalidResponse when it is not one."""
        try:
            value = json.loads(self.body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            value = None
        if not isinstance(value, dict):
            raise errors.InvalidResponse(self.status, "The answer is not a JSON object.")
        return value

    def field(self, key: str, kind: type) -> Any:
        """``key`` of the JSON object, of type ``kind``."""
        value = self.json().get(key)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise errors.InvalidResponse(self.status, f"The answer has no valid {key!r}.")
        return value


def _error_text(status: int, reason: str | None, body: bytes, headers: Mapping[str, str]) -> str:
    """The server's error text: its JSON ``error``, else the reason phrase."""
    if "json" in headers.get("Content-Type", ""):
        try:
            text = json.loads(body).get("error")
        except (UnicodeDecodeError, ValueError, AttributeError, RecursionError):
            text = None
        if isinstance(text, str) and text:
            return one_line(text)
    return one_line(unquote(reason or "") or f"HTTP {status}")


async def _read(response: aiohttp.ClientResponse, limit: int) -> bytes:
    if (response.content_length or 0) > limit:
        raise errors.InvalidResponse(response.status, f"The answer is larger than {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise errors.InvalidResponse(
                response.status, f"The answer is larger than {limit} bytes."
            )
        chunks.append(chunk)
    return b"".join(chunks)


class Transport:
    """Requests to one Linger server, on sessions made on first use in the running event
    loop (the one loop the transport then serves). Long-polls (``wait`` > 0) have a pool
    of ``connections`` of their own; every other request has another one."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        timeout: float,
        retry: Retry,
        max_response: int = MAX_RESPONSE,
        connections: int = 100,
    ) -> None:
        self.base = base_url(url)
        self.timeout = timeout
        self.retry = retry
        self.max_response = max_response
        self.connections = connections
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._sessions: dict[bool, aiohttp.ClientSession] = {}  # by "is a long-poll"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._pending: set[asyncio.Task[Any]] = set()

    def _current(self, polling: bool) -> aiohttp.ClientSession:
        self._check()
        session = self._sessions.get(polling)
        if session is None:
            session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=self.connections),
            )
            self._sessions[polling] = session
        return session

    def _check(self) -> None:
        """ClientClosed once closed, or when called from another event loop than the
        one the transport was first used in."""
        if self._closed:
            raise errors.ClientClosed("The client is closed.")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise errors.ClientClosed(
                "The client belongs to another event loop (an AsyncClient serves the one "
                "it was first used in: make one per asyncio.run)."
            )

    async def close(self) -> None:
        """Close the sessions; requests still under way raise ClientClosed, and so does
        every later one."""
        self._closed = True
        current = asyncio.current_task()
        for task in list(self._pending):
            if task is not current:
                task.cancel()
        sessions, self._sessions = list(self._sessions.values()), {}
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            return  # their loop is gone with their connections: nothing to close here
        for session in sessions:
            await session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        document: object = None,
        idempotent: bool,
        wait: float = 0.0,
        expect: tuple[int, ...] = (200,),
    ) -> Answer:
        """``method path``, tried again on 503 and on connection errors when
        ``idempotent``; an answer of a status in ``expect``, else its typed error.
        ``wait``: seconds the server may hold the request (a long-poll) on top of the
        timeout. ``document`` is sent as a JSON body."""
        self._check()
        task = asyncio.current_task()
        if task is None:
            return await self._request(method, path, params, body, content_type, document,
                                       idempotent, wait, expect)  # fmt: skip
        self._pending.add(task)
        try:
            return await self._request(method, path, params, body, content_type, document,
                                       idempotent, wait, expect)  # fmt: skip
        except asyncio.CancelledError:
            if self._closed and task.cancelling() <= 1:
                task.uncancel()
                raise errors.ClientClosed("The client was closed during the request.") from None
            raise
        finally:
            self._pending.discard(task)

    async def _request(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        body: bytes | None,
        content_type: str | None,
        document: object,
        idempotent: bool,
        wait: float,
        expect: tuple[int, ...],
    ) -> Answer:
        headers = {}
        if document is not None:
            body, content_type = json.dumps(document).encode(), "application/json"
        if content_type is not None:
            headers["Content-Type"] = content_type
        policy = self.retry if idempotent else NEVER
        url = URL(self.base + path, encoded=True)
        attempt = 0
        while True:
            try:
                answer = await self._once(method, url, params, body, headers, wait)
            except errors.ConnectionFailed as error:
                if not error.retryable:
                    raise
                failure: errors.LingerError = error
                delay = policy.delay(attempt, None)
            else:
                if answer.status in expect:
                    return answer
                failure = self._failure(answer)
                if answer.status != 503:
                    raise failure
                delay = policy.delay(attempt, failure.retry_after)
            if delay is None:
                raise failure
            logger.debug("%s %s: %s; trying again in %.2f s", method, path, failure, delay)
            await asyncio.sleep(delay)
            attempt += 1

    @staticmethod
    def _failure(answer: Answer) -> errors.LingerError:
        text = _error_text(answer.status, answer.reason, answer.body, answer.headers)
        if 200 <= answer.status < 400:
            return errors.InvalidResponse(answer.status, f"Unexpected answer: {text}")
        return errors.for_status(
            answer.status, text, retry_after(answer.headers.get("Retry-After"))
        )

    async def _once(
        self,
        method: str,
        url: URL,
        params: Mapping[str, str] | None,
        body: bytes | None,
        headers: dict[str, str],
        wait: float,
    ) -> Answer:
        seconds = self.timeout + wait
        try:
            async with self._current(wait > 0).request(
                method,
                url,
                params=params,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=seconds),
            ) as response:
                data = await _read(response, self.max_response)
                return Answer(response.status, response.reason or "", response.headers, data)
        except TimeoutError:
            text = f"No answer from {self.base} within {seconds:g} s."
            raise errors.ConnectionFailed(text) from None
        except aiohttp.ClientConnectorError as error:
            cause = error.os_error
            if isinstance(cause, socket.gaierror) or not cause.errno:
                reason = cause.strerror or str(cause)
            else:
                reason = os.strerror(cause.errno)
            text = f"Cannot connect to {self.base}: {reason}"
            raise errors.ConnectionFailed(text, retryable=True) from None
        except aiohttp.ClientResponseError as error:
            raise errors.InvalidResponse(
                error.status, one_line(f"Malformed answer from {self.base}: {error.message}")
            ) from None
        except (aiohttp.ClientError, OSError) as error:
            text = one_line(str(error)) or type(error).__name__
            text = f"Connection to {self.base} failed: {text}"
            raise errors.ConnectionFailed(text, retryable=True) from None
