"""Prometheus metrics (``GET /metrics``), with the ``prometheus_client`` library.

Each app has a registry of its own. Request latencies and database timings are observed
as they happen; everything else is read at scrape time by a collector: this process's
counters (the broker's), its waiters and listener, and the cluster-wide depth and age of
the ``--metrics-channels`` deepest channels, from one bounded query per scrape. Counters
carry no channel label: clients create channels on demand, and a label per channel would
let them grow the series without bound; the depth gauges are bounded by the setting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from linger import __version__, errors
from linger.queue.broker import Broker
from linger.store.records import Depth

# No ``_created`` series beside every counter and histogram: they double the exposition
# and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]
CONTENT_TYPE = CONTENT_TYPE_LATEST
# How long a scrape waits for the depth query before it answers without it.
SCRAPE_TIMEOUT = 5.0
# Long-polls last up to --poll-max (120 s by default): the buckets reach that far.
_REQUEST_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
)  # fmt: skip
_DATABASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# (metric name without _total, help, the broker counter, labels)
_COUNTERS: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("linger_messages_added", "Messages added by this process.", "msg-add", {}),
    ("linger_receives", "Receive requests (single and batch) served.", "msg-get", {}),
    ("linger_messages_delivered", "Deliveries of messages to consumers.", "delivered", {}),
    (
        "linger_messages_redelivered",
        "Deliveries after the first (a timeout or a release came before).",
        "msg-timeouts",
        {},
    ),
    ("linger_messages_deleted", "Messages deleted by consumers.", "msg-delete", {}),
    ("linger_messages_touched", "Leases extended.", "msg-touch", {}),
    ("linger_messages_released", "Messages given back by consumers.", "msg-release", {}),
    ("linger_messages_rejected", "Messages rejected by consumers.", "msg-reject", {}),
    ("linger_messages_dead_lettered", "Messages moved to a dead channel.", "msg-dead", {}),
    ("linger_messages_redriven", "Dead letters sent back.", "msg-redriven", {}),
    (
        "linger_messages_discarded",
        "Messages discarded: past their retention, or out of deliveries with no dead channel.",
        "msg-retention",
        {"reason": "retention"},
    ),
    ("linger_messages_discarded", "", "msg-discarded", {"reason": "deliveries"}),
    ("linger_publishes", "Messages published to topics.", "publish", {}),
    (
        "linger_publish_copies_skipped",
        "Copies a publish did not make (a channel at its high-level mark).",
        "publish-skipped",
        {},
    ),
    ("linger_channel_drains", "Channels drained.", "channel-drain", {}),
)


@dataclass
class Snapshot:
    """What a scrape read from the database before it renders."""

    database_up: bool = False
    depths: list[Depth] = field(default_factory=list)
    now_ms: int = 0


class Metrics:
    """The registry of one app, and the instruments observed as things happen."""

    def __init__(self, broker: Broker, channels: int) -> None:
        self.broker = broker
        self.channels = channels
        self.snapshot = Snapshot()
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Histogram(
            "linger_http_request_duration_seconds",
            "HTTP requests by route, method and status, and how long they took "
            "(long-polls included: up to --poll-max).",
            ["route", "method", "status"],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        # Each request's series, looked up once (labels() takes a lock and builds its key
        # for every call): as bounded as the labels, routes by methods by status codes.
        self._request_series: dict[tuple[str, str, int], Histogram] = {}
        database = Histogram(
            "linger_database_operation_duration_seconds",
            "Database work: reads, and write groups (each one transaction, group-committed).",
            ["kind"],
            buckets=_DATABASE_BUCKETS,
            registry=self.registry,
        )
        group_size = Histogram(
            "linger_group_commit_operations",
            "Operations committed together in one write group.",
            buckets=_GROUP_BUCKETS,
            registry=self.registry,
        )
        reads, groups = database.labels("read"), database.labels("write_group")
        driver = broker.storage.driver

        def on_group(size: int, seconds: float) -> None:
            groups.observe(seconds)
            group_size.observe(size)

        driver.on_group = on_group
        driver.on_read = reads.observe
        self.listener_connected: asyncio.Event | None = None
        self.registry.register(_Collector(self))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        series = self._request_series.get(key)
        if series is None:
            series = self._request_series[key] = self.requests.labels(route, method, str(status))
        series.observe(seconds)

    async def scrape(self) -> bytes:
        """Read the depths, then render every metric."""
        storage = self.broker.storage
        try:
            depths = await asyncio.wait_for(storage.overview.depths(self.channels), SCRAPE_TIMEOUT)
            self.snapshot = Snapshot(True, depths, storage.now())
        except (errors.LingerError, TimeoutError):
            self.snapshot = Snapshot(False, [], storage.now())
        # Rendering thousands of series takes tens of milliseconds: in a thread, so that
        # the event loop serves other requests meanwhile (the collector only reads).
        return await asyncio.to_thread(generate_latest, self.registry)


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        broker = metrics.broker
        info = GaugeMetricFamily("linger_build_info", "Linger's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        families: dict[str, CounterMetricFamily] = {}
        for name, text, counter, labels in _COUNTERS:
            family = families.get(name)
            if family is None:
                family = families[name] = CounterMetricFamily(name, text, labels=list(labels))
            family.add_metric(list(labels.values()), broker.counters[counter])
        yield from families.values()
        yield GaugeMetricFamily(
            "linger_waiters", "Consumers long-polling this process now.", broker.notifier.asleep()
        )
        snapshot = metrics.snapshot
        yield GaugeMetricFamily(
            "linger_database_up",
            "1 when the database answered this scrape's query, else 0.",
            int(snapshot.database_up),
        )
        yield CounterMetricFamily(
            "linger_database_unavailable",
            "Operations of this process that found the database unreachable or busy.",
            broker.storage.driver.unavailable,
        )
        if metrics.listener_connected is not None:
            yield GaugeMetricFamily(
                "linger_listener_connected",
                "1 while this process listens for other processes' notifications.",
                int(metrics.listener_connected.is_set()),
            )
        yield from _depth_families(snapshot, metrics.channels)


def _depth_families(snapshot: Snapshot, limit: int) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "linger_messages",
        f"Live messages by channel and state, cluster-wide (the {limit} deepest channels).",
        labels=["channel", "state"],
    )
    age = GaugeMetricFamily(
        "linger_oldest_ready_age_seconds",
        "Age of each channel's oldest ready message (0 when none is ready).",
        labels=["channel"],
    )
    for row in snapshot.depths:
        depth.add_metric([row.channel, "ready"], row.ready)
        depth.add_metric([row.channel, "hidden"], row.hidden)
        depth.add_metric([row.channel, "delayed"], row.delayed)
        oldest = 0 if row.oldest_ready is None else max(0, snapshot.now_ms - row.oldest_ready)
        age.add_metric([row.channel], oldest / 1000)
    yield depth
    yield age
