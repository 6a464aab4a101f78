"""MQTT 5 clients for the tests: a bare-socket client speaking through the `mqtt5` codec (every packet, reason code
and property on the wire in view), and a paho-mqtt MQTTv5 client for what a paho publisher sees of a PUBACK."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import mqtt5
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

P = TypeVar("P")


class Wire:
    """One MQTT 5 connection on a plain socket: send packets, receive them decoded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, *packets: Any) -> None:
        """Encode and send packets (mqtt5 packet objects, or raw bytes for what the codec would not write)."""
        for packet in packets:
            self.writer.write(packet if isinstance(packet, bytes) else packet.write())
        await self.writer.drain()

    async def receive(self) -> mqtt5.Packet | None:
        """The next packet from spotbox, decoded; None when spotbox closed the connection."""
        async with asyncio.timeout(10):
            first = await self.reader.read(1)
            if not first:
                return None
            header = bytearray(first)
            while True:
                byte = await self.reader.readexactly(1)
                header += byte
                if not byte[0] & 0x80:
                    break
            length, shift = 0, 0
            for byte_value in header[1:]:
                length |= (byte_value & 0x7F) << shift
                shift += 7
            body = await self.reader.readexactly(length)
        packet, _ = mqtt5.read(memoryview(bytes(header) + body))
        return packet

    async def expect(self, kind: type[P]) -> P:
        """The next packet, which must be of type `kind`."""
        packet = await self.receive()
        assert isinstance(packet, kind), f"expected {kind.__name__}, got {packet!r}"
        return packet

    async def closed(self) -> bool:
        """True once spotbox has closed the connection (the packets before that are skipped)."""
        while (packet := await self.receive()) is not None:
            if isinstance(packet, mqtt5.DisconnectPacket):
                continue
        return True


@asynccontextmanager
async def wire_client(port: int, **connect: Any) -> AsyncIterator[tuple[Wire, mqtt5.ConnAckPacket]]:
    """A connected bare MQTT 5 client and the CONNACK it got (`connect` are ConnectPacket arguments)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    wire = Wire(reader, writer)
    try:
        connect.setdefault("clean_start", True)
        connect.setdefault("keep_alive", 60)
        await wire.send(mqtt5.ConnectPacket(connect.pop("client_id", f"wire-{uuid.uuid4().hex[:8]}"), **connect))
        yield wire, await wire.expect(mqtt5.ConnAckPacket)
    finally:
        writer.close()
        await writer.wait_closed()


class PahoV5:
    """A paho-mqtt MQTT 5 client on its network thread, its acknowledgements handed to the event loop."""

    def __init__(self, port: int, transport: str = "tcp", **login: str) -> None:
        self.port = port
        self._loop = asyncio.get_running_loop()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"paho5-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
            transport="websockets" if transport == "websockets" else "tcp",
        )
        if transport == "websockets":
            self.client.ws_set_options(path="/mqtt")
        if login:
            self.client.username_pw_set(login["username"], login["password"])
        self._connack: asyncio.Future[ReasonCode] = self._loop.create_future()
        self._acks: dict[int, asyncio.Future[tuple[ReasonCode, Properties | None]]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason_code: ReasonCode, _p: Any) -> None:
        self._loop.call_soon_threadsafe(self._connack.set_result, reason_code)

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason_code: ReasonCode, properties: Properties | None) -> None:
        def resolve() -> None:
            future = self._acks.setdefault(mid, self._loop.create_future())
            future.set_result((reason_code, properties))

        self._loop.call_soon_threadsafe(resolve)

    async def connect(self) -> ReasonCode:
        """Connect and return the CONNACK reason code."""
        # connect_async: the TCP connect and WebSocket handshake happen on paho's thread, not this event loop's,
        # which must stay free to serve them.
        self.client.connect_async("127.0.0.1", self.port)
        self.client.loop_start()
        async with asyncio.timeout(10):
            return await self._connack

    async def publish(self, topic: str, payload: bytes, qos: int) -> tuple[ReasonCode, Properties | None]:
        """Publish and return the PUBACK/PUBREC reason code and its properties (reason string)."""
        info = self.client.publish(topic, payload, qos=qos)
        future = self._acks.setdefault(info.mid, self._loop.create_future())
        async with asyncio.timeout(10):
            return await future

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


@asynccontextmanager
async def paho_v5(port: int, transport: str = "tcp", **login: str) -> AsyncIterator[PahoV5]:
    """A connected paho MQTTv5 client."""
    client = PahoV5(port, transport, **login)
    code = await client.connect()
    assert code == 0, code
    try:
        yield client
    finally:
        client.close()


def reason_string(properties: Properties | None) -> str | None:
    """The Reason String property of an acknowledgement, if it has one."""
    return getattr(properties, "ReasonString", None)
