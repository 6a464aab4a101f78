"""MQTT over WebSocket on the HTTP port: aiohttp's WebSocket wrapped in amqtt's reader/writer adapters."""

from __future__ import annotations

import logging
import ssl
from typing import cast

from aiohttp import WSMsgType, web
from amqtt.adapters import ReaderAdapter, WriterAdapter

from spotbox.broker.server import WS_LISTENER, SpotboxBroker

logger = logging.getLogger(__name__)


class WebSocketReader(ReaderAdapter):
    """Reads MQTT bytes out of binary WebSocket messages, however the client split its packets."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws
        self._buffer = bytearray()
        self._eof = False

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all buffered bytes for -1); fewer only at end of stream."""
        while not self._eof and ((n < 0 and not self._buffer) or len(self._buffer) < n):
            message = await self._ws.receive()
            if message.type == WSMsgType.BINARY:
                self._buffer.extend(message.data)
            elif message.type == WSMsgType.TEXT:
                # MQTT over WebSocket must use binary frames [MQTT-6.0.0-1]: treat text as the end.
                logger.warning("mqtt websocket client sent a text frame; closing")
                self._eof = True
            elif message.type == WSMsgType.ERROR:
                logger.warning("mqtt websocket connection closed: %s", self._ws.exception())
                self._eof = True
            else:
                self._eof = True
        size = len(self._buffer) if n < 0 else min(n, len(self._buffer))
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def feed_eof(self) -> None:
        """Mark the end of stream."""
        self._eof = True


class WebSocketWriter(WriterAdapter):
    """Collects amqtt's writes and sends them as one binary WebSocket message per drain."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self._ws = ws
        self._request = request
        self._pending = bytearray()

    def write(self, data: bytes) -> None:
        """Buffer bytes until the next drain."""
        self._pending.extend(data)

    async def drain(self) -> None:
        """Send the buffered bytes."""
        if self._pending and not self._ws.closed:
            data, self._pending = bytes(self._pending), bytearray()
            await self._ws.send_bytes(data)

    def get_peer_info(self) -> tuple[str, int] | None:
        """(address, port) of the WebSocket client."""
        transport = self._request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if not peer:
            return None
        return str(peer[0]), int(peer[1])

    def get_ssl_info(self) -> ssl.SSLObject | None:
        """The TLS object of the connection, if any."""
        transport = self._request.transport
        return cast("ssl.SSLObject | None", transport.get_extra_info("ssl_object") if transport else None)

    async def close(self) -> None:
        """Close the WebSocket."""
        await self._ws.close()


async def serve_mqtt_websocket(request: web.Request, broker: SpotboxBroker) -> web.WebSocketResponse:
    """Hand one WebSocket client (subprotocol `mqtt`) to the broker for its whole connection."""
    # Clients send one MQTT packet per WebSocket message; a bigger message is refused by aiohttp, unread.
    ws = web.WebSocketResponse(protocols=("mqtt",), max_msg_size=broker.limits.max_packet + 5)
    await ws.prepare(request)
    transport = request.transport
    if transport is None:  # the client is already gone
        return ws
    try:
        await broker.serve_client(WebSocketReader(ws), WebSocketWriter(ws, request), WS_LISTENER, transport)
    except Exception:
        logger.exception("mqtt websocket connection ended by an error")
    finally:
        await ws.close()
    return ws
