"""Sessions: what the broker keeps for a client id across its connections, and when it ends.

A `Session` is a plain dataclass: the owner's user name, the protocol version of its last connection, its
subscriptions (kept in the shared subscription tree under the client id), the messages in flight both ways, the
offline queue, the will and the expiry. `Sessions` is the registry; it decides what happens when a connection
ends (the will, at once or after its delay; the session discarded at once or after its expiry interval) and when a
client comes back (the ending stops; a clean start ends the old session first).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from spotbox.mqtt.message import Message, footprint

if TYPE_CHECKING:
    from spotbox.mqtt.connection import Connection

logger = logging.getLogger(__name__)

# Session Expiry Interval meaning "never" [MQTT-3.1.2.11.2]; an MQTT 3.1.1 session without clean session keeps it.
NEVER_EXPIRES = 0xFFFFFFFF
# Packet ids of statuses without a timestamp whose receive time a DUP resend must reuse: only the last few matter.
UNSTAMPED_MAX = 256
# What the QoS 1/2 messages a session holds for its client (queued, or sent and not yet acknowledged) may add up
# to, for one session and for all together; one entry costs ENTRY_BYTES beyond the message's `footprint`. Past
# them, further messages to the session are dropped and counted (queue_full). A session holding nothing always
# takes one message. Without them, 3,000 offline sessions queued 1,000 messages of 100 KB each (+490 MB), and
# one 3.1.1 subscriber that never acknowledged held 3,000 messages of 300 KB (+365 MB). See docs/security.md.
SESSION_HELD_MAX_BYTES = 16 * 1024 * 1024
HELD_MAX_BYTES = 512 * 1024 * 1024
ENTRY_BYTES = 150
# What the wills kept (connected clients', and disconnected sessions' waiting for their delay) may add up to: a
# CONNECT with a will past it is refused (0x97 / 3.1.1: 3, server unavailable). Each will may be as big as a PUBLISH
# and wait up to its session's expiry, which may be never.
WILLS_MAX_BYTES = 256 * 1024 * 1024


@dataclass(slots=True)
class Will:
    """A will message and how long after the connection is lost it is published (MQTT 5 Will Delay Interval)."""

    message: Message
    delay_s: int = 0


@dataclass(slots=True)
class Outgoing:
    """A QoS 1/2 message sent to the client and not yet acknowledged (or released, for QoS 2 after PUBREC)."""

    packet_id: int
    message: Message
    qos: int
    retain: bool
    subscription_ids: list[int]
    released: bool = False  # QoS 2: PUBREC received, PUBREL sent, waiting for PUBCOMP


@dataclass(slots=True)
class Queued:
    """A message waiting for the client: offline, or over its Receive Maximum or outbound budget."""

    message: Message
    qos: int
    retain: bool
    subscription_ids: list[int]


@dataclass(slots=True)
class Session:
    """One client id's state, whichever connection (if any) serves it now."""

    client_id: str
    user: str | None
    version: int
    expiry_s: int = 0
    connection: Connection | None = None
    will: Will | None = None
    # Outgoing QoS 1/2 messages in flight, by packet id, in the order they were sent (resent in it on reconnect).
    inflight: OrderedDict[int, Outgoing] = field(default_factory=OrderedDict)
    # Messages that could not be sent yet; bounded by --max-queued.
    queue: deque[Queued] = field(default_factory=deque)
    # Incoming QoS 2 packet ids routed and answered with PUBREC, waiting for PUBREL [MQTT-4.3.3].
    awaiting_pubrel: set[int] = field(default_factory=set)
    # packet id -> (payload digest, first receive time) of recent unstamped QoS 1/2 statuses, for DUP resends.
    unstamped: OrderedDict[int, tuple[bytes, datetime]] = field(default_factory=OrderedDict)
    next_packet_id: int = 1
    # Bytes of the queued and in-flight messages, against SESSION_HELD_MAX_BYTES (Sessions.hold).
    held_bytes: int = 0
    # The timer ending a disconnected session (its will after the delay, then its expiry).
    ending: asyncio.TimerHandle | None = None
    ending_will: asyncio.TimerHandle | None = None

    @property
    def connected(self) -> bool:
        """True while a connection serves this session."""
        return self.connection is not None

    @property
    def persistent(self) -> bool:
        """True when the session outlives its connection (and so queues QoS 1/2 messages meanwhile)."""
        return self.expiry_s > 0

    def take_packet_id(self) -> int:
        """A packet id not in use by a message in flight to this client."""
        for _ in range(65535):
            packet_id = self.next_packet_id
            self.next_packet_id = packet_id % 65535 + 1
            if packet_id not in self.inflight:
                return packet_id
        raise RuntimeError("no free packet id")  # unreachable: in-flight is bounded by the Receive Maximum

    def remember_unstamped(self, packet_id: int, digest: bytes, received_at: datetime) -> None:
        """Keep the receive time of an unstamped status for a DUP resend of the same packet id."""
        self.unstamped[packet_id] = (digest, received_at)
        self.unstamped.move_to_end(packet_id)
        if len(self.unstamped) > UNSTAMPED_MAX:
            self.unstamped.popitem(last=False)


@dataclass(slots=True)
class SessionCounters:
    """Messages the sessions dropped, for /metrics."""

    queue_full: int = 0
    expired_sessions: int = 0


class Sessions:
    """The registry of sessions, and the timers that end disconnected ones."""

    def __init__(
        self,
        *,
        max_queued: int,
        publish_will: Callable[[Session, Message], None],
        discard: Callable[[Session], None],
    ) -> None:
        self.max_queued = max_queued
        self.counters = SessionCounters()
        self.held_bytes = 0  # of every session's queued and in-flight messages, against HELD_MAX_BYTES
        self.will_bytes = 0  # of every will kept, against WILLS_MAX_BYTES (checked at CONNECT)
        self.persistent = 0  # sessions kept with an expiry above 0, against broker.SESSIONS_MAX
        self._sessions: dict[str, Session] = {}
        self._publish_will = publish_will
        self._discard = discard

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, client_id: str) -> Session | None:
        """The session of `client_id`, if one is kept."""
        return self._sessions.get(client_id)

    def values(self) -> list[Session]:
        """Every session kept (a copy: callers may end some)."""
        return list(self._sessions.values())

    def open(self, client_id: str, user: str | None, version: int, clean_start: bool) -> tuple[Session, bool]:
        """The session a newly logged-in connection serves, and whether it was resumed (session present).

        A waiting ending stops; a clean start ends the old session (publishing a will still waiting) first.
        """
        old = self._sessions.get(client_id)
        if old is not None:
            waiting = self._stop_ending(old)
            if clean_start:
                if waiting is not None:
                    self._publish_will(old, waiting.message)
                self.remove(old)
                old = None
        if old is not None:
            old.user, old.version = user, version
            return old, True
        session = Session(client_id, user, version)
        self._sessions[client_id] = session
        return session, False

    def set_expiry(self, session: Session, expiry_s: int) -> None:
        """Set the session's expiry interval, counting the persistent sessions kept (the clean ones are not bounded
        by broker.SESSIONS_MAX but by --max-connections: they end with their connection)."""
        if self._sessions.get(session.client_id) is session:
            self.persistent += (expiry_s > 0) - session.persistent
        session.expiry_s = expiry_s

    def enqueue(self, session: Session, item: Queued) -> bool:
        """Queue a message for a client that cannot take it now; False (and counted) when the queue is full."""
        if len(session.queue) >= self.max_queued or not self.hold(session, item.message):
            self.counters.queue_full += 1
            return False
        session.queue.append(item)
        return True

    def hold(self, session: Session, message: Message) -> bool:
        """Count `message` as held for `session` (queued or in flight); False when the budgets have no room."""
        size = footprint(message) + ENTRY_BYTES
        if (session.held_bytes and session.held_bytes + size > SESSION_HELD_MAX_BYTES) or (
            self.held_bytes + size > HELD_MAX_BYTES
        ):
            return False
        session.held_bytes += size
        self.held_bytes += size
        return True

    def release(self, session: Session, message: Message) -> None:
        """`message` is no longer held for `session` (acknowledged, dropped, or sent at QoS 0 from the queue)."""
        size = min(footprint(message) + ENTRY_BYTES, session.held_bytes)  # 0 once the session was removed
        session.held_bytes -= size
        self.held_bytes -= size

    def connection_ended(self, session: Session, *, publish_will: bool) -> None:
        """A connection serving `session` ended: publish or schedule its will, then end or keep the session."""
        session.connection = None
        will = self.take_will(session)
        if not publish_will:
            will = None
        loop = asyncio.get_running_loop()
        if will is not None and (will.delay_s == 0 or session.expiry_s == 0):
            self._publish_will(session, will.message)
        elif will is not None:
            delay = min(will.delay_s, session.expiry_s)
            self.set_will(session, will)
            session.ending_will = loop.call_later(delay, self._will_due, session)
        if session.expiry_s == 0:
            if session.will is None:
                self.remove(session)
            return
        if session.expiry_s < NEVER_EXPIRES:
            session.ending = loop.call_later(session.expiry_s, self._expire, session)

    def _will_due(self, session: Session) -> None:
        session.ending_will = None
        if session.will is not None and not session.connected:
            will = self.take_will(session)
            assert will is not None
            self._publish_will(session, will.message)
        if session.expiry_s == 0 and self._sessions.get(session.client_id) is session:
            self.remove(session)

    def _expire(self, session: Session) -> None:
        session.ending = None
        if session.connected or self._sessions.get(session.client_id) is not session:
            return
        if (will := self.take_will(session)) is not None:
            # The session ends before its will's delay: the will goes now [MQTT-3.1.3-9].
            self._publish_will(session, will.message)
        logger.info("mqtt session of %r expired after %d s", session.client_id, session.expiry_s)
        self.counters.expired_sessions += 1
        self.remove(session)

    def _stop_ending(self, session: Session) -> Will | None:
        """Stop a disconnected session's timers; its waiting will, which a resumption cancels [MQTT-3.1.3-9]."""
        for timer in (session.ending, session.ending_will):
            if timer is not None:
                timer.cancel()
        session.ending = session.ending_will = None
        return self.take_will(session)

    def set_will(self, session: Session, will: Will) -> None:
        """Keep `will` for `session` (in place of any other), counted in `will_bytes`."""
        self.take_will(session)
        session.will = will
        self.will_bytes += footprint(will.message)

    def take_will(self, session: Session) -> Will | None:
        """The will kept for `session`, no longer kept (nor counted), or None."""
        will, session.will = session.will, None
        if will is not None:
            self.will_bytes -= footprint(will.message)
        return will

    def remove(self, session: Session) -> None:
        """Forget a session: its subscriptions, queued messages and will go with it."""
        self.take_will(session)
        for timer in (session.ending, session.ending_will):
            if timer is not None:
                timer.cancel()
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
            self.persistent -= session.persistent
            self.held_bytes -= session.held_bytes
            session.held_bytes = 0
        self._discard(session)

    def close(self) -> None:
        """Stop every timer (shutdown): waiting wills are dropped with their sessions."""
        for session in self._sessions.values():
            for timer in (session.ending, session.ending_will):
                if timer is not None:
                    timer.cancel()
