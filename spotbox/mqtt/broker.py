"""The Broker: spotbox's MQTT engine as the app, the /mqtt route and the tests see it.

It owns the listeners, the connections, the sessions, the subscription tree, the retained store, the router and
the publish path, and one clock task that ends connections that missed their CONNECT deadline, went silent past
their keep alive, or stopped reading for too long. Logins go through `auth.Authenticator` before any session is
looked at: a refused login touches nothing.

Presence hook: `on_connection_closed(client_id, serials)` (optional, set by whoever needs it) is called once a
logged-in connection has ended, with the serials of the statuses it stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from spotbox.errors import ListenError
from spotbox.mqtt.admission import LoginSlots
from spotbox.mqtt.auth import Authenticator, source_of
from spotbox.mqtt.connection import Closed, Connection, Stream
from spotbox.mqtt.listeners import MqttLimits, TcpStream, WebSocketStream, start_tcp
from spotbox.mqtt.message import Message, footprint
from spotbox.mqtt.publish import PublishPath
from spotbox.mqtt.retained import RetainedStore
from spotbox.mqtt.router import Router, deliver
from spotbox.mqtt.sessions import NEVER_EXPIRES, WILLS_MAX_BYTES, Queued, Session, Sessions, Will
from spotbox.mqtt.subscriptions import Subscription, SubscriptionTree
from spotbox.mqtt.topics import parse_shared, valid_topic_filter
from spotbox.mqtt.wire import MQTT_5, Connect, Subscribe, Unsubscribe, Wire5
from spotbox.ops.presence import Presence
from spotbox.pipeline import IngestPipeline
from spotbox.status import status_topic_serial
from spotbox.users import Users
from spotbox.validation import Rejection

logger = logging.getLogger(__name__)

# Topic aliases a client may use towards spotbox [MQTT-3.2.2.3.8]; each costs one dict entry per connection.
TOPIC_ALIAS_MAX = 32
# How often the clock checks deadlines, keep alives and stuck clients.
TICK_S = 0.25
# Connections the clock looks at in one turn of the event loop (one pass over 10,000 held it about 5 ms).
TICK_CHUNK = 1000
# How long a connection spotbox closed may take to send its last bytes before it is cut.
KICK_GRACE_S = 2.0
# The longest client id accepted, in bytes: 3.1.1 servers must take 23 and may take more [MQTT-3.1.3-5]; a session
# is keyed by it and every log line of the connection repeats it (one of 65,535 bytes made each line 64 KB).
CLIENT_ID_MAX_BYTES = 256
# Persistent sessions kept, connected or not (at least --max-connections): a CONNECT that would start one more is
# refused (a session already kept can always be resumed). An empty persistent session costs about 1.7 KB, and
# nothing bounds how many client ids one user makes. A clean session (3.1.1 clean session, MQTT 5 expiry 0) is not
# counted: it ends with its connection, so --max-connections bounds it, and a user's persistent sessions must not
# lock out the robots that connect with clean sessions.
SESSIONS_MAX = 100_000
# QoS 1/2 messages sent to one client and not yet acknowledged, whatever Receive Maximum it announced (a 3.1.1
# client announces none): the rest wait in its session's queue. Each holds its message until acknowledged; see
# also sessions.SESSION_HELD_MAX_BYTES.
INFLIGHT_MAX = 100
# Subscriptions: what one session may hold, how deep a filter may be, and the tree's levels in all (each level
# costs about 400 bytes; these bound the tree to about 400 MB whatever clients subscribe to). See docs/security.md.
SUBSCRIPTIONS_PER_SESSION_MAX = 1000
TOPIC_FILTER_MAX_LEVELS = 32
SUBSCRIPTION_TREE_MAX_NODES = 1_000_000
# Retained messages spotbox keeps, and their bytes in all.
RETAINED_MAX_MESSAGES = 100_000
RETAINED_MAX_BYTES = 256 * 1024 * 1024


@dataclass(slots=True)
class BrokerCounters:
    """Messages not delivered, by why, for /metrics (the sessions count their full queues)."""

    dropped_max_outbound_bytes: int = 0
    dropped_expired: int = 0
    dropped_too_large: int = 0
    refused_connections: int = 0


# How long a connection may wait, unread, for a login slot: a fleet of 10,000 reconnecting at once logs in within it
# on a 2-core box (measured with spotbox bench); a waiting socket costs a descriptor, no memory to speak of.
ADMISSION_WAIT_S = 30.0


class Broker:
    """spotbox's MQTT broker, 3.1.1 and 5.0, over TCP, TLS and WebSocket."""

    def __init__(self, pipeline: IngestPipeline, users: Users | None = None, limits: MqttLimits | None = None) -> None:
        self.pipeline = pipeline
        self.users = users
        self.limits = limits or MqttLimits()
        # One argon2 hash at a time: on a 2-core box a second would starve the event loop serving everyone else.
        self.auth = Authenticator(users, max_hashing=1)
        self.counters = BrokerCounters()
        self.tree: SubscriptionTree[str] = SubscriptionTree()
        self.retained = RetainedStore(RETAINED_MAX_MESSAGES, RETAINED_MAX_BYTES)
        self.sessions = Sessions(
            max_queued=self.limits.max_queued, publish_will=self._publish_will, discard=self._discard
        )
        self.router = Router(self.tree, self.sessions)
        self.publish_path = PublishPath(self)
        self.connections: set[Connection] = set()
        self.logged_in = 0
        self.paused_connections = 0
        self.mqtt_address: tuple[str, int] | None = None
        self.on_connection_closed: Callable[[str, frozenset[str]], None] | None = None
        # The --max-pending-logins slots, each held by a connection from its admission until it logs in or ends,
        # shared between addresses (spotbox.mqtt.admission; see `_admit`). Semaphores wake one waiter per slot
        # freed, in arrival order: a storm of 10,000 waiting robots costs one wake-up per login, not 10,000.
        self._login_slots = LoginSlots(self.limits.max_pending_logins, max_waiting=self.limits.max_connections)
        # Presence (spotbox.ops.presence): which connection stored each status, and when a connection ends.
        self.presence: Presence | None = None
        self._server: asyncio.Server | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._clock: asyncio.Task[None] | None = None

    # --- listeners ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the clock (deadlines, keep alives, stuck clients)."""
        self._clock = asyncio.create_task(self._tick_forever(), name="spotbox-mqtt-clock")

    async def listen(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None = None, *, sock: socket.socket | None = None
    ) -> tuple[str, int]:
        """Accept MQTT over TCP (TLS with a context) on host:port or on a bound socket; the real address."""
        # TLS is started by the connection once admitted (`serve`), not by the listener: a handshake costs about
        # 256 KB (asyncio's TLS buffer), and the listener would hold any number of them for 60 s.
        self._ssl_context = ssl_context
        try:
            self._server = await start_tcp(self._tcp_client, host, port, tls=ssl_context is not None, sock=sock)
        except OSError as exc:
            raise ListenError("MQTT", host, port, "--mqtt-port", exc, host_option="--mqtt-host") from exc
        address = self._server.sockets[0].getsockname()
        self.mqtt_address = (address[0], address[1])
        return self.mqtt_address

    @property
    def listening(self) -> bool:
        """True while the TCP listener accepts connections."""
        return self._server is not None and self._server.is_serving()

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The connection runs in a task of the broker's own (named, awaited at shutdown), not in the one asyncio's
        # server made for this callback, which would log an error if it were ever cancelled.
        stream = TcpStream(reader, writer, self._ssl_context)
        task = asyncio.create_task(self.serve(stream), name=f"spotbox-mqtt-{stream.peer}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def serve_websocket(self, request: web.Request) -> web.WebSocketResponse:
        """GET /mqtt: one MQTT client over a WebSocket, for its whole connection."""
        # A client sends one MQTT packet per message; a bigger message is refused by aiohttp, unread.
        ws = web.WebSocketResponse(protocols=("mqtt",), max_msg_size=self.limits.max_packet + 5)
        await ws.prepare(request)
        if request.transport is None:
            return ws
        stream = WebSocketStream(ws, request)
        await self.serve(stream)
        await stream.sent()
        await ws.close()
        return ws

    async def serve(self, stream: Stream) -> None:
        """Run one client's connection, within the bound on connections still logging in."""
        if not await self._admit(stream):
            self.counters.refused_connections += 1
            stream.abort()
            return
        try:
            conn = Connection(self, stream)
        except BaseException:
            self._login_slots.release(source_of(stream.address))
            raise
        # Holds its login slot, TLS handshake included, until it logs in or ends (`connection_closed`).
        self.connections.add(conn)
        try:
            if not await stream.handshake(self.limits.connect_timeout_s):
                stream.abort()
                return
            await conn.run()
        except Exception:
            logger.exception("mqtt connection %s (%r) ended by an error", stream.peer, conn.client_id)
        finally:
            conn.end()

    async def _admit(self, stream: Stream) -> bool:
        """Wait, without reading, for one of the --max-pending-logins slots of connections still logging in.

        A fleet reconnecting at once after a restart (thousands of robots in a second) queues here and is served
        in turn: no robot is refused for arriving in a storm. Sockets that never log in hold a slot only until their
        CONNECT deadline, and one address holds at most its share of the slots (spotbox.mqtt.admission), so idle
        sockets from one host delay only that host's connections. A connection that waits longer than
        ADMISSION_WAIT_S (or its CONNECT deadline, if longer), or finds --max-connections connections (or its
        address's share of them) already waiting, is refused.
        """
        limits = self.limits
        key = source_of(stream.address)
        if not self._login_slots.may_wait(key):
            logger.warning("mqtt connection from %s refused: too many connections waiting to log in", stream.peer)
            return False
        wait_s = max(ADMISSION_WAIT_S, limits.connect_timeout_s)
        try:
            async with asyncio.timeout(wait_s):
                await self._login_slots.acquire(key)
        except TimeoutError:
            logger.warning(
                "mqtt connection from %s refused: no login slot within %.0f s (%d connections still logging in)",
                stream.peer,
                wait_s,
                len(self.connections) - self.logged_in,
            )
            return False
        return True

    # --- logins -------------------------------------------------------------------------------------------------

    async def login(self, conn: Connection, connect: Connect) -> bool:
        """Check a CONNECT (login, will, client id owner, limits), then attach its session and answer CONNACK."""
        v5 = connect.version == MQTT_5
        wire = Wire5(connect.max_packet_size, connect.request_problem_info, connect.topic_alias_max) if v5 else None
        if wire is not None:
            wire.incoming_alias_max = TOPIC_ALIAS_MAX
            conn.wire = wire
        peer = conn.stream.peer
        if self.logged_in >= self.limits.max_connections:
            logger.warning(
                "mqtt connection from %s refused: --max-connections %d reached", peer, self.limits.max_connections
            )
            return self._refuse(conn, 0x03, 0x97)  # server unavailable / quota exceeded
        if connect.authentication_method is not None or (
            len(connect.client_id) > CLIENT_ID_MAX_BYTES // 4 and len(connect.client_id.encode()) > CLIENT_ID_MAX_BYTES
        ):
            # No enhanced authentication (0x8C); a client id over CLIENT_ID_MAX_BYTES is not accepted (3.1.1: 2).
            logger.warning(
                "mqtt connection from %s refused: an authentication method, or the client id %.60r... is too long",
                peer,
                connect.client_id,
            )
            early = (0x05, 0x8C) if connect.authentication_method is not None else (0x02, 0x85)
            return self._refuse(conn, *early)
        result = await self.auth.login(connect.username, connect.password, conn.stream.address)
        if not result.ok:
            logger.warning(
                "mqtt login of %r (user %.100r) from %s refused: %s",
                connect.client_id,
                connect.username,
                peer,
                result.reason,
            )
            return self._refuse(conn, result.code311, result.code5)
        user = result.user
        client_id = connect.client_id or f"spotbox-{uuid.uuid4().hex}"  # [MQTT-3.1.3-6]
        will = connect.will
        if will is not None and (codes := self._will_refused(user, client_id, will)) is not None:
            return self._refuse(conn, *codes)
        session = self.sessions.get(client_id)
        if (codes := self._session_refused(session, client_id, user, connect.session_expiry_s > 0)) is not None:
            return self._refuse(conn, *codes)
        if session is not None and session.connection is not None:
            session.connection.kick(0x8E, "session taken over")  # [MQTT-3.1.4-3]
        session, present = self.sessions.open(client_id, user, connect.version, connect.clean_start)
        self.sessions.set_expiry(session, connect.session_expiry_s)
        if will is not None:
            will.created = time.monotonic()
            self.sessions.set_will(session, Will(will, connect.will_delay_s))
        session.connection = conn
        conn.session, conn.client_id, conn.logged_in = session, client_id, True
        self.logged_in += 1
        self._login_slots.release(source_of(conn.stream.address))
        keep_alive = connect.keep_alive
        if v5 and not 0 < keep_alive <= self.limits.max_keepalive:
            keep_alive = self.limits.max_keepalive  # told in CONNACK [MQTT-3.2.2-21]
        conn.keep_alive_s = keep_alive
        conn.send_quota = min(connect.receive_max, INFLIGHT_MAX)
        if wire is not None:
            conn.write(
                wire.connack(
                    present,
                    0,
                    assigned_client_id=None if connect.client_id else client_id,
                    server_keep_alive=keep_alive,
                    receive_max=self.limits.receive_maximum,
                    topic_alias_max=TOPIC_ALIAS_MAX,
                    max_packet_size=self.limits.max_packet + 5,
                    subscription_id_available=True,
                    shared_subscription_available=True,
                    wildcard_subscription_available=True,
                    retain_available=True,
                )
            )
        else:
            conn.write(conn.wire.connack(present, 0))
        logger.info("mqtt client %r (user %r) connected from %s", client_id, user, peer)
        conn.resume()
        return True

    def _session_refused(
        self, session: Session | None, client_id: str, user: str | None, persistent: bool
    ) -> tuple[int, int] | None:
        """(3.1.1 code, MQTT 5 code) refusing a CONNECT for the session it would take, with one warning line;
        `persistent`: the session would outlive the connection."""
        if session is not None and session.user != user:
            # Taking over another user's session would hand over its subscriptions and queued messages.
            logger.warning(
                "mqtt connection refused: client id %r is in use by user %r, not %r", client_id, session.user, user
            )
            return 0x05, 0x87
        bound = max(SESSIONS_MAX, self.limits.max_connections)
        if session is None and persistent and self.sessions.persistent >= bound:
            logger.warning("mqtt connection of %r refused: %d persistent sessions are kept already", client_id, bound)
            return 0x03, 0x97  # server unavailable / quota exceeded
        return None

    def _will_refused(self, user: str | None, client_id: str, will: Message) -> tuple[int, int] | None:
        """(3.1.1 code, MQTT 5 code) refusing a CONNECT for its will, with one warning line; None when it may stay."""
        if status_topic_serial(will.topic) is not None or not self.auth.may_publish(user, will.topic):
            # A will is never validated or stored: none on status topics, and only where the user may publish.
            logger.warning("mqtt connection refused: user %r may not leave a will on %r", user, will.topic)
            return 0x05, 0x87
        if self.sessions.will_bytes + footprint(will) > WILLS_MAX_BYTES:
            logger.warning(
                "mqtt connection of %r refused: the wills kept reach %d bytes", client_id, self.sessions.will_bytes
            )
            return 0x03, 0x97  # server unavailable / quota exceeded
        return None

    def _refuse(self, conn: Connection, code311: int, code5: int) -> bool:
        conn.write(conn.wire.connack(False, code5 if isinstance(conn.wire, Wire5) else code311))
        return False

    # --- subscriptions ------------------------------------------------------------------------------------------

    def subscribe(self, conn: Connection, packet: Subscribe) -> None:
        """SUBACK with a code per filter, then the retained messages of the new filters (Retain Handling)."""
        session = conn.session
        assert session is not None
        # A Protocol Error in any filter ends the connection before any filter of the packet is applied.
        for request in packet.requests:
            if request.no_local and isinstance(parse_shared(request.filter), tuple):
                raise Closed("No Local on a shared subscription", 0x82)  # [MQTT-3.8.3-4]
        codes: list[int] = []
        retained_for: list[Subscription] = []
        refused: list[str] = []
        for request in packet.requests:
            shared = parse_shared(request.filter)
            if isinstance(shared, str) or valid_topic_filter(request.filter) is not None:
                codes.append(0x8F)  # topic filter invalid
                continue
            group, inner = shared if shared is not None else (None, request.filter)
            if not self.auth.may_subscribe(session.user, request.filter):
                logger.warning("mqtt subscribe denied: user %r may not subscribe to %r", session.user, request.filter)
                codes.append(0x87)
                continue
            if refusal := self._subscription_refused(session.client_id, request.filter, inner, group):
                refused.append(refusal[1])
                codes.append(refusal[0])
                continue
            subscription = Subscription(
                inner,
                request.qos,
                no_local=request.no_local,
                retain_as_published=request.retain_as_published,
                retain_handling=request.retain_handling,
                identifier=packet.identifier,
                share_group=group,
            )
            existed = self.tree.add(session.client_id, subscription)
            codes.append(request.qos)
            # Retained messages go to the subscription that asked, when it is made [MQTT-3.3.1-9..11]; never to a
            # shared one (MQTT 5.0 4.8.2).
            if group is None and (request.retain_handling == 0 or (request.retain_handling == 1 and not existed)):
                retained_for.append(subscription)
        if refused:  # one line per SUBSCRIBE, however many filters it carried
            logger.warning("mqtt subscribe of %r: %d filters refused: %s", session.client_id, len(refused), refused[0])
        conn.write(conn.wire.suback(packet.packet_id, codes))
        for subscription in retained_for:
            ids = [subscription.identifier] if subscription.identifier is not None else []
            for message in self.retained.match(subscription.filter):
                conn.send_publish(Queued(message, min(message.qos, subscription.qos), True, ids))

    def _subscription_refused(
        self, client_id: str, topic_filter: str, inner: str, group: str | None
    ) -> tuple[int, str] | None:
        """(reason code, why) when a new subscription would pass the bounds of the subscription tree, else None.

        A filter is at most --max-topic-length bytes and TOPIC_FILTER_MAX_LEVELS levels (0x8F, topic filter
        invalid); a session holds at most SUBSCRIPTIONS_PER_SESSION_MAX and the tree SUBSCRIPTION_TREE_MAX_NODES
        levels (0x97, quota exceeded). Replacing a subscription the session holds is always allowed.
        """
        limit = self.limits.max_topic_length
        if len(topic_filter) > limit // 4 and len(topic_filter.encode()) > limit:
            return 0x8F, f"a filter over --max-topic-length {limit}"
        if inner.count("/") >= TOPIC_FILTER_MAX_LEVELS:
            return 0x8F, f"a filter of more than {TOPIC_FILTER_MAX_LEVELS} levels"
        tree = self.tree
        if tree.holds(client_id, inner, group):
            return None
        if tree.count_of(client_id) >= SUBSCRIPTIONS_PER_SESSION_MAX:
            return 0x97, f"the session holds {SUBSCRIPTIONS_PER_SESSION_MAX} subscriptions already"
        if tree.nodes + TOPIC_FILTER_MAX_LEVELS > SUBSCRIPTION_TREE_MAX_NODES:
            return 0x97, f"the subscription tree holds {tree.nodes} levels"
        return None

    def unsubscribe(self, conn: Connection, packet: Unsubscribe) -> None:
        """UNSUBACK: 0x00 for each filter removed, 0x11 where no subscription existed."""
        session = conn.session
        assert session is not None
        codes = []
        for topic_filter in packet.filters:
            shared = parse_shared(topic_filter)
            group, inner = shared if isinstance(shared, tuple) else (None, topic_filter)
            codes.append(0x00 if self.tree.remove(session.client_id, inner, group) else 0x11)
        conn.write(conn.wire.unsuback(packet.packet_id, codes))

    # --- session ends -------------------------------------------------------------------------------------------

    def connection_ended(self, conn: Connection, session: Session, *, publish_will: bool) -> None:
        """A logged-in connection left its session: the will and the session's end are decided now."""
        if session.version != MQTT_5 and session.expiry_s:
            self.sessions.set_expiry(session, NEVER_EXPIRES)
        self.sessions.connection_ended(session, publish_will=publish_will and not self._closing)

    def connection_closed(self, conn: Connection) -> None:
        """A connection is over (logged in or not)."""
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        if self.presence is not None:
            self.presence.connection_closed(conn)
        if not conn.logged_in:
            self._login_slots.release(source_of(conn.stream.address))  # it never logged in: its slot is free
        else:
            self.logged_in -= 1
            if self.on_connection_closed is not None and conn.client_id is not None:
                try:
                    self.on_connection_closed(conn.client_id, frozenset(conn.serials))
                except Exception:
                    logger.exception("on_connection_closed failed for %r", conn.client_id)

    def _publish_will(self, session: Session, message: Message) -> None:
        logger.debug("publishing the will of %r on %r", session.client_id, message.topic)
        message.created = time.monotonic()
        self.publish_path.route(message, session.client_id)

    def _discard(self, session: Session) -> None:
        self.tree.remove_all(session.client_id)

    def deliver(self, session: Session, item: Queued) -> None:
        """Send a message to one session (the router's last step)."""
        deliver(self.sessions, session, item)

    async def publish_retained(self, topic: str, payload: bytes) -> None:
        """Publish spotbox's own retained message (a robot's open alerts) to subscribers, now and later."""
        self.publish_path.route(Message(topic, payload, 1, True, None, time.monotonic()), None)

    async def report_rejection(self, topic: str, rejection: Rejection, payload: bytes) -> None:
        """Publish why a status was refused on `spotbox/rejected/{serial}` (HTTP ingest uses this too)."""
        self.publish_path.report_rejection(topic, rejection, payload)

    # --- the clock ----------------------------------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(TICK_S)
            ticks += 1
            try:
                await self.tick()
                if ticks % 40 == 0:
                    self.retained.drop_expired(time.monotonic())
            except Exception:
                logger.exception("mqtt clock tick failed")

    async def tick(self) -> None:
        """End connections past their CONNECT deadline, keep alive or stuck limit; send what waits for room.

        The connections are looked at TICK_CHUNK in a turn of the event loop: at 10,000 connections one pass held
        the loop about 5 ms every tick, which every client's packets waited behind.
        """
        connections = list(self.connections)
        silent: list[Connection] = []
        for start in range(0, len(connections), TICK_CHUNK):
            if start:
                await asyncio.sleep(0)
            self._look_at(connections[start : start + TICK_CHUNK], time.monotonic(), silent)
        # The longest silent first: its will still reaches a client whose own silence ends in the same tick.
        now = time.monotonic()
        for conn in sorted(silent, key=lambda conn: conn.last_heard):
            # Looked at again: it may have spoken or gone while later chunks were looked at.
            if not conn.ended and conn.kicked_at is None and _silent(conn, now):
                # [MQTT-3.1.2-24]: silent for 1.5 times the keep alive; the will is published.
                conn.kick(0x8D, f"no packet within 1.5 times the keep alive of {conn.keep_alive_s} s")

    def _look_at(self, connections: list[Connection], now: float, silent: list[Connection]) -> None:
        limits = self.limits
        for conn in connections:
            if conn.ended:
                continue
            if conn.kicked_at is not None:
                if now - conn.kicked_at > KICK_GRACE_S:
                    conn.stream.abort()  # closed but its last bytes are not taken: drop them
            elif not conn.logged_in:
                if now - conn.started > limits.connect_timeout_s:
                    logger.warning(
                        "mqtt connection from %s closed: no CONNECT within %g s",
                        conn.stream.peer,
                        limits.connect_timeout_s,
                    )
                    conn.stream.close()
            elif conn.keep_alive_s and not conn.paused_depth and now - conn.last_heard > 1.5 * conn.keep_alive_s:
                silent.append(conn)  # as `_silent`, without a call for each connection
            elif not conn.congested:
                continue  # the common case, checked without a call
            elif conn.stuck_for(now) > limits.outbound_stuck_s:
                stuck = f"took nothing of its {conn.buffered()} unsent bytes for {limits.outbound_stuck_s:g} s"
                conn.kick(0x97, stuck, abort=True)
            else:
                conn.pump()

    # --- shutdown -----------------------------------------------------------------------------------------------

    _closing = False

    async def stop_listening(self) -> None:
        """Stop accepting new MQTT connections."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def close(self, grace_s: float = 2.0) -> None:
        """Stop reading every client, let committed statuses be acknowledged (within `grace_s`), then disconnect.

        Called on shutdown and again at cleanup: the second call has nothing left to do.
        """
        if self._closing:
            return
        self._closing = True
        await self.stop_listening()
        connections = list(self.connections)
        for conn in connections:
            conn.stopping = True
            conn.stream.pause_reading()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                while any(conn.pending for conn in connections):  # noqa: ASYNC110 - commits resolve in callbacks
                    await asyncio.sleep(0.01)
        for conn in connections:
            if not conn.ended:
                conn.kick(0x8B, "server shutting down")
        # Closed connections end their reader loops; one that cannot flush to its client is cut after a moment.
        tasks = set(self._tasks)
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=1.0)
            for conn in connections:
                conn.stream.abort()
            if stuck:
                await asyncio.wait(stuck, timeout=1.0)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        self.sessions.close()
        self.auth.close()
        if self._clock is not None:
            self._clock.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._clock

    def abort_clients(self) -> None:
        """Cut every client connection at once."""
        for conn in list(self.connections):
            conn.stream.abort()

    @property
    def connected_count(self) -> int:
        """Clients logged in now."""
        return self.logged_in


def _silent(conn: Connection, now: float) -> bool:
    """Silent for more than 1.5 times its keep alive, time paused by spotbox aside."""
    return bool(conn.keep_alive_s) and not conn.paused_depth and now - conn.last_heard > 1.5 * conn.keep_alive_s
