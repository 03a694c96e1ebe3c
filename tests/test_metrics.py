"""Operations: /metrics (parsed with prometheus_client's own parser), /health, /ready,
request ids and JSON logs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
import yaml
from prometheus_client.parser import text_string_to_metric_families

from linger import logs

from .conftest import ClientFactory, Clock
from .helpers import Client, Probe, add, connection, get, raw_request, status_of
from .pgcluster import Cluster
from .processes import Server, start_server, until
from .test_topics import _DROP_TRIGGER, _FAIL_TRIGGER, _execute


async def scrape(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def depth(samples: dict[Any, float], channel: str) -> dict[str, float]:
    return {
        state: samples.get(("linger_messages", (("channel", channel), ("state", state))), 0)
        for state in ("ready", "hidden", "delayed")
    }


async def test_depth_by_state_is_exact(client: Client) -> None:
    for i in range(5):
        await add(client, "c", f"m{i}")
    await add(client, "c", "later", delay=60)
    for _ in range(2):
        assert (await get(client, "c")).status == 200
    samples = await scrape(client)
    assert depth(samples, "c") == {"ready": 3, "hidden": 2, "delayed": 1}
    assert samples[("linger_database_up", ())] == 1


async def test_counters_move_by_what_was_done(client: Client) -> None:
    before = await scrape(client)
    ids = [await add(client, "c", f"m{i}") for i in range(4)]
    delivered = [await get(client, "c") for _ in range(3)]
    assert (await client.delete(f"/messages/{ids[0]}")).status == 204
    lease = delivered[1].headers["x-linger-lease"]
    assert (await client.post(f"/messages/{ids[1]}/release", params={"lease": lease})).status == 204
    after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("linger_messages_added_total") == 4
    assert moved("linger_messages_delivered_total") == 3
    assert moved("linger_messages_deleted_total") == 1
    assert moved("linger_messages_released_total") == 1
    assert moved("linger_receives_total") == 3
    count = "linger_http_request_duration_seconds_count"
    assert moved(count, route="post_message", method="POST", status="202") == 4
    assert moved(count, route="get_message", method="GET", status="200") == 3
    assert moved(count, route="delete_message", method="DELETE", status="204") == 1
    assert after[("linger_database_operation_duration_seconds_count", (("kind", "write_group"),))]
    assert after[("linger_group_commit_operations_count", ())] >= 1
    assert ("process_cpu_seconds_total", ()) in after


async def test_oldest_ready_age_follows_the_clock(client: Client, clock: Clock) -> None:
    await add(client, "old", "m")
    clock.advance(90)
    await add(client, "old", "newer")
    samples = await scrape(client)
    age = samples[("linger_oldest_ready_age_seconds", (("channel", "old"),))]
    assert 90 <= age < 92
    await get(client, "old")
    await get(client, "old")
    samples = await scrape(client)
    assert samples[("linger_oldest_ready_age_seconds", (("channel", "old"),))] == 0


async def test_only_the_deepest_channels_have_depth_series(make_client: ClientFactory) -> None:
    client = await make_client(metrics_channels=2)
    for channel, count in (("small", 1), ("big", 3), ("middle", 2)):
        for _ in range(count):
            await add(client, channel)
    samples = await scrape(client)
    shown = {dict(labels)["channel"] for name, labels in samples if name == "linger_messages"}
    assert shown == {"big", "middle"}


async def test_counters_have_no_channel_label(client: Client) -> None:
    for i in range(20):
        await add(client, f"c{i}")
    samples = await scrape(client)
    for name, labels in samples:
        if name.startswith("linger_") and name not in (
            "linger_messages",
            "linger_oldest_ready_age_seconds",
        ):
            assert "channel" not in dict(labels), name


async def test_hostile_channel_names_are_escaped_and_parse(client: Client) -> None:
    names = ["q%22uote", "back%5Cslash", "%C3%A9%F0%9F%92%A9", "a%20b", "%7D%7B%2C%3D"]
    for name in names:
        await add(client, name)
    samples = await scrape(client)
    shown = {dict(labels)["channel"] for name, labels in samples if name == "linger_messages"}
    assert shown == {'q"uote', "back\\slash", "é💩", "a b", "}{,="}


async def test_unknown_routes_and_methods_do_not_grow_the_series(client: Client) -> None:
    for i in range(30):
        await client.get(f"/nowhere/{i}")
        await client.request("BREW", f"/pot{i}")
    samples = await scrape(client)
    routes = {
        (dict(labels)["route"], dict(labels)["method"])
        for name, labels in samples
        if name == "linger_http_request_duration_seconds_count"
    }
    assert ("other", "GET") in routes
    assert all(not route.startswith("/") for route, _method in routes)
    assert len(routes) < 10


async def test_scrapes_during_traffic_see_consistent_depths(client: Client) -> None:
    """Producers and consumers on one channel while scrapes run: no scrape fails, depths
    are never negative, and at the end the series match the channel's stats."""
    rng = random.Random(5)
    stop = asyncio.Event()

    async def producer() -> None:
        while not stop.is_set():
            await add(client, "busy", "m", priority=rng.randint(-2, 2))

    async def consumer() -> None:
        while not stop.is_set():
            response = await get(client, "busy")
            if response.status == 200:
                message_id = response.headers["x-linger-msg-id"]
                assert (await client.delete(f"/messages/{message_id}")).status == 204

    tasks = [asyncio.create_task(producer()) for _ in range(4)]
    tasks += [asyncio.create_task(consumer()) for _ in range(4)]
    try:
        for _ in range(10):
            samples = await scrape(client)
            assert all(value >= 0 for value in depth(samples, "busy").values())
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    stats = await (await client.get("/channels/busy/stats")).json()
    final = depth(await scrape(client), "busy")
    assert final["ready"] == stats["ready"]
    assert final["hidden"] + final["delayed"] == stats["hidden"]


async def test_scrape_of_many_channels_keeps_others_responsive(make_client: ClientFactory) -> None:
    client = await make_client(metrics_channels=5000)
    await client.post(
        "/channels/seed/messages",
        data=json.dumps([{"body": "x"}] * 10),
        headers={"Content-Type": "application/json"},
    )
    await asyncio.gather(*(add(client, f"ch{i}") for i in range(300)))
    async with Probe(client) as probe:
        for _ in range(5):
            await scrape(client)
    assert probe.worst < 0.5, probe.worst


async def test_metrics_health_and_ready_ignore_parameters(client: Client) -> None:
    for path in ("/metrics", "/health", "/ready"):
        response = await client.get(path, params={"x": "1", "format": "%ff"})
        assert response.status == 200, path
    assert await (await client.get("/health")).json() == {"status": "ok"}
    assert await (await client.get("/ready")).json() == {"status": "ready"}
    response = await client.post("/metrics")
    assert response.status == 405


async def test_ready_is_503_while_the_schema_is_behind(client: Client) -> None:
    async with connection(client) as conn:
        (head,) = (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).one()
        await conn.execute(sa.text("UPDATE alembic_version SET version_num = '0001'"))
    response = await client.get("/ready")
    assert response.status == 503
    assert (await response.json())["error"] == f"The database schema is not at revision {head}."
    assert response.headers["Retry-After"] == "1"
    assert (await client.get("/health")).status == 200
    async with connection(client) as conn:
        await conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": head})
    assert (await client.get("/ready")).status == 200


@pytest.mark.postgres
async def test_ready_follows_postgres_down_and_back(
    make_client: ClientFactory, backend: str
) -> None:
    """PostgreSQL stops: /ready is 503, /metrics still answers with the process's metrics
    and linger_database_up 0; PostgreSQL is back: /ready is 200, without a restart."""
    cluster = Cluster()
    url = await asyncio.to_thread(cluster.start)
    try:
        client = await make_client(db=url, migrate=True)
        await add(client, "c")
        assert (await client.get("/ready")).status == 200
        await asyncio.to_thread(cluster.stop_server)
        response = await client.get("/ready")
        assert response.status == 503
        assert (await response.json())["error"] == "The database is unavailable."
        samples = await scrape(client)
        assert samples[("linger_database_up", ())] == 0
        assert ("process_resident_memory_bytes", ()) in samples
        await asyncio.to_thread(cluster.start_server)

        async def ready() -> bool:
            return bool((await client.get("/ready")).status == 200)

        await until(ready, 10)
        samples = await scrape(client)
        assert samples[("linger_database_up", ())] == 1
        assert depth(samples, "c")["ready"] == 1
        assert samples[("linger_database_unavailable_total", ())] >= 1
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_request_id_is_taken_or_made_and_echoed(client: Client) -> None:
    response = await client.get("/", headers={"X-Request-Id": "trace-42.a"})
    assert response.headers["X-Request-Id"] == "trace-42.a"
    made = (await client.get("/")).headers["X-Request-Id"]
    assert len(made) == 32
    assert int(made, 16) >= 0
    for hostile in ("x" * 500, "a b", "évil", "<script>", "a\tb"):
        echoed = (await client.get("/", headers={"X-Request-Id": hostile})).headers
        assert echoed["X-Request-Id"] != hostile
        assert len(echoed["X-Request-Id"]) == 32
    # Errors, and streamed batch responses, carry it too.
    response = await client.post("/channels/c", headers={"X-Request-Id": "bad-1"})
    assert response.status == 400
    assert response.headers["X-Request-Id"] == "bad-1"
    response = await client.get("/channels/c/messages", params={"n": "5", "wait": "0"})
    assert response.headers["X-Request-Id"]


def test_json_lines_carry_the_request_fields(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("INFO", "json")
    try:
        token = logs.REQUEST_ID.set("req-7")
        try:
            logging.getLogger("linger.test").warning("inside %s", "a request")
        finally:
            logs.REQUEST_ID.reset(token)
        logging.getLogger("linger.test").info("outside", extra={"status": 204, "path": "/x"})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("linger.test").exception("failed")
    finally:
        logs.configure("WARNING", "text")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["message"] == "inside a request"
    assert lines[0]["request_id"] == "req-7"
    assert lines[0]["level"] == "WARNING"
    assert lines[0]["logger"] == "linger.test"
    assert lines[0]["time"].endswith("+00:00")
    assert "request_id" not in lines[1]
    assert (lines[1]["status"], lines[1]["path"]) == (204, "/x")
    assert "ValueError: boom" in lines[2]["exception"]


async def test_access_log_lines_in_json(servers: list[Server], server_args: list[str]) -> None:
    server = await start_server(servers, *server_args, "--access-log", "--log-format", "json")
    async with aiohttp.ClientSession() as session:
        headers = {"X-Request-Id": "from-nginx-1", "X-Forwarded-For": "203.0.113.9, 10.0.0.2"}
        async with session.post(
            f"{server.base}/channels/c", data=b"m", headers={**headers, "Content-Type": "t/p"}
        ) as response:
            assert response.status == 202
            assert response.headers["X-Request-Id"] == "from-nginx-1"

        async def logged() -> bool:
            return "from-nginx-1" in server.stderr()

        await until(logged, 5)
    entries = [json.loads(line) for line in server.stderr().splitlines() if line.startswith("{")]
    (entry,) = [e for e in entries if e.get("request_id") == "from-nginx-1"]
    assert entry["logger"] == "linger.access"
    assert (entry["method"], entry["path"], entry["status"]) == ("POST", "/channels/c", 202)
    assert entry["client"] == "203.0.113.9"
    assert 0 <= entry["duration"] < 5


async def test_a_database_error_is_logged_once_with_its_request_id(
    client: Client, database_url: str, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Ten adds in one group, one of them refused by the database (a trigger): one error
    line, naming the request that failed, not the one whose write started the group."""
    await _execute(database_url, _FAIL_TRIGGER[backend])
    try:
        with caplog.at_level(logging.ERROR, logger="linger"):
            responses = await asyncio.gather(
                *(
                    client.post(
                        f"/channels/c{i}",
                        data=b"m",
                        headers={"Content-Type": "t/p", "X-Request-Id": f"req-{i}"},
                    )
                    for i in range(8, 18)
                )
            )
    finally:
        await _execute(database_url, _DROP_TRIGGER[backend])
    assert [r.status for r in responses].count(500) == 1
    failures = [r for r in caplog.records if r.getMessage() == "database operation failed"]
    assert len(failures) == 1
    assert getattr(failures[0], "request_id", None) == "req-13"


DEPLOY = Path(__file__).parent.parent / "deploy"
_NAME = re.compile(r"\b((?:linger|process)_[a-z_]+)")
_SUFFIXES = ("_bucket", "_count", "_sum")


def _exposed(name: str, samples: dict[Any, float]) -> bool:
    names = {sample_name for sample_name, _labels in samples}
    return name in names or any(
        name.endswith(suffix) and name[: -len(suffix)] + suffix in names for suffix in _SUFFIXES
    )


async def test_alert_rules_and_dashboard_use_metrics_that_exist(client: Client) -> None:
    """Every metric that the rules and the dashboard query is one /metrics exposes (after
    some traffic, so that the labelled series exist)."""
    await add(client, "c")
    await get(client, "c")
    samples = await scrape(client)
    rules = yaml.safe_load((DEPLOY / "linger-alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    for rule in (rule for group in rules["groups"] for rule in group["rules"]):
        assert {"alert", "expr", "labels", "annotations"} <= rule.keys(), rule
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in exprs for name in _NAME.findall(expr)}
    assert "linger_oldest_ready_age_seconds" in used
    missing = {
        name
        for name in used
        if not _exposed(name, samples) and name != "linger_listener_connected"  # PostgreSQL
    }
    assert not missing


def test_alert_rules_pass_promtool_when_it_is_installed() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("LINGER_TEST_REQUIRE_TOOLS") == "1":
            pytest.fail("promtool is required but not installed")
        pytest.skip("promtool not installed (Debian: prometheus); the rules are parsed above")
    result = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "linger-alerts.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_an_aborted_upload_is_the_clients_doing_not_a_500(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients that reset the connection in the middle of their body: counted as 499
    (client closed request), logged as no error, and the server serves on."""
    assert client.port is not None
    head = (
        b"POST /channels/ab HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 100000\r\n\r\n" + b"x" * 100
    )
    with caplog.at_level(logging.WARNING):
        for _ in range(20):
            _reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            writer.write(head)
            await writer.drain()
            await asyncio.sleep(0.05)  # the handler is reading the body
            writer.transport.abort()

        async def counted() -> bool:
            samples = await scrape(client)
            key = (
                "linger_http_request_duration_seconds_count",
                (("method", "POST"), ("route", "post_message"), ("status", "499")),
            )
            return samples.get(key, 0) >= 1

        await until(counted, 5)
    samples = await scrape(client)
    assert not [key for key in samples if ("status", "500") in key[1]]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await add(client, "ab", "after")


async def test_ready_is_503_when_the_schema_is_missing(client: Client) -> None:
    async with connection(client) as conn:
        await conn.execute(sa.text("ALTER TABLE alembic_version RENAME TO hidden_version"))
    try:
        response = await client.get("/ready")
        assert response.status == 503
        assert (await response.json())["error"].startswith("The database schema is not at")
    finally:
        async with connection(client) as conn:
            await conn.execute(sa.text("ALTER TABLE hidden_version RENAME TO alembic_version"))
    assert (await client.get("/ready")).status == 200


async def test_oldest_ready_age_after_a_redrive(client: Client, clock: Clock) -> None:
    """A redriven dead letter keeps its (low) id but counts its age from the redrive: the
    oldest ready message is the one added before it, whatever the ids say."""
    await add(client, "c", "doomed", deliver=1, timeout=1, dead="c.dead")
    assert (await get(client, "c")).status == 200
    clock.advance(2)

    async def moved() -> bool:
        return bool((await (await client.get("/channels/c.dead/stats")).json())["ready"] == 1)

    await until(moved, 5)
    await add(client, "c", "waiting")
    clock.advance(40)
    assert (await client.post("/channels/c.dead/redrive")).status == 200
    samples = await scrape(client)
    age = samples[("linger_oldest_ready_age_seconds", (("channel", "c"),))]
    detail = await (await client.get("/channels/c/stats", params={"detail": ""})).json()
    assert 40 <= age < 42
    assert detail["oldest_ready_age"] == int(age)
    assert depth(samples, "c") == {"ready": 2, "hidden": 0, "delayed": 0}


async def test_requests_the_parser_refuses_carry_a_request_id(client: Client) -> None:
    for head in (
        b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"POST /channels/c HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 9000 + b"\r\n\r\n",
    ):
        answer = await raw_request(client, head)
        assert status_of(answer) == 400, answer[:200]
        headers = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert re.search(rb"\r\nx-request-id: [0-9a-f]{32}\r\n", headers + b"\r\n"), headers
    assert (await client.get("/health")).status == 200
