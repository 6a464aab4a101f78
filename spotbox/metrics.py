"""GET /metrics: Prometheus text read from the live pipeline, broker and feeds at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from spotbox.cluster.forward import Forwarder
from spotbox.cluster.ingest import ClusterIngest
from spotbox.keys import BROKER, CLUSTER, FORWARDERS, HUB, METRICS, OPS, PIPELINE
from spotbox.mqtt.broker import Broker
from spotbox.ops.presence import STATES
from spotbox.ops.rules import SEVERITIES


class SpotboxCollector:
    """Reads the counters the components already keep, so nothing is counted twice."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> Iterator[Metric]:
        """One sample of each spotbox metric; components not started yet are skipped."""
        pipeline = self._app.get(PIPELINE)
        if pipeline is not None:
            stats = pipeline.stats
            yield CounterMetricFamily(
                "spotbox_messages_received", "Statuses received over MQTT or HTTP.", value=stats.received
            )
            yield CounterMetricFamily("spotbox_messages_stored", "Statuses committed to storage.", value=stats.stored)
            yield CounterMetricFamily(
                "spotbox_messages_duplicates", "Redelivered statuses already stored.", value=stats.duplicates
            )
            rejected = CounterMetricFamily(
                "spotbox_messages_rejected",
                "Statuses refused by validation, by the field that failed first.",
                labels=["reason"],
            )
            for reason, count in sorted(stats.rejected.items()):
                rejected.add_metric([reason], count)
            yield rejected
            yield GaugeMetricFamily(
                "spotbox_queue_depth", "Valid statuses waiting for the writer.", value=pipeline.depth
            )
            yield from pipeline.commit_seconds.collect()
        broker = self._app.get(BROKER)
        if broker is not None:
            yield GaugeMetricFamily(
                "spotbox_mqtt_clients_connected",
                "MQTT clients connected (TCP and WebSocket).",
                value=broker.connected_count,
            )
            yield GaugeMetricFamily(
                "spotbox_mqtt_connections_paused",
                "MQTT connections not being read for backpressure (ingest queue or connection window full).",
                value=broker.paused_connections,
            )
            yield from _dropped(broker)
        ops = self._app.get(OPS)
        if ops is not None:
            presence = GaugeMetricFamily("spotbox_robots", "Robots by presence.", labels=["presence"])
            counts = ops.presence.counts()
            for state in STATES:
                presence.add_metric([state], counts[state])
            yield presence
            active = GaugeMetricFamily("spotbox_alerts_active", "Active alerts by severity.", labels=["severity"])
            for severity in SEVERITIES:
                count = sum(1 for a in ops.alerts.current.values() if a.state == "active" and a.severity == severity)
                active.add_metric([severity], count)
            yield active
        yield GaugeMetricFamily(
            "spotbox_sse_streams_open", "Open SSE feeds, per robot and fleet.", value=self._app[HUB].stream_count
        )
        yield from _forward_metrics(self._app.get(FORWARDERS) or [])
        if (cluster := self._app.get(CLUSTER)) is not None:
            yield from _cluster_metrics(cluster)


def _cluster_metrics(cluster: ClusterIngest) -> Iterator[Metric]:
    """Cluster mode: whether the MQTT cluster is reached, and the statuses handled (committed or refused) and acked."""
    yield GaugeMetricFamily(
        "spotbox_cluster_up", "1 while the MQTT cluster is connected.", value=cluster.check() == "ok"
    )
    yield CounterMetricFamily(
        "spotbox_cluster_handled",
        "Statuses from the cluster handled and acknowledged since start.",
        value=cluster.handled,
    )


def _forward_metrics(forwarders: list[Forwarder]) -> Iterator[Metric]:
    """Store and forward, per target: lag in rows and seconds, forwarded total, whether the uplink is up."""
    if not forwarders:
        return
    lag_rows = GaugeMetricFamily(
        "spotbox_forward_lag_rows", "Stored statuses not yet acknowledged upstream.", labels=["target"]
    )
    lag_seconds = GaugeMetricFamily(
        "spotbox_forward_lag_seconds", "Age of the oldest status not yet acknowledged upstream.", labels=["target"]
    )
    forwarded = CounterMetricFamily(
        "spotbox_forwarded", "Statuses acknowledged by the upstream broker since start.", labels=["target"]
    )
    up = GaugeMetricFamily("spotbox_forward_up", "1 while the uplink to the target is connected.", labels=["target"])
    for forwarder in forwarders:
        labels = [forwarder.target]
        lag_rows.add_metric(labels, forwarder.lag_rows)
        lag_seconds.add_metric(labels, forwarder.lag_seconds)
        forwarded.add_metric(labels, forwarder.forwarded)
        up.add_metric(labels, 1 if forwarder.client.connected else 0)
    yield from (lag_rows, lag_seconds, forwarded, up)


def _dropped(broker: Broker) -> Iterator[Metric]:
    """Messages the broker did not deliver, by why; connections refused while too many were logging in."""
    dropped = CounterMetricFamily(
        "spotbox_mqtt_messages_dropped",
        "MQTT messages not delivered to a subscriber: session queue full (--max-queued), QoS 0 past the outbound "
        "budget (--max-outbound-bytes), expired, over the client's Maximum Packet Size, or failed (the delivery "
        "raised, and was logged).",
        labels=["reason"],
    )
    counters = broker.counters
    dropped.add_metric(["queue_full"], broker.sessions.counters.queue_full)
    dropped.add_metric(["max_outbound_bytes"], counters.dropped_max_outbound_bytes)
    dropped.add_metric(["expired"], counters.dropped_expired)
    dropped.add_metric(["too_large"], counters.dropped_too_large)
    dropped.add_metric(["failed"], broker.router.counters.failed)
    yield dropped
    yield CounterMetricFamily(
        "spotbox_mqtt_connections_refused",
        "MQTT connections refused because too many were still logging in (--max-pending-logins).",
        value=counters.refused_connections,
    )


def add_routes(app: web.Application) -> None:
    """Give the app its own registry (tests run many apps in one process) and serve it at /metrics."""
    registry = CollectorRegistry()
    registry.register(SpotboxCollector(app))
    # The standard process_* (CPU, memory, open files) and python_* (version, garbage collector) series that
    # dashboards and alerts expect of any Python exporter.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    app[METRICS] = registry
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
