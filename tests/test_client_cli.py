"""``linger send | recv | peek | stats | redrive | drain``, the blocking client and the
examples, against a real ``python -m linger`` process (SQLite file, --auth)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from linger import cli
from linger.client import ChannelStats, Client, ClientClosed, LingerError, Message, Reject

from .conftest import run_sync
from .processes import Server

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.sqlite


@dataclass(frozen=True)
class Live:
    url: str
    token: str

    def env(self, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("LINGER_")}
        return {**base, "LINGER_URL": self.url, "LINGER_TOKEN": self.token, **extra}

    def flags(self) -> list[str]:
        return ["--url", self.url, "--token", self.token]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One server for the module, with --auth and an admin token."""
    database = str(tmp_path_factory.mktemp("cli") / "linger.db")
    server = Server("--dbfile", database, "--auth")
    run_sync(server.start())
    try:
        created = subprocess.run(
            [sys.executable, "-m", "linger", "token", "create", "--dbfile", database,
             "--scope", "admin:*"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        yield Live(server.base, created.stdout.strip())
    finally:
        server.stop()


@pytest.fixture
def client(live: Live) -> Iterator[Client]:
    with Client(live.url, token=live.token) as blocking:
        yield blocking


def linger(
    *args: str, live: Live, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``python -m linger ARGS`` with LINGER_URL and LINGER_TOKEN set, output piped."""
    return subprocess.run(
        [sys.executable, "-m", "linger", *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        env=live.env(),
        timeout=60,
    )


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``linger ARGS`` in this process (dispatched by ``linger.cli.main`` as the command
    line would be): exit status, standard output and standard error."""
    with pytest.raises(SystemExit) as exited:
        cli.main(list(args))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def test_send_lines_and_recv_ack_round_trip_ten_thousand_lines(
    live: Live, client: Client, tmp_path: Path
) -> None:
    lines = [f"order {n:05d} ü" for n in range(10_000)]
    path = tmp_path / "orders.txt"
    path.write_text("\n".join(lines) + "\n")
    sent = linger("send", "bulk", "--lines", "--file", str(path), live=live)
    assert sent.returncode == 0, sent.stderr
    assert sent.stderr.decode() == "10000 messages sent to bulk\n"  # piped: no bar
    assert client.channel_stats("bulk") == ChannelStats(10_000, 0)
    received = linger("recv", "bulk", "-n", "10000", "--ack", live=live)
    assert received.returncode == 0, received.stderr
    assert received.stdout.decode().splitlines() == lines
    assert received.stderr == b""
    assert client.channel_stats("bulk") == ChannelStats(0, 0)


def test_send_stdin_recv_json_peek_stats_redrive_and_drain(
    live: Live, client: Client, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = live.flags()
    code, out, _ = run(capsys, "send", "tools", "hello", "--priority", "-1", *flags)
    assert code == 0
    first = int(out)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\x00\xffraw")))
    code, out, _ = run(capsys, "send", "tools", "-", "--dead", "tools.dead", *flags)
    second = int(out)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a\n\nb\r\n")))
    code, _, err = run(capsys, "send", "tools", "--lines", "--timeout", "60", *flags)
    assert (code, err) == (0, "2 messages sent to tools\n")
    code, out, _ = run(capsys, "peek", "tools", *flags)
    assert out.splitlines()[0].split() == [
        "ID", "PRIORITY", "DELIVERED", "AGE", "DEAD", "FROM", "REASON", "BODY",
    ]  # fmt: skip
    assert "\\x00\\xffraw" in out
    code, out, _ = run(capsys, "stats", *flags)
    assert code == 0
    assert out.splitlines()[1].split()[:4] == ["tools", "4", "0", "0"]
    assert "4 messages (4 ready, 0 hidden)" in out
    code, out, err = run(capsys, "recv", "tools", "-n", "2", "--json", *flags)
    shown = [json.loads(line) for line in out.splitlines()]
    assert [m["id"] for m in shown] == [first, second]
    assert shown[1]["encoding"] == "base64"
    assert shown[1]["lease"]
    assert "not acknowledged" in err
    client.reject(shown[1]["id"], shown[1]["lease"])
    code, out, _ = run(capsys, "stats", "tools.dead", "--json", *flags)
    assert json.loads(out)["dead_from"] == ["tools"]
    code, out, _ = run(capsys, "redrive", "tools.dead", "--to", "tools.again", *flags)
    assert (code, out) == (0, "1 dead letters moved\n")
    code, out, _ = run(capsys, "recv", "tools", "--ack", *flags)
    assert (code, out) == (0, "a\n")
    code, _, err = run(capsys, "drain", "tools", "--yes", *flags)
    assert (code, err) == (0, "tools drained\n")
    assert client.channel_stats("tools") == ChannelStats(0, 0)  # the hidden one too
    client.drain("tools.again")


def test_server_and_connection_errors_are_one_line_and_exit_1(
    live: Live, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (["recv", "c", "--url", "http://127.0.0.1:1"], "Cannot connect to http://127.0.0.1:1"),
        (["stats", "--url", "nonsense"], "Invalid Linger URL 'nonsense'"),
        (["recv", "c", "--url", live.url, "--token", "lgr_wrong"], "401 Authentication required."),
        (["peek", "c", "--url", live.url], "401 Authentication required."),
        (["send", "c", "", *live.flags()], "400 Message is empty."),
    ]
    for args, text in cases:
        code, out, err = run(capsys, *args)
        assert (code, out) == (1, ""), args
        assert err.count("\n") == 1, err
        assert err.startswith(f"linger {args[0]}: "), err
        assert text in err, err


def test_usage_errors_exit_2_and_drain_wants_a_terminal_or_yes(
    live: Live, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    client.add("kept", "x")
    for args in (
        ["recv"],
        ["recv", "c", "-n", "0"],
        ["send", "c", "x", "--file", "f"],
        ["send", "c", "--file", "/nonexistent/lines"],
        ["stats", "--bogus"],
        ["drain", "kept", *live.flags()],
    ):
        code, out, err = run(capsys, *args)
        assert (code, out) == (2, ""), args
        assert err.count("\n") == 1, err
        assert err.startswith(f"linger {args[0]}: error: "), err
    assert client.channel_stats("kept") == ChannelStats(1, 0)
    refused = linger("drain", "kept", live=live)
    assert refused.returncode == 2
    assert b"without confirmation: pass --yes" in refused.stderr
    client.drain("kept")
    with pytest.raises(SystemExit) as helped:
        cli.main(["--help"])  # the server's own options, as before
    assert helped.value.code == 0
    assert "--poll-max" in capsys.readouterr().out


def test_blocking_client_and_its_worker_loop(client: Client) -> None:
    ids = client.add_many("blocking", [f"b{n}" for n in range(60)], dead="blocking.dead")
    assert client.peek("blocking", 1)[0].id == ids[0]
    got = client.receive("blocking", nowait=True)
    assert got is not None
    client.release(got)
    handled: list[int] = []
    lock = threading.Lock()

    def handle(message: Message) -> None:
        time.sleep(0.005)  # a blocking call: each handler runs in a thread of its own
        if message.id == ids[7]:
            raise Reject("bad")
        with lock:
            handled.append(message.id)
            if len(handled) == 59:
                consumer.stop()

    consumer = client.consumer("blocking", handle, concurrency=3, batch=5, wait=1)
    counters = consumer.run()
    assert (counters.processed, counters.rejected, counters.lost) == (59, 1, 0)
    assert sorted(handled) == sorted(set(ids) - {ids[7]})
    assert client.channel_stats("blocking") == ChannelStats(0, 0)
    assert [m.id for m in client.peek("blocking.dead")] == [ids[7]]
    client.drain("blocking.dead")


def test_sigterm_stops_the_example_worker_with_nothing_left_hidden(
    live: Live, client: Client
) -> None:
    produced = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "producer.py"), "3000"],
        capture_output=True, text=True, env=live.env(), timeout=60,
    )  # fmt: skip
    assert produced.returncode == 0, produced.stderr
    assert produced.stdout.startswith("3000 orders added")
    # Unbuffered: readline() must not read ahead lines that communicate(), which reads
    # the pipe itself, would then never see.
    worker = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "worker.py")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=live.env(), bufsize=0,
    )  # fmt: skip
    try:
        assert worker.stdout is not None
        for _ in range(50):  # some orders processed, many more to come
            assert worker.stdout.readline().startswith(b"order ")
        worker.send_signal(signal.SIGTERM)
        rest, err = worker.communicate(timeout=15)
    finally:
        worker.kill()
    assert worker.returncode == 0, err
    assert b"stopped: Counters(" in err
    printed = 50 + len(rest.splitlines())
    stats = client.channel_stats("orders")
    assert stats.hidden == 0
    assert stats.ready == 3000 - printed > 0, (stats, printed, err[-2000:])
    client.drain("orders")


def test_the_blocking_client_cannot_be_used_from_its_own_loop(live: Live) -> None:
    with Client(live.url, token=live.token) as blocking:

        async def inside() -> None:
            blocking.channels()

        with pytest.raises(RuntimeError, match="its own handlers"):
            blocking._run(inside())
    with pytest.raises(RuntimeError, match="closed"):
        blocking.channels()


# Found by attacking the client


def test_send_lines_to_an_unreachable_server_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lines = tmp_path / "lines.txt"
    lines.write_text("a\nb\n")
    code, out, err = run(
        capsys, "send", "c", "--lines", "--file", str(lines), "--url", "http://127.0.0.1:1"
    )
    assert (code, out) == (1, "")
    assert err.count("\n") == 1, err
    assert err.startswith("linger send: Cannot connect to http://127.0.0.1:1"), err
    assert "after the first 0 messages" in err


def test_a_blocking_handler_past_its_timeout_keeps_its_lease_until_it_returns(
    client: Client,
) -> None:
    """A thread cannot be cancelled: its message is not handed to anyone else (its lease
    is extended past the 1 s visibility timeout) and is deleted once the call returns."""
    client.add("threads", "charge card", timeout=1)
    calls: list[int] = []
    running: list[int] = []
    peak = 0
    lock = threading.Lock()

    def handle(message: Message) -> None:
        nonlocal peak
        with lock:
            calls.append(message.delivered)
            running.append(message.id)
            peak = max(peak, len(running))
        time.sleep(1.2)  # a call that cannot be interrupted
        with lock:
            running.remove(message.id)

    consumer = client.consumer(
        "threads", handle, concurrency=2, handler_timeout=0.3, retry_delay=0, wait=1
    )
    thread = threading.Thread(target=consumer.run)
    thread.start()
    deadline = time.monotonic() + 6
    while consumer.counters.processed < 1:
        assert time.monotonic() < deadline, consumer.counters
        time.sleep(0.05)
    consumer.stop()
    thread.join(5)
    assert (calls, peak) == ([1], 1)
    assert (consumer.counters.processed, consumer.counters.failed) == (1, 0)
    assert client.channel_stats("threads") == ChannelStats(0, 0)


def test_closing_a_blocking_client_ends_the_calls_other_threads_wait_on(live: Live) -> None:
    blocking = Client(live.url, token=live.token)
    outcome: list[BaseException] = []

    def poll() -> None:
        try:
            blocking.receive("nothing-here", wait=2)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    blocking.close()
    thread.join(3)
    assert not thread.is_alive()
    assert time.monotonic() - started < 3
    [error] = outcome
    assert isinstance(error, ClientClosed), repr(error)
    assert isinstance(error, LingerError)
    with pytest.raises(ClientClosed):
        blocking.channels()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_recv_past_the_servers_batch_size_onto_a_full_disk(live: Live, client: Client) -> None:
    """-n 1200 --batch 1200 against --max-batch 1000: the receives halve (the messages are
    received), then standard output cannot be written: one line, exit 1."""
    for start in (0, 600):
        client.add_many("many", [f"m{n}" for n in range(start, start + 600)])
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [sys.executable, "-m", "linger", "recv", "many", "-n", "1200", "--batch", "1200"],
            stdout=full, stderr=subprocess.PIPE, env=live.env(), timeout=60,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr == b"linger recv: No space left on device\n"
    assert client.channel_stats("many") == ChannelStats(600, 600)
    client.drain("many")
