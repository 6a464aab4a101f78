"""A robot status as spotbox stores it, and as the API shows it."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

SERIAL_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
SERIAL_RE = re.compile(SERIAL_PATTERN)
# "." and ".." match the pattern but mean "here" and "up" in URLs and file names: they are never serials.
SERIAL_RULE = f"does not match {SERIAL_PATTERN} (and is not . or ..)"
STATUS_TOPIC_RE = re.compile(r"robot/([^/]*)/status")


def status_topic_serial(topic: str) -> str | None:
    """The `{serial}` level of a `robot/{serial}/status` topic, or None for any other topic."""
    match = STATUS_TOPIC_RE.fullmatch(topic)
    return match.group(1) if match else None


def is_valid_serial(serial: str) -> bool:
    """True when `serial` is a robot serial number spotbox accepts."""
    return SERIAL_RE.fullmatch(serial) is not None and serial not in (".", "..")


def parse_utc(text: str) -> datetime:
    """An ISO 8601 / RFC 3339 date-time as an aware UTC datetime; one without an offset is taken as UTC.

    Raises ValueError when `text` is not a date-time.
    """
    # RFC 3339 allows a lower-case "t" and "z"; fromisoformat does not.
    moment = datetime.fromisoformat(text.upper())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def to_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch: the exact, sortable integer SQLite stores for a time."""
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(micros: int) -> datetime:
    """The UTC datetime of `to_micros`."""
    return datetime.fromtimestamp(micros // 1_000_000, UTC).replace(microsecond=micros % 1_000_000)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(slots=True, frozen=True)
class StatusRecord:
    """A validated status, ready to be written."""

    serial_number: str
    ts: datetime
    received_at: datetime
    battery_level: int
    battery_status: str
    driving_status: str
    current_drive_id: str | None
    latitude: float
    longitude: float
    height: float
    payload: bytes
    payload_hash: bytes

    @property
    def dedup_key(self) -> tuple[str, int, bytes]:
        """Same robot, same ts, same payload: one row."""
        return (self.serial_number, to_micros(self.ts), self.payload_hash)


def payload_digest(raw: bytes) -> bytes:
    """The digest that, with serial and ts, identifies a status for deduplication."""
    return hashlib.blake2b(raw, digest_size=16).digest()


@dataclass(slots=True, frozen=True)
class StoredStatus:
    """A status row as read back from storage."""

    id: int
    record: StatusRecord

    def to_api(self, *, include_payload: bool = False) -> dict[str, Any]:
        """The one JSON shape of a status, wherever the API shows it."""
        rec = self.record
        body: dict[str, Any] = {
            "id": self.id,
            "serial_number": rec.serial_number,
            "ts": rec.ts,
            "received_at": rec.received_at,
            "battery_level": rec.battery_level,
            "battery_status": rec.battery_status,
            "driving_status": rec.driving_status,
            "current_drive_id": rec.current_drive_id,
            "location": {"latitude": rec.latitude, "longitude": rec.longitude, "height": rec.height},
        }
        if include_payload:
            body["payload"] = orjson.Fragment(rec.payload)
        return body


def dumps(value: Any) -> bytes:
    """JSON with UTC times written as `...Z`, the way every spotbox answer is encoded."""
    return orjson.dumps(value, option=orjson.OPT_UTC_Z)
