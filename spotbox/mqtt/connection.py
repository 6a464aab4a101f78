"""One MQTT client connection: one reader loop, framing each packet once from one buffer, one `match` to dispatch.

The loop reads bytes into a bytearray, takes whole packets off its front (the fixed header first, so a packet over
the size limit is refused before its body is read), decodes each exactly once (codec311 or `mqtt5`, picked by the
CONNECT) and dispatches it. A malformed packet ends the connection (MQTT 5: DISCONNECT 0x81/0x82 first) with one
log line; its bytes are never read as further packets.

Backpressure: an MQTT 3.1.1 connection is not read while Receive Maximum (--receive-maximum) of its statuses wait
for their commit, or while the ingest queue is full; an MQTT 5 connection keeps being read and is held to the
Receive Maximum spotbox announced (DISCONNECT 0x93 beyond it). Time spent paused never counts as keep-alive silence.

Writes are coalesced: everything written in one event-loop turn leaves in one system call. What a client does not
read stays within its outbound byte budget: past it, QoS 0 messages are dropped (counted) and QoS 1/2 ones wait in
its session's queue; a client stuck past the budget for too long is disconnected (see Broker's clock).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol, TypeVar

import mqtt5

from spotbox.mqtt import wire
from spotbox.mqtt.errors import IdentifierRejected, MalformedPacket, UnsupportedProtocol
from spotbox.mqtt.framing import fixed_header
from spotbox.mqtt.message import Message
from spotbox.mqtt.publish import Pending
from spotbox.mqtt.sessions import Outgoing, Queued, Session
from spotbox.mqtt.wire import (
    PUBCOMP,
    PUBREC,
    PUBREL,
    Ack,
    Connect,
    Disconnect,
    Other,
    PingReq,
    ProtocolViolation,
    Publish,
    Subscribe,
    Unsubscribe,
    Wire5,
    Wire311,
)

if TYPE_CHECKING:
    from spotbox.mqtt.broker import Broker

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Topic aliases spotbox sets towards one MQTT 5 client, whatever Topic Alias Maximum it announces: each keeps a
# topic (up to --max-topic-length) for the connection's life, and 65,535 of them would be 70 MB per subscriber.
OUTGOING_ALIASES_MAX = 32
# After DISCONNECT 0x93 (Receive Maximum exceeded), how long what the client still sends is read and dropped.
LINGER_S = 1.0
_CONNECT = 1
_PUBLISH = 3
_Reason = mqtt5.DisconnectReasonCode


class Stream(Protocol):
    """A client's byte stream (TCP, TLS or WebSocket), as the connection uses it."""

    peer: str
    address: str

    async def read(self) -> bytes:
        """The next bytes from the client; b"" once the stream has ended."""
        ...

    async def handshake(self, timeout_s: float) -> bool:
        """Start TLS if the listener speaks it, within `timeout_s`; False when that failed."""
        ...

    def write(self, data: bytes) -> None:
        """Queue bytes for the client (never blocks)."""

    def buffered(self) -> int:
        """Bytes written and not yet taken by the network."""
        ...

    def pause_reading(self) -> None:
        """Stop taking bytes from the network (shutdown)."""

    async def finish(self, timeout_s: float) -> None:
        """Send what is written and end our side, then drop what the client still sends, for up to `timeout_s`."""

    def close(self) -> None:
        """Send what is buffered, then close."""

    def abort(self) -> None:
        """Close at once, dropping what is buffered."""


class Closed(Exception):  # noqa: N818 - a signal, not a failure
    """The connection ends now; `code` is the MQTT 5 DISCONNECT reason to send first (None: nothing to send)."""

    def __init__(self, reason: str, code: int | None = None, *, level: int = logging.INFO) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.level = level


class Connection:
    """One client, from its first byte to its last."""

    def __init__(self, broker: Broker, stream: Stream) -> None:
        self.broker = broker
        self.stream = stream
        self.wire: Wire311 | Wire5 = Wire311()
        self.session: Session | None = None
        self.client_id: str | None = None
        self.logged_in = False
        self.started = time.monotonic()
        self.last_heard = self.started
        self.keep_alive_s = 0
        # The client's Receive Maximum: QoS 1/2 PUBLISHes to it not yet acknowledged [MQTT-3.3.4-9].
        self.send_quota = 65535
        # Serials of statuses this connection stored (for presence: on_connection_closed).
        self.serials: set[str] = set()
        # Received PUBLISHes not yet settled (routed and acknowledged), in arrival order.
        self.pending: deque[Pending] = deque()
        self.uncommitted = 0  # statuses waiting for their commit (a 3.1.1 connection's read window)
        self.unacked_in = 0  # QoS 1/2 PUBLISHes received and not yet fully acknowledged (MQTT 5 Receive Maximum)
        # Packet ids of QoS 2 PUBLISHes received and not yet answered with PUBREC (their commit pending).
        self.receiving_qos2: set[int] = set()
        self.paused_depth = 0
        # Over its outbound budget, or with messages queued for room: the clock watches it (stuck? room again?).
        self.congested = False
        # Since when the client is over its outbound budget with no byte taken, and how much was unsent then.
        self.over_budget_since: float | None = None
        self._stuck_at = 0
        self.stopping = False
        self.ended = False
        self.kicked_at: float | None = None  # when spotbox closed it (the clock cuts it if it does not go)
        self._window_free = asyncio.Event()
        self._buffer = bytearray()
        self._out = bytearray()
        self._flush_handle: asyncio.Handle | None = None
        self._settling = False  # settling a round of commits: its writes are flushed at its end, not scheduled
        self._outgoing_aliases: dict[str, int] = {}
        self._will_on_close = True

    # --- the reader loop -----------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the client: CONNECT within the deadline, then packets until the end; the session's end after."""
        try:
            connect = await self._read_connect()
            if connect is not None and await self.broker.login(self, connect):
                await self._serve()
        except Closed as closed:
            self._log_end(closed)
            if closed.code is not None and self.logged_in and isinstance(self.wire, Wire5):
                self.write(self.wire.disconnect(closed.code, closed.reason))
                if closed.code == _Reason.RECEIVE_MAX_EXCEEDED:
                    # A client past its quota is still writing (PUBRELs for the PUBRECs it reads): a reset would
                    # reach it before the reason; let it finish, unread, for a moment. Not after other errors: some
                    # clients wait forever on a half-closed connection where a reset ends them.
                    self._flush()
                    await self.stream.finish(LINGER_S)
        except (ConnectionError, OSError) as exc:
            logger.info("mqtt connection %s (%r) lost: %s", self.stream.peer, self.client_id, exc)
        except asyncio.CancelledError:
            self._will_on_close = False
            raise
        finally:
            self.end()

    def _log_end(self, closed: Closed) -> None:
        logger.log(closed.level, "mqtt connection %s (%r) closed: %s", self.stream.peer, self.client_id, closed.reason)

    async def _more(self) -> None:
        """Read more bytes into the buffer; Closed at the end of the stream."""
        data = await self.stream.read()
        if not data:
            raise Closed("connection closed by the client", level=logging.DEBUG)
        self.last_heard = time.monotonic()
        self._buffer += data

    async def _read_connect(self) -> Connect | None:
        """The first packet, which must be a CONNECT; None when it was refused (the CONNACK, if any, is sent)."""
        limits = self.broker.limits
        try:
            while (header := fixed_header(self._buffer)) is None:
                await self._more()
        except MalformedPacket as exc:
            raise Closed(f"malformed first packet: {exc.reason}", level=logging.WARNING) from None
        first, length, header_len = header
        if first >> 4 != _CONNECT:
            raise Closed(f"the first packet is type {first >> 4}, not CONNECT", level=logging.WARNING)
        if length > limits.max_packet:
            raise Closed(f"a CONNECT of {length} bytes is over the limit of {limits.max_packet}", level=logging.WARNING)
        while len(self._buffer) < header_len + length:
            await self._more()
        frame = bytes(self._buffer[: header_len + length])
        del self._buffer[: header_len + length]
        body = memoryview(frame)[header_len:]
        try:
            version = wire.connect_version(body)
            return wire.decode_connect(version, memoryview(frame), header_len)
        except UnsupportedProtocol as exc:
            self.stream.write(Wire311().connack(False, 0x01))  # unacceptable protocol version [MQTT-3.1.2-2]
            raise Closed(f"CONNECT refused: {exc.reason}", level=logging.WARNING) from None
        except IdentifierRejected as exc:
            self.stream.write(Wire311().connack(False, 0x02))  # [MQTT-3.1.3-8]
            raise Closed(f"CONNECT refused: {exc.reason}", level=logging.WARNING) from None
        except MalformedPacket as exc:
            if body[len(body) > 6 and 6] == 5:
                # An MQTT 5 CONNECT: CONNACK 0x81 Malformed Packet [MQTT-4.13.1-1], or 0x82 Protocol Error.
                code = int(exc.code) if isinstance(exc, ProtocolViolation) else 0x81
                self.stream.write(Wire5().connack(False, code))
            raise Closed(f"malformed CONNECT: {exc.reason}", level=logging.WARNING) from None

    async def _serve(self) -> None:
        """The loop: frame every whole packet in the buffer, dispatch it, read more; until the connection ends."""
        buffer = self._buffer
        limits = self.broker.limits
        # A PUBLISH no longer than both limits cannot break either (a topic length past its packet is malformed).
        small = min(limits.max_topic_length, limits.max_payload)
        while True:
            start = 0
            try:
                while not self.stopping and (header := fixed_header(buffer, start)) is not None:
                    first, length, header_len = header
                    end = start + header_len + length
                    if first >> 4 == _PUBLISH:
                        if length > small:
                            self._check_publish_size(buffer, start, header_len, length)
                    elif length > limits.max_packet:
                        raise Closed(
                            f"a packet of {length} bytes is over the limit of {limits.max_packet}",
                            _Reason.PACKET_TOO_LARGE,
                            level=logging.WARNING,
                        )
                    if end > len(buffer):
                        break
                    frame = bytes(buffer[start:end])
                    start = end
                    packet = self.wire.decode(memoryview(frame), header_len)
                    if type(packet) is Publish:  # most packets: one call less than through the match
                        await self._on_publish(packet)
                    else:
                        await self._dispatch(packet)
            except ProtocolViolation as exc:
                raise Closed(exc.reason, exc.code, level=logging.WARNING) from None
            except MalformedPacket as exc:
                raise Closed(
                    f"malformed packet: {exc.reason}", _Reason.MALFORMED_PACKET, level=logging.WARNING
                ) from None
            finally:
                if start:
                    del buffer[:start]
            await self._more()

    def _check_publish_size(self, buffer: bytearray, start: int, header_len: int, length: int) -> None:
        """Refuse a PUBLISH over --max-topic-length or --max-payload as soon as its first body bytes are here."""
        limits = self.broker.limits
        body = start + header_len
        if len(buffer) < body + 2:
            if length > limits.max_packet:
                raise Closed(
                    f"a PUBLISH of {length} bytes is over --max-payload {limits.max_payload}",
                    _Reason.PACKET_TOO_LARGE,
                    level=logging.WARNING,
                )
            return
        topic_length = buffer[body] << 8 | buffer[body + 1]
        if topic_length > limits.max_topic_length:
            raise Closed(
                f"a topic of {topic_length} bytes is over --max-topic-length {limits.max_topic_length}",
                _Reason.TOPIC_NAME_INVALID,
                level=logging.WARNING,
            )
        if length > limits.max_payload:
            # Properties (MQTT 5) are counted as payload here: a bound, never more lenient than the limit.
            payload = length - 2 - topic_length - (2 if buffer[start] & 0x06 else 0)
            if payload > limits.max_payload:
                raise Closed(
                    f"a PUBLISH payload of {payload} bytes is over --max-payload {limits.max_payload}",
                    _Reason.PACKET_TOO_LARGE,
                    level=logging.WARNING,
                )

    async def _dispatch(self, packet: wire.Packet) -> None:  # noqa: PLR0912 - one case per packet type
        """One packet from the client."""
        session = self.session
        assert session is not None
        match packet:
            case Publish():
                await self._on_publish(packet)
            case Ack(kind=wire.PUBACK):
                self._acknowledged(packet.packet_id, 1)
            case Ack(kind=wire.PUBREC):
                self._on_pubrec(packet)
            case Ack(kind=wire.PUBCOMP):
                self._acknowledged(packet.packet_id, 2)
            case Ack(kind=wire.PUBREL):
                if packet.packet_id in session.awaiting_pubrel:
                    session.awaiting_pubrel.discard(packet.packet_id)
                    self.unacked_in = max(0, self.unacked_in - 1)
                    self.write(self.wire.ack(PUBCOMP, packet.packet_id))
                else:
                    self.write(self.wire.ack(PUBCOMP, packet.packet_id, 0x92))  # packet identifier not found
            case Subscribe():
                self.broker.subscribe(self, packet)
            case Unsubscribe():
                self.broker.unsubscribe(self, packet)
            case PingReq():
                self.write(self.wire.pingresp())
            case Disconnect():
                self._on_disconnect(packet)
            case Other() | Connect():
                # A second CONNECT [MQTT-3.1.0-2], AUTH without a method [MQTT-4.12.0-1], or a server's packet.
                raise Closed(
                    f"unexpected {type(packet).__name__} packet", _Reason.PROTOCOL_ERROR, level=logging.WARNING
                )
            case _:
                raise Closed(f"unexpected {packet!r}", _Reason.PROTOCOL_ERROR, level=logging.WARNING)

    async def _on_publish(self, publish: Publish) -> None:
        session = self.session
        assert session is not None
        if publish.qos:
            if publish.qos == 2 and publish.packet_id in session.awaiting_pubrel:
                # Already routed and answered: a resend gets its PUBREC again, nothing more [MQTT-4.3.3-9].
                self.write(self.wire.ack(PUBREC, publish.packet_id or 0))
                return
            if publish.qos == 2 and publish.packet_id in self.receiving_qos2:
                # A resend of a QoS 2 PUBLISH still on its way to its PUBREC (its commit pending, so it is in
                # `pending`): it gets a PUBREC of its own after the first one's, and nothing is routed twice
                # [MQTT-4.3.3-9]; nor does it take a second place of the Receive Maximum.
                self.pending.append(Pending(publish, None))
                return
            if isinstance(self.wire, Wire5) and self.unacked_in >= self.broker.limits.receive_maximum:
                raise Closed(
                    f"more than Receive Maximum {self.broker.limits.receive_maximum} unacknowledged PUBLISHes",
                    _Reason.RECEIVE_MAX_EXCEEDED,
                    level=logging.WARNING,
                )
            self.unacked_in += 1
            if publish.qos == 2:
                self.receiving_qos2.add(publish.packet_id or 0)
        if isinstance(self.wire, Wire311) and self.uncommitted >= self.broker.limits.receive_maximum:
            await self.paused(self._window_wait())
        pending = await self.broker.publish_path.receive(self, publish, time.monotonic())
        if pending.commit is None and not self.pending:
            self._settle(pending)
            return
        if pending.commit is not None:
            self.uncommitted += 1
        self.pending.append(pending)
        if len(self.pending) == 1 and pending.commit is not None:
            # Only the head of the line is watched: a batch commit then wakes this connection once, not per status.
            pending.commit.add_done_callback(self._commit_done)

    async def _window_wait(self) -> None:
        # The statuses an MQTT 5 client may have unacknowledged: a 3.1.1 client, which cannot be told a limit, is
        # read no further than that ahead of its commits. Deep enough for a few publishers to keep the writer's
        # batches full while one commits (64 held three lean publishers near 13,000 a second; 100, 25,000).
        while self.uncommitted >= self.broker.limits.receive_maximum:
            self._window_free.clear()
            await self._window_free.wait()

    async def paused(self, waiting: Awaitable[T]) -> T:
        """Wait for room (backpressure) without reading; counted in /metrics; not keep-alive silence."""
        self.paused_depth += 1
        self.broker.paused_connections += 1
        try:
            return await waiting
        finally:
            self.paused_depth -= 1
            self.broker.paused_connections -= 1
            self.last_heard = time.monotonic()

    def _commit_done(self, _: asyncio.Future[int | None]) -> None:
        """The head of the line is committed: settle every publish at the front that is ready, in order, then watch
        the new head; the acknowledgements leave in one write at the end."""
        self._settling = True
        try:
            self._settle_ready()
        finally:
            self._settling = False
        self._flush()
        self._window_free.set()

    def _settle_ready(self) -> None:
        pending = self.pending
        while pending and (pending[0].commit is None or pending[0].commit.done()):
            item = pending.popleft()
            if item.commit is not None:
                self.uncommitted -= 1
            try:
                self._settle(item)
            except Exception:
                logger.exception("settling a publish of %r failed", self.client_id)
        if pending:
            head = pending[0].commit
            assert head is not None  # a head without a commit is settled by the loop above
            head.add_done_callback(self._commit_done)

    def _settle(self, pending: Pending) -> None:
        publish = pending.publish
        if publish.qos == 2:
            self.receiving_qos2.discard(publish.packet_id or 0)
        self.broker.publish_path.settle(self, pending)
        if publish.qos == 1 or (
            publish.qos == 2 and self.session is not None and publish.packet_id not in self.session.awaiting_pubrel
        ):
            self.unacked_in = max(0, self.unacked_in - 1)

    def _on_disconnect(self, packet: Disconnect) -> None:
        session = self.session
        assert session is not None
        if packet.session_expiry_s is not None:
            if session.expiry_s == 0 and packet.session_expiry_s != 0:
                raise Closed("session expiry set on DISCONNECT after 0 on CONNECT", _Reason.PROTOCOL_ERROR)
            self.broker.sessions.set_expiry(session, packet.session_expiry_s)  # MQTT 5.0 3.14.2.2.2
        # The will is published only when the client asks with 0x04 [MQTT-3.14.4-3].
        self._will_on_close = packet.reason_code == _Reason.DISCONNECT_WITH_WILL_MESSAGE
        raise Closed("DISCONNECT", level=logging.DEBUG)

    # --- sending ------------------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue bytes; everything queued in this event-loop turn leaves in one write."""
        if self.ended:
            return
        self._out += data
        if self._flush_handle is None and not self._settling:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._out and not self.ended:
            data = bytes(self._out)
            self._out.clear()
            self.stream.write(data)

    def buffered(self) -> int:
        """Bytes for the client not yet taken by the network."""
        return len(self._out) + self.stream.buffered()

    def over_budget(self) -> bool:
        """True while the client leaves more than its outbound budget unread (then the clock watches it)."""
        if self.buffered() > self.broker.limits.max_outbound_bytes:
            self.congested = True
            return True
        return False

    def stuck_for(self, now: float) -> float:
        """Seconds this client has been over its outbound budget without taking a byte of it (0: not stuck).

        A slow reader makes progress and is never cut; one that reads nothing at all is. Once it is under its
        budget with nothing queued, the clock stops watching it.
        """
        buffered = self.buffered()
        if buffered <= self.broker.limits.max_outbound_bytes:
            self.over_budget_since = None
            self.congested = bool(self.session is not None and self.session.queue)
            return 0.0
        if self.over_budget_since is None or buffered < self._stuck_at:
            self.over_budget_since, self._stuck_at = now, buffered
        return now - self.over_budget_since

    def send_ack(self, kind: int, packet_id: int, code: int = 0, reason: str | None = None) -> None:
        """PUBACK/PUBREC (and the rest) with a reason code where the version has one."""
        self.write(self.wire.ack(kind, packet_id, code, reason))

    def send_publish(self, item: Queued) -> None:
        """Deliver a routed message within the client's limits; QoS 1/2 past them waits in the session's queue."""
        session = self.session
        assert session is not None
        counters = self.broker.counters
        if item.qos == 0:
            if self.over_budget():
                counters.dropped_max_outbound_bytes += 1
                return
            self._send(item.message, 0, item.retain, None, False, item.subscription_ids)
            return
        if session.queue or len(session.inflight) >= self.send_quota or self.over_budget():
            self.broker.sessions.enqueue(session, item)
            self.congested = True
            return
        if not self.broker.sessions.hold(session, item.message):
            self.broker.sessions.counters.queue_full += 1  # the session holds its byte budget in flight
            return
        self._send_tracked(item)

    def _send_tracked(self, item: Queued) -> None:
        """Send a QoS 1/2 message already held for the session (Sessions.hold) and keep it until acknowledged.

        A message that fails to encode is dropped here, its bytes released (its packet id was never kept): left
        held, repeated failures would exhaust the byte budgets and drop every later delivery as queue_full, and
        raised from `pump` it would end the subscriber's connection on the acknowledgement that sent it.
        """
        session = self.session
        assert session is not None
        packet_id = session.take_packet_id()
        try:
            sent = self._send(item.message, item.qos, item.retain, packet_id, False, item.subscription_ids)
        except Exception:
            self.broker.sessions.release(session, item.message)
            self.broker.router.counters.failed += 1
            logger.exception("message on %r not delivered to %r", item.message.topic, self.client_id)
            return
        if sent:
            session.inflight[packet_id] = Outgoing(
                packet_id, item.message, item.qos, item.retain, item.subscription_ids
            )
        else:
            self.broker.sessions.release(session, item.message)

    def _send(self, message: Message, qos: int, retain: bool, packet_id: int | None, dup: bool, ids: list[int]) -> bool:
        """Encode and write one PUBLISH; False when it expired or is over the client's Maximum Packet Size."""
        now = time.monotonic()
        counters = self.broker.counters
        if message.expired(now):
            counters.dropped_expired += 1  # [MQTT-3.3.2-5]
            return False
        alias, send_topic, new_alias = None, True, False
        if isinstance(self.wire, Wire5) and self.wire.topic_alias_max:
            alias = self._outgoing_aliases.get(message.topic)
            if alias is not None:
                send_topic = False
            elif len(self._outgoing_aliases) < min(self.wire.topic_alias_max, OUTGOING_ALIASES_MAX):
                alias, new_alias = len(self._outgoing_aliases) + 1, True
        data = self.wire.publish(message, qos, retain, packet_id, dup, ids, alias, send_topic, now)
        limit = self.wire.max_packet_size if isinstance(self.wire, Wire5) else None
        if limit is not None and len(data) > limit:
            counters.dropped_too_large += 1  # [MQTT-3.1.2-25]
            return False
        if new_alias and alias is not None:
            self._outgoing_aliases[message.topic] = alias
        self.write(data)
        return True

    def _acknowledged(self, packet_id: int, qos: int) -> None:
        """PUBACK (QoS 1) or PUBCOMP (QoS 2) from the client: the message is delivered; send what waits."""
        session = self.session
        assert session is not None
        outgoing = session.inflight.get(packet_id)
        if outgoing is not None and outgoing.qos == qos:
            del session.inflight[packet_id]
            self.broker.sessions.release(session, outgoing.message)
            self.pump()

    def _on_pubrec(self, packet: Ack) -> None:
        session = self.session
        assert session is not None
        outgoing = session.inflight.get(packet.packet_id)
        if outgoing is None or outgoing.qos != 2:
            self.write(self.wire.ack(PUBREL, packet.packet_id, 0x92))  # packet identifier not found
            return
        if packet.reason_code >= 0x80:  # the subscriber refused it: the flow ends here (MQTT 5.0 4.3.3)
            del session.inflight[packet.packet_id]
            self.broker.sessions.release(session, outgoing.message)
            self.pump()
            return
        outgoing.released = True
        self.write(self.wire.ack(PUBREL, packet.packet_id))

    def pump(self) -> None:
        """Send queued messages while the client's Receive Maximum and the outbound budget allow."""
        session = self.session
        if session is None:
            return
        queue = session.queue
        while queue and len(session.inflight) < self.send_quota and not self.over_budget():
            item = queue.popleft()
            if item.qos == 0:
                self.broker.sessions.release(session, item.message)
                self._send(item.message, 0, item.retain, None, False, item.subscription_ids)
            else:
                self._send_tracked(item)

    def resume(self) -> None:
        """After CONNACK on a resumed session: resend what is in flight, in order, with DUP; then the queue."""
        session = self.session
        assert session is not None
        for outgoing in list(session.inflight.values()):
            if outgoing.released:
                self.write(self.wire.ack(PUBREL, outgoing.packet_id))
            elif not self._send(
                outgoing.message, outgoing.qos, outgoing.retain, outgoing.packet_id, True, outgoing.subscription_ids
            ):
                del session.inflight[outgoing.packet_id]
                self.broker.sessions.release(session, outgoing.message)
        self.unacked_in = len(session.awaiting_pubrel)
        self.pump()

    # --- the end ------------------------------------------------------------------------------------------------

    def kick(self, code: int, reason: str, *, abort: bool = False) -> None:
        """End this connection from outside (take-over, keep alive, stuck): DISCONNECT (MQTT 5), then close; `abort`
        drops what is unsent, for a client that takes nothing (closing would wait for it forever)."""
        logger.info("mqtt connection %s (%r) closed: %s", self.stream.peer, self.client_id, reason)
        self.kicked_at = time.monotonic()
        if isinstance(self.wire, Wire5) and self.logged_in and not abort:
            self.write(self.wire.disconnect(code, reason))
        self._flush()
        self.detach(publish_will=True)
        if abort:
            self.stream.abort()
        else:
            self.stream.close()

    def detach(self, *, publish_will: bool) -> None:
        """Leave the session (its will and ending decided now); the connection is then only closing."""
        if self.session is not None and self.session.connection is self:
            self.broker.connection_ended(self, self.session, publish_will=publish_will)
        self.session = None

    def end(self) -> None:
        """The reader loop is over: the session's end, and the socket closed after what is queued."""
        if self.ended:
            return
        self.detach(publish_will=self._will_on_close)
        self._flush()
        self.ended = True
        self.stream.close()
        self.broker.connection_closed(self)
