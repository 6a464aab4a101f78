"""Where clients come from: MQTT over TCP (and TLS) with asyncio's server, and over WebSocket at /mqtt (aiohttp).

Each accepted client is a `Stream` handed to the broker, which runs one `Connection` for it. The TCP listener
also takes a socket the CLI bound earlier (so a port error is reported before storage is opened).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import WSMsgType, web

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MqttLimits:
    """How big a packet, topic and crowd of clients spotbox accepts, and how long it waits for them."""

    max_payload: int = 1024 * 1024
    max_topic_length: int = 1024
    max_connections: int = 1000
    max_pending_logins: int = 200
    connect_timeout_s: float = 5.0
    receive_maximum: int = 100
    max_keepalive: int = 3600
    max_queued: int = 1000
    max_outbound_bytes: int = 4 * 1024 * 1024
    # A client over its outbound budget that takes no byte of it for this long is disconnected.
    outbound_stuck_s: float = 5.0

    @property
    def max_packet(self) -> int:
        """The largest remaining length of any packet: a PUBLISH with the largest topic and payload."""
        return self.max_payload + self.max_topic_length + 4


def _peer(address: object) -> tuple[str, str]:
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), f"{address[0]}:{address[1]}"
    return "", "?"


class TcpStream:
    """A TCP (or TLS) client through asyncio's streams."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: ssl.SSLContext | None = None
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._transport = writer.transport
        self._tls = tls
        self._eof_written = False
        self.address, self.peer = _peer(writer.get_extra_info("peername"))

    async def handshake(self, timeout_s: float) -> bool:
        """Start TLS (when the listener speaks it) within `timeout_s`; False, with one line, when it fails.

        Called once the connection is admitted, so handshakes count among the connections still logging in. The
        stream's own protocol stays the application protocol (it feeds the reader); writes go to the TLS transport.
        """
        if self._tls is None:
            return True
        transport = self._transport
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport, transport.get_protocol(), self._tls, server_side=True, ssl_handshake_timeout=timeout_s
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            logger.warning(
                "mqtt connection from %s closed: no TLS handshake within %g s (%r)", self.peer, timeout_s, exc
            )
            return False
        if tls is None:  # the client left as the handshake ended: asyncio hands back no transport
            return False
        self._transport = tls
        return True

    async def read(self) -> bytes:
        """The next bytes from the client; b"" once the stream has ended."""
        return await self._reader.read(65536)

    def write(self, data: bytes) -> None:
        """Queue bytes for the client; nothing once the stream is half-closed (`finish`) or closing."""
        if not self._eof_written and not self._transport.is_closing():
            self._transport.write(data)

    def buffered(self) -> int:
        """Bytes not yet sent."""
        return self._transport.get_write_buffer_size()

    def pause_reading(self) -> None:
        """Stop reading from the network."""
        if isinstance(self._transport, asyncio.ReadTransport) and not self._transport.is_closing():
            self._transport.pause_reading()

    async def finish(self, timeout_s: float) -> None:
        """Half-close (TCP: FIN after what is buffered), then read and drop until the client closes or `timeout_s`."""
        transport = self._transport
        if transport.is_closing() or not transport.can_write_eof():
            return  # TLS has no half-close: the connection is simply closed after
        # What the connection still writes (acknowledgements of commits landing now) goes nowhere: a write after
        # write_eof() raises in the caller, a commit's callback.
        self._eof_written = True
        transport.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(timeout_s):
                while await self._reader.read(65536):
                    pass

    def close(self) -> None:
        """Close after sending what is buffered."""
        self._transport.close()

    def abort(self) -> None:
        """Close at once."""
        self._transport.abort()


class WebSocketStream:
    """An MQTT client over a WebSocket (subprotocol `mqtt`, binary messages) [MQTT-6.0.0-1]."""

    async def handshake(self, timeout_s: float) -> bool:
        """Nothing to do: aiohttp serves TLS for the whole HTTP site."""
        return True

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self._ws = ws
        self._pending = bytearray()
        self._sender: asyncio.Task[None] | None = None
        self._closing = False
        self._transport = request.transport
        self.address, self.peer = _peer(request.transport.get_extra_info("peername") if request.transport else None)
        if request.remote and request.remote != self.address:
            # Through a trusted proxy (spotbox/api/proxies.py): logins count against the client's address.
            self.address, self.peer = request.remote, f"{request.remote} via {self.peer}"

    async def read(self) -> bytes:
        """The bytes of the next binary message; b"" when the WebSocket ends (a text frame ends it too)."""
        message = await self._ws.receive()
        while message.type == WSMsgType.BINARY and not message.data:
            message = await self._ws.receive()  # an empty message is no end of stream
        if message.type == WSMsgType.BINARY:
            return bytes(message.data)
        if message.type == WSMsgType.TEXT:
            logger.warning("mqtt websocket client %s sent a text frame; closing", self.peer)
        return b""

    def write(self, data: bytes) -> None:
        """Queue bytes; they leave as one binary message per event-loop turn."""
        if self._closing:
            return
        self._pending += data
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(), name=f"spotbox-mqtt-ws-send-{self.peer}")

    async def _send(self) -> None:
        try:
            while self._pending and not self._ws.closed:
                data = bytes(self._pending)
                self._pending.clear()
                await self._ws.send_bytes(data)
            if self._closing and not self._ws.closed:
                # The close frame ends the client's connection, and the reader loop's receive() with it.
                await self._ws.close()
        except (ConnectionError, RuntimeError) as exc:
            logger.debug("mqtt websocket %s: not sent: %r", self.peer, exc)
        finally:
            self._sender = None

    async def sent(self) -> None:
        """Return once what was written has been handed to the WebSocket."""
        while self._sender is not None:
            await asyncio.shield(self._sender)

    def buffered(self) -> int:
        """Bytes not yet sent."""
        transport = self._transport
        return len(self._pending) + (transport.get_write_buffer_size() if transport is not None else 0)

    def pause_reading(self) -> None:
        """Nothing to pause: the connection stops taking packets itself."""

    async def finish(self, timeout_s: float) -> None:
        """Nothing to wait for: a WebSocket has no half-close; it is closed after what is written."""

    def close(self) -> None:
        """Close once what is queued is sent."""
        if self._closing:
            return
        self._closing = True
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(), name=f"spotbox-mqtt-ws-close-{self.peer}")

    def abort(self) -> None:
        """Close at once: the connection under the WebSocket is cut (no close handshake to wait for)."""
        self._closing = True
        self._pending.clear()
        if self._transport is not None:
            self._transport.abort()


class _TlsLater(asyncio.StreamReaderProtocol):
    """The protocol of a TLS listener's connection: it reads nothing until the connection starts TLS once admitted
    (`TcpStream.handshake`), so the client's ClientHello stays in the socket for the handshake."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.ReadTransport):
            transport.pause_reading()
        super().connection_made(transport)

    def eof_received(self) -> bool:
        super().eof_received()
        return False  # TLS has no half-close: the end of the stream closes the connection


async def start_tcp(
    client_connected: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    host: str,
    port: int,
    *,
    tls: bool = False,
    sock: socket.socket | None = None,
) -> asyncio.Server:
    """The TCP listener, on host:port or on an already-bound socket; with `tls`, the connections it hands over have
    read nothing yet, so that each starts TLS itself (`TcpStream.handshake`)."""
    # A fleet reconnects at once after a restart of the gateway: thousands of SYNs within a second. asyncio's default
    # backlog of 100 would drop most of them into the client's SYN retry (1 s, 3 s, 7 s...); the kernel caps this at
    # net.core.somaxconn.
    backlog = 4096
    loop = asyncio.get_running_loop()
    protocol = _TlsLater if tls else asyncio.StreamReaderProtocol

    def factory() -> asyncio.StreamReaderProtocol:
        return protocol(asyncio.StreamReader(limit=2**20), client_connected)

    if sock is not None:
        return await loop.create_server(factory, sock=sock, backlog=backlog)
    return await loop.create_server(factory, host, port, reuse_address=True, backlog=backlog)
