"""Adding, getting, deleting and touching messages through the HTTP API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import sqlalchemy as sa

from .conftest import ClientFactory, Clock
from .helpers import Client, add, error, get, raw, server_stats, stats


async def test_root_returns_welcome_and_server_id(client: Client) -> None:
    response = await client.get("/")
    body = await response.json()
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert body["Linger"] == "Welcome"
    assert set(body) == {"Linger", "version", "id", "hostname"}
    assert body["id"] == (await server_stats(client))["id"]


@pytest.mark.durable
async def test_server_id_survives_restart(make_client: ClientFactory) -> None:
    first = await make_client()
    server_id = (await (await first.get("/")).json())["id"]
    await first.close()
    second = await make_client()
    assert (await (await second.get("/")).json())["id"] == server_id


async def test_add_get_delete_cycle(client: Client) -> None:
    response = await client.post(
        "/channels/test", data=b"Do this", headers={"Content-Type": "text/plain"}
    )
    assert response.status == 202
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    message_id = (await response.json())["id"]
    assert message_id == 1
    got = await get(client, "test")
    assert got.status == 200
    assert await got.read() == b"Do this"
    assert got.headers["x-linger-msg-id"] == "1"
    assert got.headers["x-linger-channel"] == "test"
    assert got.headers["x-linger-priority"] == "0"
    assert got.headers["x-linger-timeout"] == "30"
    assert got.headers["x-linger-deliver"] == "0"
    assert got.headers["x-linger-delivered"] == "1"
    assert got.headers["x-linger-received"] == "0"
    assert got.headers["x-linger-linger"] == "0"
    assert got.headers["x-linger-topic"] == ""
    assert "Etag" not in got.headers
    deleted = await client.delete(f"/messages/{message_id}")
    assert deleted.status == 204
    await error(await client.delete(f"/messages/{message_id}"), 404, "Message not found.")


async def test_get_empty_channel_nowait_returns_204_with_channel(client: Client) -> None:
    response = await get(client, "empty")
    assert response.status == 204
    assert response.headers["x-linger-channel"] == "empty"


async def test_raw_body_keeps_bytes_and_content_type(client: Client) -> None:
    body = b'{"txt": "\x00\xff binary"}  \n'
    content_type = "application/json; charset=latin-1; x=y"
    response = await client.post("/channels/c", data=body, headers={"Content-Type": content_type})
    assert response.status == 202
    got = await get(client, "c")
    assert await got.read() == body
    assert got.headers["Content-Type"] == content_type


async def test_raw_body_without_content_type_is_text_plain(client: Client) -> None:
    response = await client.post("/channels/c", data=b"x", skip_auto_headers=["Content-Type"])
    assert response.status == 202
    assert (await get(client, "c")).headers["Content-Type"] == "text/plain"


async def test_form_msg_is_stored_exactly_as_text_plain(client: Client) -> None:
    text = "  Do this\r\n\tand that! \x01 ünïcode  "
    response = await client.post("/channels/c", data={"msg": text, "priority": "3"})
    assert response.status == 202
    got = await get(client, "c")
    assert (await got.read()).decode() == text
    assert got.headers["Content-Type"] == "text/plain"
    assert got.headers["x-linger-priority"] == "3"


async def test_form_last_msg_wins(client: Client) -> None:
    response = await client.post(
        "/channels/c",
        data=b"msg=first&msg=second",
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
    )
    assert response.status == 202
    assert await (await get(client, "c")).read() == b"second"


async def test_multipart_form_msg(client: Client) -> None:
    form = aiohttp.FormData()
    form.add_field("msg", "multi part")
    form.add_field("timeout", "5")
    response = await client.post("/channels/c", data=form)
    assert response.status == 202
    got = await get(client, "c")
    assert await got.read() == b"multi part"
    assert got.headers["x-linger-timeout"] == "5"


async def test_form_without_msg_is_empty(client: Client) -> None:
    response = await client.post("/channels/c", data={"other": "value"})
    await error(response, 400, "Message is empty.")
    assert (await stats(client, "c")) == {"ready": 0, "hidden": 0}


async def test_form_with_invalid_utf8_is_rejected(client: Client) -> None:
    response = await client.post(
        "/channels/c",
        data=b"msg=%FF%FE",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    await error(response, 400)


async def test_query_msg_used_only_without_body(client: Client) -> None:
    response = await client.post("/channels/c", params={"msg": "from query"})
    assert response.status == 202
    response = await client.post(
        "/channels/c",
        params={"msg": "ignored"},
        data=b"raw",
        headers={"Content-Type": "text/plain"},
    )
    assert response.status == 202
    assert await (await get(client, "c")).read() == b"from query"
    assert await (await get(client, "c")).read() == b"raw"


async def test_empty_message_is_rejected(client: Client) -> None:
    await error(await client.post("/channels/c"), 400, "Message is empty.")
    await error(
        await client.post("/channels/c", data=b"", headers={"Content-Type": "text/plain"}),
        400,
        "Message is empty.",
    )


async def test_message_size_limit_counts_bytes(make_client: ClientFactory) -> None:
    client = await make_client(max_size=10)
    ok = await client.post("/channels/c", data=b"x" * 10, headers={"Content-Type": "a/b"})
    assert ok.status == 202
    too_large = await client.post("/channels/c", data=b"x" * 11, headers={"Content-Type": "a/b"})
    await error(too_large, 413, "Message is larger than 10 bytes.")
    # Six characters, twelve bytes.
    await error(
        await client.post("/channels/c", data={"msg": "éééééé"}),
        413,
        "Message is larger than 10 bytes.",
    )
    assert (await stats(client, "c"))["ready"] == 1


async def test_oversized_chunked_body_is_refused_while_reading(make_client: ClientFactory) -> None:
    client = await make_client(max_size=1000)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"y" * 100

    response = await client.post(
        "/channels/c", data=chunks(), headers={"Content-Type": "application/octet-stream"}
    )
    await error(response, 413, "Message is larger than 1000 bytes.")


@pytest.mark.parametrize(
    ("query", "text"),
    [
        ({"priority": "x"}, "Invalid message priority."),
        ({"priority": "9223372036854775808"}, "Invalid message priority."),
        ({"priority": "1_000"}, "Invalid message priority."),
        ({"priority": "\u0661"}, "Invalid message priority."),
        ({"priority": "1.5"}, "Invalid message priority."),
        ({"timeout": "0"}, "Invalid message visibility timeout."),
        ({"timeout": ""}, "Invalid message visibility timeout."),
        ({"deliver": "-1"}, "Invalid message delivery limit."),
        ({"linger": "-1"}, "Invalid message retention period."),
        ({"linger": "99999999999999999999999"}, "Invalid message retention period."),
        ({"priority": "x", "timeout": "0"}, "Invalid message priority."),
        ({"timeout": "0", "linger": "-1"}, "Invalid message visibility timeout."),
    ],
)
async def test_invalid_option_is_400_and_adds_nothing(
    client: Client, query: dict[str, str], text: str
) -> None:
    response = await client.post(
        "/channels/c", params=query, data=b"m", headers={"Content-Type": "text/plain"}
    )
    await error(response, 400, text)
    assert (await server_stats(client))["current-messages"] == 0


async def test_extreme_valid_options_are_accepted(client: Client) -> None:
    big = str(2**63 - 1)
    await add(client, "c", "m", priority=-(2**63), timeout=big, deliver=big, linger=big)
    got = await get(client, "c")
    assert got.status == 200
    assert got.headers["x-linger-priority"] == str(-(2**63))
    assert got.headers["x-linger-timeout"] == big
    assert (await stats(client, "c")) == {"ready": 0, "hidden": 1}


async def test_signed_integers_are_accepted(client: Client) -> None:
    await add(client, "c", "m", priority="+7", timeout="+2")
    got = await get(client, "c")
    assert got.headers["x-linger-priority"] == "7"
    assert got.headers["x-linger-timeout"] == "2"


async def test_priority_order_then_fifo(client: Client) -> None:
    ids = [await add(client, "c", f"m{i}", priority=p) for i, p in enumerate([5, 0, -3, 0, 5])]
    order = []
    for _ in ids:
        order.append(int((await get(client, "c")).headers["x-linger-msg-id"]))
    assert order == [ids[2], ids[1], ids[3], ids[0], ids[4]]


async def test_delivered_message_is_hidden_until_timeout(client: Client, clock: Clock) -> None:
    message_id = await add(client, "c", "m", timeout=10)
    assert (await get(client, "c")).status == 200
    assert (await stats(client, "c")) == {"ready": 0, "hidden": 1}
    assert (await get(client, "c")).status == 204
    clock.advance(10.5)
    assert (await stats(client, "c")) == {"ready": 1, "hidden": 0}
    again = await get(client, "c")
    assert again.headers["x-linger-msg-id"] == str(message_id)
    assert again.headers["x-linger-delivered"] == "2"
    assert again.headers["x-linger-received"] == "10"
    assert (await server_stats(client))["msg-timeouts"] == 1


async def test_redelivered_message_keeps_its_place(client: Client, clock: Clock) -> None:
    first = await add(client, "c", "first", timeout=5)
    await get(client, "c")
    await add(client, "c", "second")
    clock.advance(6)
    assert (await get(client, "c")).headers["x-linger-msg-id"] == str(first)


async def test_concurrent_gets_never_share_a_message(client: Client) -> None:
    ids = {await add(client, "c", f"m{i}") for i in range(20)}
    responses = await asyncio.gather(*(get(client, "c") for _ in range(30)))
    delivered = [int(r.headers["x-linger-msg-id"]) for r in responses if r.status == 200]
    assert sorted(delivered) == sorted(ids)
    assert sum(r.status == 204 for r in responses) == 10


async def test_delivery_limit_discards_after_last_timeout(client: Client, clock: Clock) -> None:
    message_id = await add(client, "c", "m", deliver=2, timeout=5)
    assert (await get(client, "c")).headers["x-linger-delivered"] == "1"
    clock.advance(6)
    last = await get(client, "c")
    assert last.headers["x-linger-delivered"] == "2"
    assert last.headers["x-linger-deliver"] == "2"
    assert (await stats(client, "c")) == {"ready": 0, "hidden": 1}
    clock.advance(6)
    assert (await get(client, "c")).status == 204
    assert (await stats(client, "c")) == {"ready": 0, "hidden": 0}
    await error(await client.delete(f"/messages/{message_id}"), 404, "Message not found.")


async def test_last_delivery_can_still_be_deleted(client: Client) -> None:
    message_id = await add(client, "c", "m", deliver=1)
    await get(client, "c")
    assert (await client.delete(f"/messages/{message_id}")).status == 204


async def test_retention_discards_ready_and_hidden(client: Client, clock: Clock) -> None:
    ready = await add(client, "c", "ready", linger=10)
    hidden = await add(client, "c", "hidden", linger=10, priority=-1)
    await get(client, "c")
    clock.advance(10.1)
    assert (await stats(client, "c")) == {"ready": 0, "hidden": 0}
    assert (await get(client, "c")).status == 204
    for message_id in (ready, hidden):
        await error(await client.delete(f"/messages/{message_id}"), 404)


async def test_retention_ends_a_hidden_message_before_its_timeout(
    client: Client, clock: Clock
) -> None:
    await add(client, "c", "m", linger=5, timeout=100, deliver=1)
    await get(client, "c")
    clock.advance(5.5)
    assert (await stats(client, "c")) == {"ready": 0, "hidden": 0}


async def test_sweeper_deletes_expired_and_counts_them(
    make_client: ClientFactory, clock: Clock
) -> None:
    client = await make_client(sweep_interval=0.02)
    await add(client, "c", "lingers", linger=1)
    await add(client, "c", "limited", deliver=1, timeout=1, priority=-1)
    await get(client, "c")
    clock.advance(2)
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        current = await server_stats(client)
        if current["msg-retention"] == 1 and current["msg-discarded"] == 1:
            break
        assert asyncio.get_running_loop().time() < deadline, current
        await asyncio.sleep(0.02)
    assert current["current-messages"] == 0
    assert "c" not in (await (await client.get("/channels")).json())["channels"]


async def test_touch_restarts_visibility_timeout(client: Client, clock: Clock) -> None:
    message_id = await add(client, "c", "m", timeout=10)
    await get(client, "c")
    clock.advance(8)
    assert (await client.post(f"/messages/{message_id}/touch")).status == 204
    clock.advance(8)
    assert (await stats(client, "c")) == {"ready": 0, "hidden": 1}
    clock.advance(3)
    assert (await stats(client, "c")) == {"ready": 1, "hidden": 0}
    assert (await server_stats(client))["msg-touch"] == 1


async def test_touch_extends_the_last_allowed_delivery(client: Client, clock: Clock) -> None:
    message_id = await add(client, "c", "m", timeout=10, deliver=1)
    await get(client, "c")
    clock.advance(8)
    assert (await client.post(f"/messages/{message_id}/touch")).status == 204
    clock.advance(8)
    assert (await stats(client, "c")) == {"ready": 0, "hidden": 1}
    assert (await client.delete(f"/messages/{message_id}")).status == 204


async def test_touch_ready_message_is_409_and_keeps_it_ready(client: Client) -> None:
    message_id = await add(client, "c", "m")
    await error(await client.post(f"/messages/{message_id}/touch"), 409, "Message is not hidden.")
    assert (await stats(client, "c")) == {"ready": 1, "hidden": 0}


@pytest.mark.parametrize(
    "path",
    [
        "/messages/99",
        "/messages/99999999999999999999999",
        "/messages/abc",
        "/messages/-1",
        "/messages/",
    ],
)
async def test_delete_unknown_message_is_404(client: Client, path: str) -> None:
    await error(await client.delete(path), 404)
    await error(await client.post(path + "/touch"), 404)


async def test_drain_discards_ready_and_hidden(client: Client) -> None:
    await add(client, "c", "a")
    await add(client, "c", "b")
    await add(client, "other", "x")
    await get(client, "c")
    assert (await client.delete("/channels/c")).status == 204
    assert (await stats(client, "c")) == {"ready": 0, "hidden": 0}
    assert (await stats(client, "other")) == {"ready": 1, "hidden": 0}
    assert (await client.delete("/channels/unknown")).status == 204
    assert (await server_stats(client))["channel-drain"] == 2


async def test_stats_of_unknown_channel_are_zero(client: Client) -> None:
    assert await stats(client, "nobody") == {"ready": 0, "hidden": 0}


@pytest.mark.durable
async def test_ids_increase_and_are_never_reused(make_client: ClientFactory) -> None:
    client = await make_client()
    first = await add(client, "c", "a")
    second = await add(client, "d", "b")
    assert second > first
    assert (await client.delete(f"/messages/{second}")).status == 204
    await client.close()
    restarted = await make_client()
    third = await add(restarted, "c", "c")
    assert third > second
    assert (await server_stats(restarted))["msg-max-id"] == third


async def test_high_level_mark_refuses_adds(make_client: ClientFactory) -> None:
    client = await make_client(hlm=2)
    await add(client, "c", "a")
    await add(client, "c", "b")
    response = await client.post("/channels/c", data=b"c", headers={"Content-Type": "t/p"})
    await error(response, 507, "Channel c is at the high-level mark with 2 messages")
    await add(client, "other", "fine")
    await get(client, "c")  # hidden messages still count
    await error(await client.post("/channels/c", data=b"c", headers={"Content-Type": "t/p"}), 507)


async def test_high_level_mark_holds_under_concurrent_adds(make_client: ClientFactory) -> None:
    client = await make_client(hlm=5)

    async def post(i: int) -> int:
        response = await client.post(
            "/channels/c", data=f"m{i}".encode(), headers={"Content-Type": "text/plain"}
        )
        await response.read()
        return response.status

    statuses = await asyncio.gather(*(post(i) for i in range(40)))
    assert sorted(statuses) == [202] * 5 + [507] * 35
    assert (await stats(client, "c"))["ready"] == 5


async def test_stats_counts_every_state_and_event(client: Client, clock: Clock) -> None:
    await add(client, "a", "urgent", priority=-1)
    await add(client, "a", "niced", priority=1)
    message_id = await add(client, "b", "plain", timeout=5)
    await get(client, "b")
    await get(client, "b")
    await client.post(f"/messages/{message_id}/touch")
    await client.delete(f"/messages/{message_id}")
    current = await server_stats(client)
    expected = {
        "current-channels": 1,
        "current-messages": 2,
        "current-messages-ready": 2,
        "current-messages-hidden": 0,
        "current-messages-urgent": 1,
        "current-messages-niced": 1,
        "msg-add": 3,
        "msg-get": 2,
        "delivered": 1,
        "msg-delete": 1,
        "msg-touch": 1,
        "msg-max-id": 3,
        "msg-max-size": 262144,
    }
    assert {key: current[key] for key in expected} == expected
    for key in (
        "id",
        "version",
        "hostname",
        "pid",
        "start",
        "current-uptime",
        "db-file",
        "current-topics",
        "current-subscriptions",
        "msg-timeouts",
        "msg-retention",
        "msg-discarded",
        "channel-drain",
        "publish",
        "publish-skipped",
        "subscription-add",
        "subscription-delete",
    ):
        assert key in current
    await get(client, "a")
    assert (await server_stats(client))["current-messages-hidden"] == 1


@pytest.mark.durable
async def test_stats_name_the_database_without_its_password(
    make_client: ClientFactory, database_url: str, backend: str
) -> None:
    url = sa.make_url(database_url)
    if backend == "postgresql":
        url = url.set(password="s3cret")  # trust authentication ignores it
    client = await make_client(db=url.render_as_string(hide_password=False))
    shown = (await server_stats(client))["db-file"]
    assert "s3cret" not in shown
    if backend == "postgresql":
        assert shown == url.render_as_string(hide_password=True)
    else:
        assert shown == url.database


async def test_in_memory_default_serves_concurrent_requests(make_client: ClientFactory) -> None:
    client = await make_client(db="sqlite+aiosqlite://")
    ids = await asyncio.gather(*(add(client, f"c{i % 3}", f"m{i}") for i in range(60)))
    assert len(set(ids)) == 60
    responses = await asyncio.gather(*(get(client, f"c{i % 3}") for i in range(66)))
    assert sum(r.status == 200 for r in responses) == 60
    assert (await server_stats(client))["db-file"] == ":memory:"


async def test_head_and_options_are_405_and_claim_nothing(client: Client) -> None:
    await add(client, "c", "m")
    for method in ("HEAD", "OPTIONS", "PATCH"):
        response = await client.request(method, "/channels/c")
        assert response.status == 405
    assert (await stats(client, "c")) == {"ready": 1, "hidden": 0}
    await error(await client.request("PATCH", "/channels/c"), 405, "Method Not Allowed")


async def test_unknown_route_is_json_404(client: Client) -> None:
    await error(await client.get("/nothing/here"), 404, "Not Found")
    await error(await client.get(raw("/channels/a+b")), 404)


async def test_raw_url_is_not_affected_by_query_msg_on_get(client: Client) -> None:
    await add(client, "c", "m")
    response = await client.get(raw("/channels/c?nowait=1&msg=zzz"))
    assert await response.read() == b"m"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"garbage"),
        ("multipart/form-data; boundary=xx", b"garbage"),
        (
            "multipart/form-data; boundary=xx",
            b'--xx\r\nContent-Disposition: form-data; name="msg"\r\n\r\nhello\r\n--xx',
        ),
        ("application/x-www-form-urlencoded", b"%FF=1&msg=x"),
        ("application/x-www-form-urlencoded", b"msg=\xff"),
    ],
)
async def test_malformed_form_is_400_and_adds_nothing(
    client: Client, content_type: str, body: bytes
) -> None:
    response = await client.post("/channels/c", data=body, headers={"Content-Type": content_type})
    await error(response, 400)
    assert (await stats(client, "c"))["ready"] == 0


async def test_huge_declared_form_is_413_without_reading(client: Client) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(
        b"POST /channels/c HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 99999999999\r\n\r\nmsg="
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 413")
