"""``AsyncClient``: every route of the Linger API as a coroutine, with typed results and
errors. The blocking ``Client`` drives this same implementation."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any

from linger.client import messages
from linger.client.errors import InvalidResponse
from linger.client.messages import Acknowledged, ChannelDetail, ChannelStats, Item, Message
from linger.client.retry import Retry
from linger.client.transport import DEFAULT_URL, MAX_RESPONSE, Answer, Transport, path_name
from linger.client.worker import LOOP_WAIT, Consumer, Counters

# A long-poll without ``wait`` lasts up to the server's --poll-max (120 s by default, but
# the client cannot know it): such a request gets this long on top of its timeout.
UNKNOWN_POLL_MAX = 3600.0

Handler = Callable[[Message], Awaitable[object]]
Leases = Iterable[str | Message]


def _options(**given: object) -> dict[str, str]:
    """The query parameters of the options given (None: not given)."""
    return {key: str(value) for key, value in given.items() if value is not None}


def _leases(leases: Leases) -> list[str]:
    tokens = []
    for lease in leases:
        if isinstance(lease, Message):
            if lease.lease is None:
                raise ValueError(f"message {lease.id} has no lease (peeked, not received)")
            lease = lease.lease
        tokens.append(lease)
    return tokens


def _target(message: Message | int, lease: str | None) -> tuple[str, dict[str, str]]:
    """The path of a message and its ``lease`` parameter (a Message's own by default). A
    Message without a lease (peeked) is refused: acting on it by id alone would act on the
    message whatever its state; a bare id is the 1.0.1 way to do that."""
    if isinstance(message, Message):
        lease = message.lease if lease is None else lease
        if lease is None:
            raise ValueError(
                f"message {message.id} has no lease (peeked, not received): "
                "pass its id to act on it whatever its state"
            )
        message = message.id
    return f"/messages/{int(message)}", ({} if lease is None else {"lease": lease})


def _wait(wait: float | None, nowait: bool) -> tuple[dict[str, str], float]:
    """The long-poll parameters and how long the server may hold the request."""
    if nowait:
        return {"nowait": "1"}, 0.0
    if wait is None:
        return {}, UNKNOWN_POLL_MAX
    seconds = max(0, math.ceil(wait))
    return {"wait": str(seconds)}, float(seconds)


def _acknowledged(answer: Answer) -> Acknowledged:
    done, stale, missing = (answer.field(key, list) for key in ("done", "stale", "missing"))
    return Acknowledged(done=[int(i) for i in done], stale=list(stale), missing=list(missing))


def _body(body: bytes | str, content_type: str | None) -> tuple[bytes, str]:
    if isinstance(body, str):
        return body.encode("utf-8"), content_type or "text/plain; charset=utf-8"
    return bytes(body), content_type or "application/octet-stream"


def _items(items: Iterable[Item | bytes | str]) -> list[dict[str, Any]]:
    return [(i if isinstance(i, Item) else Item(i)).to_json() for i in items]


class AsyncClient:
    """A client of one Linger server: ``async with AsyncClient(url, token=...) as linger``.

    ``timeout`` bounds every request (a long-poll gets its wait on top), and an answer
    larger than ``max_response`` bytes is refused (InvalidResponse). Idempotent
    operations (receive, acknowledgements, subscriptions, drain, reads) are tried again
    on 503, honouring Retry-After, and on connection errors, as ``retry`` says. Adds,
    publishes and redrives are tried again only when called with ``retry=True``: delivery
    is at-least-once, and an add tried again after a broken connection may store the
    message twice."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retry: Retry | None = None,
        connections: int = 100,
        max_response: int = MAX_RESPONSE,
    ) -> None:
        self._http = Transport(
            url,
            token=token,
            timeout=timeout,
            retry=retry or Retry(),
            connections=connections,
            max_response=max_response,
        )

    @property
    def url(self) -> str:
        return self._http.base

    @property
    def connections(self) -> int:
        """The most connections open at once for long-polls (and as many for every other
        request)."""
        return self._http.connections

    @property
    def timeout(self) -> float:
        """Seconds each request may take (a long-poll: its wait on top)."""
        return self._http.timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.close()

    async def _get(self, path: str, params: dict[str, str] | None = None) -> Answer:
        return await self._http.request("GET", path, params=params, idempotent=True)

    # Messages

    async def add(
        self,
        channel: str,
        body: bytes | str,
        *,
        content_type: str | None = None,
        priority: int | None = None,
        timeout: int | None = None,  # noqa: ASYNC109 - the message option, not a deadline
        deliver: int | None = None,
        linger: int | None = None,
        delay: int | None = None,
        dead: str | None = None,
        retry: bool = False,
    ) -> int:
        """Add a message (text is sent as ``text/plain; charset=utf-8``, bytes as
        ``application/octet-stream`` unless ``content_type`` says otherwise); its id."""
        data, kind = _body(body, content_type)
        options = _options(
            priority=priority, timeout=timeout, deliver=deliver, linger=linger, delay=delay
        )
        options.update(_options(dead=dead))
        answer = await self._http.request(
            "POST",
            f"/channels/{path_name(channel)}",
            params=options,
            body=data,
            content_type=kind,
            idempotent=retry,
            expect=(202,),
        )
        return int(answer.field("id", int))

    async def add_many(
        self,
        channel: str,
        items: Iterable[Item | bytes | str],
        *,
        priority: int | None = None,
        timeout: int | None = None,  # noqa: ASYNC109 - the message option, not a deadline
        deliver: int | None = None,
        linger: int | None = None,
        delay: int | None = None,
        dead: str | None = None,
        retry: bool = False,
    ) -> list[int]:
        """Add many in one transaction (the options are every item's defaults); the ids
        in item order."""
        options = _options(
            priority=priority, timeout=timeout, deliver=deliver, linger=linger, delay=delay
        )
        options.update(_options(dead=dead))
        answer = await self._http.request(
            "POST",
            f"/channels/{path_name(channel)}/messages",
            params=options,
            document=_items(items),
            idempotent=retry,
            expect=(202,),
        )
        return [int(i) for i in answer.field("ids", list)]

    async def receive(
        self, channel: str, *, wait: float | None = None, nowait: bool = False
    ) -> Message | None:
        """The next message, waiting up to ``wait`` seconds (whole seconds, at most the
        server's --poll-max; None: --poll-max) for one, or at once with ``nowait``; None
        when none came."""
        params, seconds = _wait(wait, nowait)
        answer = await self._http.request(
            "GET",
            f"/channels/{path_name(channel)}",
            params=params,
            idempotent=True,
            wait=seconds,
            expect=(200, 204),
        )
        if answer.status == 204:
            return None
        return messages.from_headers(answer.headers, answer.body, channel)

    async def receive_many(
        self, channel: str, n: int = 10, *, wait: float | None = None, nowait: bool = False
    ) -> list[Message]:
        """Up to ``n`` messages in delivery order, long-polling like ``receive`` until at
        least one is ready; empty when none came."""
        params, seconds = _wait(wait, nowait)
        params["n"] = str(n)
        answer = await self._http.request(
            "GET",
            f"/channels/{path_name(channel)}/messages",
            params=params,
            idempotent=True,
            wait=seconds,
        )
        return [messages.from_json(m) for m in answer.field("messages", list)]

    async def peek(self, channel: str, n: int = 10, *, state: str = "ready") -> list[Message]:
        """Up to ``n`` messages of ``state`` (ready, hidden or delayed) in delivery order,
        without leasing or counting anything."""
        params = {"n": str(n), "state": state}
        answer = await self._get(f"/channels/{path_name(channel)}/peek", params)
        return [messages.from_json(m) for m in answer.field("messages", list)]

    # One delivered message, by its lease (a Message's own by default)

    async def _act(
        self, verb: str, message: Message | int, lease: str | None, **options: object
    ) -> None:
        path, params = _target(message, lease)
        params.update(_options(**options))
        method, path = ("DELETE", path) if verb == "delete" else ("POST", f"{path}/{verb}")
        await self._http.request(method, path, params=params, idempotent=True, expect=(204,))

    async def delete(self, message: Message | int, lease: str | None = None) -> None:
        """Done with it. Raises LeaseStale when it was delivered again since, NotFound when
        it is gone. An id without a lease deletes the message whatever its state."""
        await self._act("delete", message, lease)

    async def touch(
        self,
        message: Message | int,
        lease: str | None = None,
        *,
        timeout: int | None = None,  # noqa: ASYNC109 - the lease's new visibility timeout
    ) -> None:
        """Restart the lease for ``timeout`` seconds (default: the message's own)."""
        await self._act("touch", message, lease, timeout=timeout)

    async def release(
        self, message: Message | int, lease: str | None = None, *, delay: int | None = None
    ) -> None:
        """Give it back: ready at once, or after ``delay`` seconds (the delivery counts)."""
        await self._act("release", message, lease, delay=delay)

    async def reject(self, message: Message | int, lease: str | None = None) -> None:
        """Unprocessable: to its dead channel now, or discarded when it has none."""
        await self._act("reject", message, lease)

    # Many, in one transaction each

    async def _many(self, verb: str, document: dict[str, Any]) -> Acknowledged:
        answer = await self._http.request(
            "POST", f"/messages/{verb}", document=document, idempotent=True
        )
        return _acknowledged(answer)

    async def delete_many(self, leases: Leases) -> Acknowledged:
        return await self._many("delete", {"leases": _leases(leases)})

    async def delete_ids(self, ids: Iterable[int]) -> Acknowledged:
        """Delete by id, whatever their state (1.0.1 style)."""
        return await self._many("delete", {"ids": [int(i) for i in ids]})

    async def touch_many(
        self,
        leases: Leases,
        *,
        timeout: int | None = None,  # noqa: ASYNC109 - the leases' new visibility timeout
    ) -> Acknowledged:
        return await self._many("touch", {"leases": _leases(leases), "timeout": timeout})

    async def release_many(self, leases: Leases, *, delay: int | None = None) -> Acknowledged:
        return await self._many("release", {"leases": _leases(leases), "delay": delay})

    async def reject_many(self, leases: Leases) -> Acknowledged:
        return await self._many("reject", {"leases": _leases(leases)})

    # Topics

    async def publish(
        self,
        topic: str,
        body: bytes | str,
        *,
        content_type: str | None = None,
        retry: bool = False,
    ) -> dict[str, int]:
        """A copy for every subscribed channel; the id of each copy by channel."""
        data, kind = _body(body, content_type)
        answer = await self._http.request(
            "POST",
            f"/topics/{path_name(topic)}",
            body=data,
            content_type=kind,
            idempotent=retry,
            expect=(202,),
        )
        return {str(c): int(i) for c, i in answer.json().items()}

    async def publish_many(
        self, topic: str, items: Iterable[Item | bytes | str], *, retry: bool = False
    ) -> list[dict[str, int]]:
        answer = await self._http.request(
            "POST",
            f"/topics/{path_name(topic)}/messages",
            document=_items(items),
            idempotent=retry,
            expect=(202,),
        )
        published = answer.field("messages", list)
        if not all(isinstance(ids, dict) for ids in published):
            raise InvalidResponse(answer.status, "The answer has no valid 'messages'.")
        return [{str(c): int(i) for c, i in ids.items()} for ids in published]

    async def subscribe(
        self,
        channel: str,
        topic: str,
        *,
        priority: int | None = None,
        timeout: int | None = None,  # noqa: ASYNC109 - the message option, not a deadline
        deliver: int | None = None,
        linger: int | None = None,
        delay: int | None = None,
        dead: str | None = None,
    ) -> None:
        """Subscribe ``channel`` to ``topic`` (or replace the subscription's options)."""
        options = _options(
            priority=priority, timeout=timeout, deliver=deliver, linger=linger, delay=delay
        )
        options.update(_options(dead=dead))
        path = f"/channels/{path_name(channel)}/topics/{path_name(topic)}"
        await self._http.request("PUT", path, params=options, idempotent=True, expect=(204,))

    async def unsubscribe(self, channel: str, topic: str) -> None:
        path = f"/channels/{path_name(channel)}/topics/{path_name(topic)}"
        await self._http.request("DELETE", path, idempotent=True, expect=(204,))

    # Channels and the server

    async def redrive(
        self, dead: str, *, to: str | None = None, n: int | None = None, retry: bool = False
    ) -> int:
        """Move up to ``n`` (default all) ready dead letters of ``dead`` back, oldest
        first, to ``to`` (default: each one's own channel); how many moved."""
        answer = await self._http.request(
            "POST",
            f"/channels/{path_name(dead)}/redrive",
            params=_options(to=to, n=n),
            idempotent=retry,
        )
        return int(answer.field("moved", int))

    async def drain(self, channel: str) -> None:
        """Discard every message the channel holds, ready and hidden."""
        path = f"/channels/{path_name(channel)}"
        await self._http.request("DELETE", path, idempotent=True, expect=(204,))

    async def channel_stats(self, channel: str) -> ChannelStats:
        answer = await self._get(f"/channels/{path_name(channel)}/stats")
        return ChannelStats(int(answer.field("ready", int)), int(answer.field("hidden", int)))

    async def channel_detail(self, channel: str) -> ChannelDetail:
        answer = await self._get(f"/channels/{path_name(channel)}/stats", {"detail": "1"})
        ready, hidden, delayed, age = (
            int(answer.field(key, int))
            for key in ("ready", "hidden", "delayed", "oldest_ready_age")
        )
        dead_from = [str(c) for c in answer.field("dead_from", list)]
        return ChannelDetail(ready, hidden, delayed, age, dead_from)

    async def channels(self) -> list[str]:
        return [str(c) for c in (await self._get("/channels")).field("channels", list)]

    async def topics(self) -> list[str]:
        return [str(t) for t in (await self._get("/topics")).field("topics", list)]

    async def channel_topics(self, channel: str) -> list[str]:
        answer = await self._get(f"/channels/{path_name(channel)}/topics")
        return [str(t) for t in answer.field("topics", list)]

    async def topic_channels(self, topic: str) -> list[str]:
        answer = await self._get(f"/topics/{path_name(topic)}/channels")
        return [str(c) for c in answer.field("channels", list)]

    async def stats(self) -> dict[str, Any]:
        """The server's statistics (``GET /stats``)."""
        return (await self._get("/stats")).json()

    async def info(self) -> dict[str, Any]:
        """The welcome (``GET /``): version, server id and hostname."""
        return (await self._get("/")).json()

    async def health(self) -> bool:
        """Whether the process answers ``/health``."""
        answer = await self._http.request("GET", "/health", idempotent=True)
        return answer.json().get("status") == "ok"

    async def ready(self) -> bool:
        """Whether the server is ready (its database answers, its schema is current)."""
        answer = await self._http.request("GET", "/ready", idempotent=True, expect=(200, 503))
        return answer.status == 200

    async def metrics(self) -> str:
        """The Prometheus text exposition of ``/metrics``."""
        return (await self._get("/metrics")).body.decode("utf-8", "replace")

    # The worker loop

    def consumer(
        self,
        channel: str,
        handler: Handler,
        *,
        concurrency: int = 1,
        batch: int = 1,
        handler_timeout: float | None = None,
        wait: float | None = LOOP_WAIT,
        retry_delay: float = 1.0,
        max_retry_delay: float = 300.0,
        signals: bool = True,
    ) -> Consumer:
        """A worker loop over ``channel`` (see ``Consumer``), to ``run()`` and ``stop()``."""
        return Consumer(
            self,
            channel,
            handler,
            concurrency=concurrency,
            batch=batch,
            handler_timeout=handler_timeout,
            wait=wait,
            retry_delay=retry_delay,
            max_retry_delay=max_retry_delay,
            signals=signals,
        )

    async def consume(
        self,
        channel: str,
        handler: Handler,
        *,
        concurrency: int = 1,
        batch: int = 1,
        handler_timeout: float | None = None,
        wait: float | None = LOOP_WAIT,
        retry_delay: float = 1.0,
        max_retry_delay: float = 300.0,
        signals: bool = True,
    ) -> Counters:
        """Run a worker loop over ``channel`` until it is stopped (SIGTERM, SIGINT); what
        it did. See ``Consumer`` for the options."""
        consumer = self.consumer(
            channel,
            handler,
            concurrency=concurrency,
            batch=batch,
            handler_timeout=handler_timeout,
            wait=wait,
            retry_delay=retry_delay,
            max_retry_delay=max_retry_delay,
            signals=signals,
        )
        return await consumer.run()
