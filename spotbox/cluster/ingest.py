"""Cluster mode: no embedded broker; spotbox takes its share of the fleet's statuses from an MQTT cluster.

Each instance joins the cluster as an MQTT 5 client with a persistent session (client id `spotbox-{instance id}`,
a session expiry) subscribed to `$share/spotbox/robot/+/status` at QoS 1, so the cluster hands each status to one
instance. A status is validated and committed (the same `check` and `commit` as the embedded broker's publish path),
and only then acknowledged to the cluster, in the order received [MQTT-4.6.0-2]: an instance that crashes leaves
every status it had not committed unacknowledged, and the cluster delivers them again (DUP) when it returns with the
same instance id. The publisher's own acknowledgement comes from the cluster.

- A refused status is handled: acknowledged, counted, and its report published to `spotbox/rejected/{serial}`.
- A redelivered status is stored once: one with a timestamp by the storage's (serial, ts, payload) key; one without
  by its delivery key (this instance's client id, the cluster's packet id, the payload digest), stored with the row
  as the embedded broker stores a robot's (status.Delivery), so that a restart finds it too.
- A row the database refuses for good (not an outage: those are retried by the writer) is logged and acknowledged,
  or it would hold back every later acknowledgement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from datetime import datetime

import mqtt5

from spotbox.cluster.client import BrokerURL, ConnectionLostError, MqttClient, PublishRefusedError
from spotbox.cluster.client import Delivery as ClusterDelivery
from spotbox.errors import StorageError
from spotbox.pipeline import IngestPipeline
from spotbox.status import Delivery, payload_digest, status_topic_serial
from spotbox.storage.postgres import PostgresStorage
from spotbox.validation import Rejection, rejection_report

logger = logging.getLogger(__name__)

SHARED_STATUS_FILTER = "$share/spotbox/robot/+/status"
REJECTED_TOPIC = "spotbox/rejected/{serial}"


class ClusterIngest:
    """One instance's share of the cluster's statuses: receive, check, commit, then acknowledge."""

    def __init__(
        self,
        pipeline: IngestPipeline,
        storage: PostgresStorage,
        url: BrokerURL,
        *,
        instance_id: str,
        session_expiry: int,
        inflight: int,
        keep_alive: int = 30,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.storage = storage
        self.instance_id = instance_id
        self.client = MqttClient(
            url,
            f"spotbox-{instance_id}",
            keep_alive=keep_alive,
            session_expiry=session_expiry,
            clean_start=False,
            subscriptions=[mqtt5.TopicFilter(SHARED_STATUS_FILTER, max_qos=mqtt5.QoS.AT_LEAST_ONCE)],
            ssl_context=tls if url.tls else None,
            receive_max=inflight,
            backoff_max_s=10.0,
            name="cluster",
        )
        self.handled = 0
        self.refused_rows = 0
        # packet id -> (payload digest, first receive time) of statuses without a timestamp in flight.
        self._unstamped: dict[int, tuple[bytes, datetime]] = {}
        # Deliveries being committed, and rejection reports being published.
        self._handling: set[asyncio.Task[None]] = set()
        self._reports: set[asyncio.Task[None]] = set()
        self._closing = False

    def check(self) -> str:
        """This instance's link to the cluster as /ready names it."""
        if self.client.connected:
            return "ok"
        return f"unreachable: {self.client.url} ({self.client.last_error or self.client.state.value})"

    async def run(self) -> None:
        """Stay connected and take deliveries until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.client.run(), name="spotbox-cluster-client")
            group.create_task(self._consume(), name="spotbox-cluster-consume")

    async def settle(self, timeout_s: float) -> None:
        """Take no new delivery, and wait (bounded) for those being committed so that their acks go out first.

        Whatever is not acknowledged by then stays with the cluster, which delivers it again.
        """
        self._closing = True
        for report in self._reports:
            report.cancel()
        if self._handling:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await asyncio.gather(*self._handling, return_exceptions=True)
        await self.client.drain()

    async def _consume(self) -> None:
        while True:
            delivery = await self.client.deliveries.get()
            if self._closing:
                continue  # left unacknowledged: the cluster delivers it again
            # Many statuses are committed at once (the writer batches them); acks still leave in arrival order.
            task = asyncio.create_task(self._handle(delivery), name="spotbox-cluster-status")
            self._handling.add(task)
            task.add_done_callback(self._handling.discard)

    async def _handle(self, delivery: ClusterDelivery) -> None:
        """Store one delivery, then acknowledge it; cancelled (shutdown), it stays for redelivery."""
        packet = delivery.packet
        try:
            await self._store(packet)
        except StorageError as exc:
            self.refused_rows += 1
            logger.error("cluster status on %s not stored (refused by the database): %s", packet.topic, exc)
        delivery.ack()
        self.handled += 1

    async def _store(self, packet: mqtt5.PublishPacket) -> None:
        serial = status_topic_serial(packet.topic)
        if serial is None:  # the broker sent what the filter does not match
            logger.warning("cluster sent %r on the status subscription; ignored", packet.topic)
            return
        payload = bytes(packet.payload)
        packet_id = packet.packet_id or 0
        first = self._first_received(packet_id, payload) if packet.duplicate else None
        # The delivery key: this instance's session and the cluster's packet id, as the embedded broker keys a
        # robot's session and packet id; stored with a status without a timestamp, it makes a DUP a duplicate.
        delivery = Delivery(self.client.client_id, packet_id, packet.duplicate)
        verdict = await self.pipeline.check_large(serial, payload, first, delivery=delivery)
        if isinstance(verdict, Rejection):
            self._report(packet.topic, verdict, payload)
            return
        if first is None and verdict.ts == verdict.received_at:
            self._unstamped[packet_id] = (verdict.payload_hash, verdict.received_at)
        await self.pipeline.commit(verdict)

    def _first_received(self, packet_id: int, payload: bytes) -> datetime | None:
        """For a resend of a status without a timestamp still known here, when it was first received.

        A resend after a reconnect may come while its first delivery is still being committed: the same receive
        time gives it the same ts, so the two are one row. After a restart the stored delivery key does that.
        """
        known = self._unstamped.get(packet_id)
        return known[1] if known is not None and known[0] == payload_digest(payload) else None

    def _report(self, topic: str, rejection: Rejection, payload: bytes) -> None:
        report = rejection_report(topic, rejection, payload)
        task = asyncio.create_task(
            self._publish_report(REJECTED_TOPIC.format(serial=rejection.serial_number), report),
            name="spotbox-cluster-rejected",
        )
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _publish_report(self, topic: str, report: bytes) -> None:
        try:
            await self.client.publish(topic, report, content_type="application/json")
        except (ConnectionLostError, PublishRefusedError) as exc:
            logger.warning("rejection report to %s not published: %s", topic, exc)
