"""The embedded amqtt broker, with spotbox owning its listeners: MQTT over TCP, and over WebSocket at /mqtt."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Iterator
from functools import partial
from typing import Any

import mqtt5
from amqtt.adapters import BufferReader, ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import BrokerEvents
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, CodecError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.packet import CONNECT
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import IncomingApplicationMessage, Session
from amqtt.utils import gen_client_id

from spotbox.broker.auth import may_publish
from spotbox.broker.handler import REJECTED_TOPIC, RejectedMessage, SpotboxProtocolHandler
from spotbox.broker.limits import MqttLimits, PacketGuard
from spotbox.broker.mqtt5_connect import (
    SESSION_EXPIRY,
    WILL_DELAY,
    client_of,
    decode_connect,
    fill_session,
    is_mqtt5_connect,
    password_text,
    refuse,
)
from spotbox.broker.mqtt5_handler import Mqtt5ProtocolHandler
from spotbox.broker.mqtt5_routing import OPTIONS
from spotbox.broker.mqtt5_sessions import Mqtt5SessionBroker
from spotbox.errors import ListenError
from spotbox.pipeline import IngestPipeline
from spotbox.status import status_topic_serial
from spotbox.users import Users
from spotbox.validation import Rejection, rejection_report

logger = logging.getLogger(__name__)

MQTT_3_1_1 = 4  # the CONNECT protocol level amqtt speaks
TCP_LISTENER = "tcp"
WS_LISTENER = "ws"


def broker_config(users: Users | None) -> dict[str, Any]:
    """amqtt configuration: both listeners are 'external' because spotbox accepts the connections itself."""
    plugins: dict[str, Any] = {"spotbox.broker.auth.LocalAnonymousAuth": {}}
    if users is not None:
        plugins = {
            "spotbox.broker.auth.PasswordAuth": {"users": users},
            "spotbox.broker.auth.TopicGrants": {"users": users},
        }
    return {
        "listeners": {
            "default": {"type": "external", "bind": "spotbox"},
            TCP_LISTENER: {"type": "external", "bind": "spotbox"},
            WS_LISTENER: {"type": "external", "bind": "spotbox"},
        },
        "plugins": plugins,
    }


class _Subscriptions(dict[str, list[tuple[Session, int]]]):
    """amqtt's topic filter -> subscribers map, iterated over a copy.

    amqtt awaits inside loops over this map (topic filtering plugins while routing, retained messages on
    reconnect); a client subscribing or leaving meanwhile changed its size mid-loop and raised RuntimeError.
    """

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().__iter__()))

    def items(self) -> list[tuple[str, list[tuple[Session, int]]]]:  # type: ignore[override]
        return list(super().items())


class SpotboxBroker(Mqtt5SessionBroker):
    """amqtt's Broker, with spotbox's protocol handler and no routing of rejected statuses."""

    def __init__(self, pipeline: IngestPipeline, users: Users | None = None, limits: MqttLimits | None = None) -> None:
        super().__init__(broker_config(users))
        self._subscriptions = _Subscriptions(self._subscriptions)  # type: ignore[has-type]
        self.pipeline = pipeline
        self.users = users
        self.limits = limits or MqttLimits()
        self._tcp_server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        # The transport of every connected MQTT client (TCP and WebSocket): their count is the connection limit.
        self._transports: set[asyncio.WriteTransport] = set()
        # (address, port) of a connection whose CONNECT passed the login -> its (client id, username).
        self._logged_in: dict[tuple[str, int], tuple[str | None, str | None]] = {}
        self.mqtt_address: tuple[str, int] | None = None
        # Connections whose reading is paused for backpressure (see handler.ReadGate).
        self.paused_connections = 0

    async def listen(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None = None, *, sock: socket.socket | None = None
    ) -> tuple[str, int]:
        """Accept MQTT over TCP (over TLS with a context) on `sock`, bound beforehand, or on host:port (0: any)."""
        try:
            if sock is not None:
                self._tcp_server = await asyncio.start_server(
                    partial(self.stream_connected, listener_name=TCP_LISTENER), sock=sock, ssl=ssl_context
                )
            else:
                self._tcp_server = await asyncio.start_server(
                    partial(self.stream_connected, listener_name=TCP_LISTENER),
                    host,
                    port,
                    reuse_address=True,
                    ssl=ssl_context,
                )
        except OSError as exc:
            raise ListenError("MQTT", host, port, "--mqtt-port", exc, host_option="--mqtt-host") from exc
        address = self._tcp_server.sockets[0].getsockname()
        self.mqtt_address = (address[0], address[1])
        return self.mqtt_address

    @property
    def listening(self) -> bool:
        """True while the MQTT TCP listener accepts connections."""
        return self._tcp_server is not None and self._tcp_server.is_serving()

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        """One TCP client, for its whole life; amqtt's errors end the connection, never the broker."""
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self.serve_client(
                StreamReaderAdapter(reader), StreamWriterAdapter(writer), listener_name, writer.transport
            )
        except OSError as exc:
            # The client hung up while amqtt was still writing to it (a refusal, for instance): not a fault.
            logger.info("mqtt connection from %s lost: %s", writer.get_extra_info("peername"), exc)
        except Exception:
            logger.exception("mqtt connection from %s ended by an error", writer.get_extra_info("peername"))
        finally:
            # Some of amqtt's refusal paths return without closing the socket.
            if not writer.is_closing():
                writer.close()
            self._connections.discard(task)

    async def serve_client(
        self, reader: ReaderAdapter, writer: WriterAdapter, listener_name: str, transport: asyncio.WriteTransport
    ) -> None:
        """One MQTT client over any transport, within the connection and packet limits; the caller closes it."""
        peer = "{}:{}".format(*(writer.get_peer_info() or ("?", "?")))
        if len(self._transports) >= self.limits.max_connections:
            logger.warning(
                "mqtt connection from %s refused: --max-connections %d reached", peer, self.limits.max_connections
            )
            return
        self._transports.add(transport)
        try:
            await self._client_connected(listener_name, PacketGuard(reader, self.limits, peer), writer)
        finally:
            self._transports.discard(transport)
            if info := writer.get_peer_info():
                self._logged_in.pop(info, None)

    def abort_clients(self) -> None:
        """Cut every client connection at once, for shutdown.

        amqtt's shutdown closes each connection by flushing it first, which waits forever on a client that has
        stopped reading. Cut connections lose only acknowledgements not yet sent, for statuses already committed:
        their publishers send them again and storage keeps one copy.
        """
        for transport in list(self._transports):
            transport.abort()

    async def stop_listening(self) -> None:
        """Stop accepting new MQTT connections."""
        if self._tcp_server is not None:
            self._tcp_server.close()
            self._tcp_server = None

    async def close_connections(self) -> None:
        """End the connection tasks amqtt's shutdown left running, and wait for them."""
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        raw = await reader.peek_packet()
        if is_mqtt5_connect(raw):
            return await self._initialize_mqtt5_session(raw, reader, writer, remote_address, remote_port)
        await self._login_first(raw, writer, remote_address, remote_port)
        # amqtt builds a fresh, unattached BrokerProtocolHandler here; use spotbox's in its place.
        _, session = await super()._initialize_client_session(reader, writer, remote_address, remote_port)
        if session.client_id:
            await self.reconnected(session.client_id, clean_start=bool(session.clean_session))
        # A session an MQTT 5 client left, resumed by a 3.1.1 one: it is routed and ended the 3.1.1 way.
        for attribute in (OPTIONS, SESSION_EXPIRY, WILL_DELAY):
            session.attributes.pop(attribute, None)
        return SpotboxProtocolHandler(self, loop=self._loop), session

    async def _login_first(self, raw: bytes, writer: WriterAdapter, address: str, port: int) -> None:
        """Check an MQTT 3.1.1 CONNECT's login, and that its client id is not another user's, before amqtt uses the id.

        amqtt deletes (clean session) or takes over (connected client) the session of the client id before it
        checks the login, so a refused client could end another client's session. Here the same plugins check
        the login first; a refusal gets its CONNACK and MQTTError, which amqtt's caller logs and ends quietly.
        """
        if not raw or raw[0] >> 4 != CONNECT:
            return  # amqtt refuses it below, before any session is touched
        try:
            connect = await ConnectPacket.from_stream(BufferReader(raw))
        except (AMQTTError, MQTTError, CodecError, NoDataError, ValueError, UnicodeDecodeError):
            return  # malformed: amqtt reads it again below and refuses it its own way
        if connect.proto_name != "MQTT" or connect.proto_level != MQTT_3_1_1 or connect.payload is None:
            return  # amqtt answers these with "unacceptable protocol version" or closes the connection
        will_topic = connect.will_topic if connect.will_flag else None
        login = await self._check_login(
            connect.client_id, connect.username, connect.password, address, port, will_topic
        )
        if login is None:
            return
        await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
        await writer.close()
        raise MQTTError(f"login of {connect.client_id!r} from {address}:{port} refused")

    async def _check_login(
        self,
        client_id: str,
        username: str | None,
        password: str | None,
        address: str,
        port: int,
        will_topic: str | None = None,
    ) -> mqtt5.ConnAckReasonCode | None:
        """None when the login passes, the client id is free or this user's own, and the will (if any) may be
        published by this user; else the MQTT 5 refusal code."""
        candidate = Session()
        candidate.client_id = client_id
        candidate.username = username
        candidate.password = password
        candidate.remote_address = address
        candidate.remote_port = port
        if not await self._authenticate(candidate, None):
            # A users file and a username: the password (or the name) was wrong; otherwise no login is allowed here.
            if self.users is not None and username:
                return mqtt5.ConnAckReasonCode.BAD_USER_NAME_OR_PASSWORD
            return mqtt5.ConnAckReasonCode.NOT_AUTHORIZED
        if will_topic is not None and (
            status_topic_serial(will_topic) is not None or not may_publish(self.users, candidate, will_topic)
        ):
            # amqtt publishes a will itself, past the grant check and the validation of the publish path.
            logger.warning(
                "mqtt connection refused: user %r may not leave a will on %r (no wills on status topics)",
                username,
                will_topic,
            )
            return mqtt5.ConnAckReasonCode.NOT_AUTHORIZED
        owner = self._sessions.get(client_id, (None, None))[0]
        if owner is None or owner.username == username:
            self._logged_in[(address, port)] = (client_id, username)
            return None
        # Taking over another user's session would hand over its subscriptions and queued messages.
        logger.warning(
            "mqtt connection refused: client id %r is in use by user %r, not %r", client_id, owner.username, username
        )
        return mqtt5.ConnAckReasonCode.NOT_AUTHORIZED

    async def _initialize_mqtt5_session(
        self, raw: bytes, reader: PacketGuard, writer: WriterAdapter, address: str, port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """Read an MQTT 5 CONNECT, check its login, and give amqtt the session and handler to drive.

        The same steps as amqtt's `_initialize_client_session` (clean start deletes the old session, else it is
        resumed), in MQTT 5 terms, with the login checked first as for 3.1.1.
        """
        await reader.next_packet()  # the CONNECT peeked at: this path reads it, amqtt never does
        connect = decode_connect(raw)
        if connect.authentication_method is not None:
            bad_method = mqtt5.ConnAckReasonCode.BAD_AUTHENTICATION_METHOD
            raise await refuse(writer, bad_method, "enhanced authentication is not supported")
        client_id, assigned = connect.client_id, None
        if not client_id:
            client_id = assigned = gen_client_id()  # [MQTT-3.1.3-6], told in the CONNACK [MQTT-3.2.2-16]
        will_topic = connect.will.topic if connect.will is not None else None
        code = await self._check_login(client_id, connect.username, password_text(connect), address, port, will_topic)
        if code is not None:
            raise await refuse(writer, code, f"login of {client_id!r} refused")
        client = client_of(connect, assigned)
        existing = self._sessions.get(client_id, (None, None))[0]
        await self.reconnected(client_id, clean_start=connect.clean_start or existing is None)
        if connect.clean_start or existing is None:
            await self._delete_session(client_id)
            session = Session()
            session.client_id = client_id
            session.parent = 0
        else:
            session = existing
            session.parent = 1
        session.remote_address = address
        session.remote_port = port
        session.ssl_object = writer.get_ssl_info()
        fill_session(session, connect, client)
        return Mqtt5ProtocolHandler(self, client, loop=self._loop), session

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        # The login this connection passed in _login_first: not checked (argon2, tens of milliseconds) twice.
        if self._logged_in.pop((session.remote_address, session.remote_port), None) == (
            session.client_id,
            session.username,
        ):
            return True
        result: bool = await super()._authenticate(session, listener)
        return result

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        if isinstance(wait_deliver.result(), RejectedMessage):
            return True
        result: bool = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        return result

    async def route_stored(self, session: Session, packet: PublishPacket) -> None:
        """Route a committed status as amqtt's delivery step does (plugin events, publish filtering, broadcast,
        retain), called straight from the publishing connection instead of through its per-message client loop."""
        topic = packet.topic_name
        message = IncomingApplicationMessage(packet.packet_id, topic, packet.qos, packet.data, packet.retain_flag)
        message.publish_packet = packet
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_RECEIVED, client_id=session.client_id, message=message
        )
        if not await self._topic_filtering(session, topic=topic, action=Action.PUBLISH):
            logger.info("%s may not publish to %s; not routed", session.client_id, topic)
            return
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_BROADCAST, client_id=session.client_id, message=message
        )
        await self._broadcast_message(session, topic, packet.data, retain=packet.retain_flag)
        if packet.retain_flag:
            await self.retain_message(session, topic, packet.data, packet.qos)

    async def _broadcast_loop(self) -> None:
        # amqtt runs each broadcast in a new task raced against the shutdown future with asyncio.wait: two tasks
        # and a wait per routed message. Run each broadcast inline; shutdown (which sets that future) cancels us.
        loop_task = asyncio.current_task()
        assert loop_task is not None
        self._broadcast_shutdown_waiter.add_done_callback(lambda _: loop_task.cancel())
        deliveries = self._tasks_queue
        while True:
            while deliveries and deliveries[0].done():
                delivery = deliveries.popleft()
                if not delivery.cancelled() and (error := delivery.exception()) is not None:
                    logger.error("delivery to a subscriber failed: %r", error)
            try:
                await self._run_broadcast(deliveries)
            except Exception:
                # One message's routing failed; routing itself must go on (amqtt's loop also skipped it).
                logger.exception("routing a message failed; it was not delivered to every subscriber")

    async def report_rejection(self, topic: str, rejection: Rejection, payload: bytes) -> None:
        """Publish why a status was refused on `spotbox/rejected/{serial}`, for operators to watch."""
        await self.internal_message_broadcast(
            REJECTED_TOPIC.format(serial=rejection.serial_number), rejection_report(topic, rejection, payload)
        )
