"""What a received packet can be wrong with; the connection turns each into its answer (CONNACK code or close)."""

from __future__ import annotations

from spotbox.errors import SpotboxError


class ProtocolError(SpotboxError):
    """A peer broke the MQTT protocol; `reason` says how, short and safe to log (no payload bytes)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MalformedPacket(ProtocolError):  # noqa: N818 - named as the standard names the condition
    """The packet is malformed or a protocol violation: the connection is closed (MQTT 5: DISCONNECT 0x81 first)."""


class UnsupportedProtocol(ProtocolError):  # noqa: N818 - named as the standard names the condition
    """CONNECT names a protocol level this codec does not speak: answer CONNACK 0x01, then close [MQTT-3.1.2-2]."""

    def __init__(self, level: int) -> None:
        super().__init__(f"unsupported protocol level {level}")
        self.level = level


class IdentifierRejected(ProtocolError):  # noqa: N818 - named as the standard names the condition
    """CONNECT has an empty client id without a clean session: answer CONNACK 0x02, then close [MQTT-3.1.3-8]."""
