"""spotbox's own MQTT 5 client, for the uplinks: store-and-forward to a cloud broker, and cluster mode.

aiomqtt acknowledges a received message when its handler returns and cannot hold a PUBACK until a commit, so the
client side is spotbox's own, on the `mqtt5` codec (sans-IO), shaped like aiomqtt 3's `_client.py`: one byte buffer
per connection, `mqtt5.read` (an incomplete packet is "wait for more bytes"), one `match` over packet types, and the
connection's loops as named tasks in one TaskGroup.

- One connection at a time; `run()` reconnects with capped exponential backoff and jitter until cancelled.
- `publish()` sends at QoS 1 and returns once the broker's PUBACK arrives, within the server's Receive Maximum. A
  connection lost first raises `ConnectionLostError`: the caller resends (delivery is at least once).
- Received QoS 1 messages are handed over as `Delivery` objects; `Delivery.ack()` may be called in any order, but
  PUBACKs go out in the order the messages arrived [MQTT-4.6.0-2], so a broker may take a PUBACK for "this and all
  before it" and a crash leaves every unacknowledged message for redelivery.
- Keep alive: a PINGREQ after `keep_alive` seconds without sending; no packet at all from the broker for 1.5 times
  that ends the connection. A silent link (no FIN, no RST: a broker frozen, a cable cut) is noticed this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import mqtt5

from spotbox.errors import ConfigError, SpotboxError

logger = logging.getLogger(__name__)

_READ_CHUNK = 65536


class ConnectionLostError(SpotboxError):
    """The connection ended before the broker acknowledged a publish; send it again."""


class PublishRefusedError(SpotboxError):
    """The broker answered a publish with a refusal reason code (0x80 or more)."""

    def __init__(self, topic: str, code: int, reason: str | None) -> None:
        super().__init__(f"publish to {topic!r} refused: 0x{code:02X} {reason or mqtt5.PubAckReasonCode(code).name}")
        self.code = code


class ConnectRefusedError(SpotboxError):
    """The broker refused the CONNECT (bad login, not authorized, ...): retried with backoff, reported as state."""


@dataclass(frozen=True)
class BrokerURL:
    """`mqtt://user:pass@host:port` or `mqtts://...` (TLS), as an uplink option takes it."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str, option: str) -> BrokerURL:
        """Parse an uplink URL; raise ConfigError naming `option` when it is not one."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(option, f"{_redact(url)!r} is not mqtt://[user:pass@]host[:port] or mqtts://...")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(option, f"{_redact(url)!r} has an invalid port") from None
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname,
            port=port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    def __str__(self) -> str:
        """The URL without its password, for logs and status pages."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return url.replace(f":{parts.password}@", ":***@", 1) if parts.password else url


class LinkState(enum.Enum):
    """Where the uplink is, as /metrics and status routes show it."""

    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"


@dataclass(eq=False)
class Delivery:
    """One received message; `ack()` lets its PUBACK go out (after those of every earlier message)."""

    packet: mqtt5.PublishPacket
    _done: Callable[[Delivery], None]
    acked: bool = False

    def ack(self) -> None:
        """Mark this message handled; QoS 0 messages need no acknowledgement."""
        if not self.acked:
            self.acked = True
            self._done(self)


class _Connection:
    """One live connection: its stream, its in-flight publishes and the received messages not yet acknowledged."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, receive_max: int) -> None:
        self.reader = reader
        self.writer = writer
        self.window = asyncio.Semaphore(receive_max)
        self.receive_max = receive_max
        self.pending: dict[int, asyncio.Future[mqtt5.PubAckPacket]] = {}
        self.unacked: deque[Delivery] = deque()
        self.last_sent = time.monotonic()
        self.last_received = time.monotonic()
        self.closed = False
        self._release_scheduled = False

    def send(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionLostError("connection closed")
        self.writer.write(data)
        self.last_sent = time.monotonic()

    def schedule_release(self) -> None:
        """Send the PUBACKs that became due, once this turn of the event loop is over.

        Many messages are acknowledged in one turn (a committed batch wakes all its waiters): their PUBACKs then
        leave in one write, not one system call each.
        """
        if not self._release_scheduled:
            self._release_scheduled = True
            asyncio.get_running_loop().call_soon(self.release_acks)

    def release_acks(self) -> None:
        """Send the PUBACKs of the acknowledged messages at the head of the arrival order [MQTT-4.6.0-2]."""
        self._release_scheduled = False
        acks = []
        while self.unacked and self.unacked[0].acked:
            packet_id = self.unacked.popleft().packet.packet_id
            assert packet_id is not None
            acks.append(mqtt5.PubAckPacket(packet_id).write())
        if acks:
            with contextlib.suppress(ConnectionLostError):
                self.send(b"".join(acks))

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.writer.transport.abort()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionLostError(reason))
        self.pending.clear()


class MqttClient:
    """An MQTT 5 client that stays connected: publish at QoS 1 with acknowledgement, receive with manual acks."""

    def __init__(
        self,
        url: BrokerURL,
        client_id: str,
        *,
        keep_alive: int = 30,
        session_expiry: int = 0,
        clean_start: bool = True,
        subscriptions: list[mqtt5.TopicFilter] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout_s: float = 10.0,
        backoff_first_s: float = 0.5,
        backoff_max_s: float = 30.0,
        receive_max: int | None = None,
        name: str = "uplink",
    ) -> None:
        self.url = url
        self.client_id = client_id
        self.keep_alive = keep_alive
        self.session_expiry = session_expiry
        self.clean_start = clean_start
        self.subscriptions = list(subscriptions or [])
        self.ssl_context = ssl_context if ssl_context is not None or not url.tls else ssl.create_default_context()
        self.connect_timeout_s = connect_timeout_s
        self.backoff_first_s = backoff_first_s
        self.backoff_max_s = backoff_max_s
        # Our Receive Maximum: how many QoS 1 messages the broker may send before we acknowledge them.
        self.receive_max = receive_max
        self.name = name
        self.state = LinkState.CONNECTING
        self.last_error: str | None = None
        self.connects = 0
        # Messages received on the subscriptions; each must be acknowledged (QoS 1) with Delivery.ack().
        self.deliveries: asyncio.Queue[Delivery] = asyncio.Queue()
        self._connection: _Connection | None = None
        self._connected = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._changed = asyncio.Event()
        self._next_id = 0

    @property
    def connected(self) -> bool:
        """True while a connection is up and accepted."""
        return self._connection is not None and not self._connection.closed

    async def wait_changed(self) -> None:
        """Return at the next change of state or last error (for status pages and tests)."""
        self._changed.clear()
        await self._changed.wait()

    async def wait_connected(self) -> None:
        """Return once a connection is up."""
        await self._connected.wait()

    async def wait_subscribed(self) -> None:
        """Return once the broker answered the subscriptions of the current connection (SUBACK)."""
        await self._subscribed.wait()

    async def run(self) -> None:
        """Connect, serve the connection, and reconnect with capped backoff when it ends; until cancelled."""
        delay = self.backoff_first_s
        while True:
            self.state = LinkState.CONNECTING
            try:
                await self._serve_once()
                delay = self.backoff_first_s  # it was up: start the backoff again from the bottom
            except (OSError, TimeoutError, ConnectionLostError, ConnectRefusedError, ValueError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                if self.state is not LinkState.DOWN:
                    logger.warning("%s %s: connection ended: %s", self.name, self.url, self.last_error)
            self.state = LinkState.DOWN
            self._changed.set()
            # Jitter spreads many gateways' reconnects after a cloud outage.
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - not cryptographic
            delay = min(delay * 2, self.backoff_max_s)

    def publish_nowait(
        self,
        topic: str,
        payload: bytes,
        *,
        user_properties: list[tuple[str, str]] | None = None,
        content_type: str | None = None,
        retain: bool = False,
    ) -> asyncio.Future[mqtt5.PubAckPacket]:
        """Write a QoS 1 PUBLISH now; the future is the broker's PUBACK.

        For callers that pipeline many messages and keep to `receive_maximum` themselves. Raises ConnectionLostError
        when not connected; the future fails with it when the connection ends before the PUBACK.
        """
        connection = self._connection
        if connection is None or connection.closed:
            raise ConnectionLostError("not connected")
        packet_id = self._packet_id(connection)
        future: asyncio.Future[mqtt5.PubAckPacket] = asyncio.get_running_loop().create_future()
        connection.pending[packet_id] = future
        packet = mqtt5.PublishPacket(
            topic,
            payload,
            qos=mqtt5.QoS.AT_LEAST_ONCE,
            retain=retain,
            packet_id=packet_id,
            content_type=content_type,
            user_properties=user_properties,
        )
        connection.send(packet.write())
        return future

    @property
    def receive_maximum(self) -> int:
        """How many unacknowledged QoS 1 publishes the broker takes at once (1 while not connected)."""
        connection = self._connection
        return connection.receive_max if connection is not None else 1

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        user_properties: list[tuple[str, str]] | None = None,
        content_type: str | None = None,
        retain: bool = False,
    ) -> None:
        """Publish at QoS 1 and return once the broker acknowledged it.

        Waits for a connection and for room under the server's Receive Maximum. Raises ConnectionLostError when the
        connection ends before the PUBACK (send it again), PublishRefusedError for a refusal reason code.
        """
        while True:
            await self._connected.wait()
            connection = self._connection
            if connection is not None and not connection.closed:
                break
            await asyncio.sleep(0)
        async with connection.window:
            future = self.publish_nowait(
                topic, payload, user_properties=user_properties, content_type=content_type, retain=retain
            )
            ack = await future
        raise_for_refusal(topic, ack)

    async def drain(self) -> None:
        """Wait until what was written has been handed to the OS (flow control towards a slow broker)."""
        connection = self._connection
        if connection is not None and not connection.closed:
            with contextlib.suppress(ConnectionError):
                await connection.writer.drain()

    def _packet_id(self, connection: _Connection) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in connection.pending:
                return self._next_id
        raise ConnectionLostError("no free packet id")  # unreachable: the window is at most 65,535

    async def _serve_once(self) -> None:
        async with asyncio.timeout(self.connect_timeout_s):
            reader, writer = await asyncio.open_connection(
                self.url.host, self.url.port, ssl=self.ssl_context, limit=_READ_CHUNK
            )
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.getsockname() == sock.getpeername():
            # TCP's simultaneous open: with the broker down on this host and its port in the ephemeral range, a
            # connect can get that very port as its own and reach itself; it would hold the port the broker needs.
            # Closed with a reset (linger 0): a plain close leaves the port taken until its FIN exchange times out.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            raise ConnectionRefusedError(f"{self.url.host}:{self.url.port}: connected to itself (broker not listening)")
        buffer = bytearray()
        try:
            connack = await self._handshake(reader, writer, buffer)
        except BaseException:
            writer.transport.abort()
            raise
        connection = _Connection(reader, writer, connack.receive_max or 65535)
        keep_alive = connack.server_keep_alive if connack.server_keep_alive is not None else self.keep_alive
        self._connection = connection
        self.connects += 1
        self.state = LinkState.UP
        self.last_error = None
        self._changed.set()
        logger.info("%s %s: connected (session present: %s)", self.name, self.url, connack.session_present)
        try:
            if self.subscriptions:
                connection.send(mqtt5.SubscribePacket(self._packet_id(connection), self.subscriptions).write())
            self._connected.set()
            # The first of the two loops to end ends the connection (not a TaskGroup: one loop ending normally,
            # the keep-alive noticing silence, must stop the other as much as an error does).
            reading = asyncio.create_task(self._read_loop(connection, buffer), name=f"{self.name}-reader")
            pinging = asyncio.create_task(self._keep_alive(connection, keep_alive), name=f"{self.name}-keepalive")
            try:
                done, _ = await asyncio.wait({reading, pinging}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (reading, pinging):
                    task.cancel()
                await asyncio.gather(reading, pinging, return_exceptions=True)
            for task in done:
                if not task.cancelled() and (error := task.exception()) is not None:
                    raise error
        finally:
            self._connected.clear()
            self._subscribed.clear()
            self._connection = None
            connection.close("connection lost")

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, buffer: bytearray
    ) -> mqtt5.ConnAckPacket:
        connect = mqtt5.ConnectPacket(
            self.client_id,
            username=self.url.username,
            password=self.url.password.encode() if self.url.password is not None else None,
            clean_start=self.clean_start,
            keep_alive=self.keep_alive,
            session_expiry_interval=self.session_expiry,
            receive_max=self.receive_max or 65535,
        )
        writer.write(connect.write())
        async with asyncio.timeout(self.connect_timeout_s):
            packet = await _read_packet(reader, buffer)
        if not isinstance(packet, mqtt5.ConnAckPacket):
            raise ConnectionLostError(f"expected CONNACK, got {type(packet).__name__}")
        if packet.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            reason = f"0x{int(packet.reason_code):02X} {packet.reason_code.name}"
            raise ConnectRefusedError(
                f"CONNECT refused: {reason}{f' ({packet.reason_str})' if packet.reason_str else ''}"
            )
        return packet

    async def _read_loop(self, connection: _Connection, buffer: bytearray) -> None:
        while True:
            packet = await _read_packet(connection.reader, buffer)
            connection.last_received = time.monotonic()
            match packet:
                case mqtt5.PubAckPacket():
                    future = connection.pending.pop(packet.packet_id, None)
                    if future is not None and not future.done():
                        future.set_result(packet)
                case mqtt5.PublishPacket():
                    self._received(connection, packet)
                case mqtt5.SubAckPacket():
                    refused = [code.name for code in packet.reason_codes if int(code) >= 0x80]
                    if refused:
                        logger.error("%s %s: subscription refused: %s", self.name, self.url, refused)
                    self._subscribed.set()
                case mqtt5.DisconnectPacket():
                    reason = f"0x{int(packet.reason_code):02X} {packet.reason_code.name}"
                    raise ConnectionLostError(f"broker disconnected: {reason}")
                case mqtt5.PingRespPacket():
                    pass
                case _:
                    logger.debug("%s: ignoring %s", self.name, type(packet).__name__)

    def _received(self, connection: _Connection, packet: mqtt5.PublishPacket) -> None:
        if packet.qos == mqtt5.QoS.AT_MOST_ONCE:
            self.deliveries.put_nowait(Delivery(packet, lambda _: None, acked=True))
            return
        if packet.qos == mqtt5.QoS.EXACTLY_ONCE:
            # spotbox subscribes at QoS 1 only; a broker must not send more than the granted QoS [MQTT-3.8.4-8].
            raise ConnectionLostError("broker sent a QoS 2 message on a QoS 1 subscription")
        delivery = Delivery(packet, lambda _: connection.schedule_release())
        connection.unacked.append(delivery)
        self.deliveries.put_nowait(delivery)

    async def _keep_alive(self, connection: _Connection, keep_alive: int) -> None:
        if keep_alive <= 0:
            await asyncio.Event().wait()
        while True:
            await asyncio.sleep(min(keep_alive / 4, 1.0))
            now = time.monotonic()
            if now - connection.last_received > keep_alive * 1.5:
                raise ConnectionLostError(f"no packet from the broker for {keep_alive * 1.5:.0f} s")
            if now - connection.last_sent >= keep_alive / 2:
                connection.send(mqtt5.PingReqPacket().write())

    async def disconnect(self) -> None:
        """Say goodbye to the broker (a normal DISCONNECT) when connected; `run()` is cancelled by its owner."""
        connection = self._connection
        if connection is None or connection.closed:
            return
        with contextlib.suppress(ConnectionLostError, ConnectionError):
            connection.send(mqtt5.DisconnectPacket().write())
            await connection.writer.drain()
        connection.close("disconnected")


def raise_for_refusal(topic: str, ack: mqtt5.PubAckPacket) -> None:
    """Raise PublishRefusedError when a PUBACK carries a refusal reason code (0x80 or more)."""
    if int(ack.reason_code) >= 0x80:
        raise PublishRefusedError(topic, int(ack.reason_code), ack.reason_str)


async def _read_packet(reader: asyncio.StreamReader, buffer: bytearray) -> mqtt5.Packet:
    """The next packet, framed from `buffer` (topped up from the reader); EOF is ConnectionLostError."""
    while True:
        if buffer:
            try:
                packet, size = mqtt5.read(memoryview(buffer))
            except IndexError:
                pass  # an incomplete packet: wait for more bytes
            else:
                del buffer[:size]
                return packet
        chunk = await reader.read(_READ_CHUNK)
        if not chunk:
            raise ConnectionLostError("connection closed by the broker")
        buffer += chunk
