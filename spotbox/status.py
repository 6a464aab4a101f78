"""A robot status as spotbox stores it, and as the API shows it."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson

SERIAL_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
SERIAL_RE = re.compile(SERIAL_PATTERN)
# "." and ".." match the pattern but mean "here" and "up" in URLs and file names: they are never serials.
SERIAL_RULE = f"does not match {SERIAL_PATTERN} (and is not . or ..)"


def status_topic_serial(topic: str) -> str | None:
    """The `{serial}` level of a `robot/{serial}/status` topic, or None for any other topic.

    The regular expression `robot/([^/]*)/status` in string operations: this runs for every message.
    """
    if len(topic) < 13 or not topic.startswith("robot/") or not topic.endswith("/status"):
        return None
    serial = topic[6:-7]
    return None if "/" in serial else serial


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


# Not frozen, like StoredStatus: one of each is built for every status, and a frozen dataclass's __init__ (a
# object.__setattr__ per field) cost about 1 microsecond more for these 14 fields. Nothing changes one once built.
@dataclass(slots=True)
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
    # For a QoS 1/2 status without a timestamp: what identifies its delivery (see `Delivery`), stored with the row.
    delivery_key: bytes | None = None
    # True for a resend (DUP) of such a status: storage keeps it once when a row of the same delivery is recent.
    resend: bool = False

    @property
    def dedup_key(self) -> tuple[str, int, bytes]:
        """Same robot, same ts, same payload: one row."""
        return (self.serial_number, to_micros(self.ts), self.payload_hash)


@dataclass(slots=True)  # not frozen: one is built per QoS 1/2 status (see StatusRecord)
class Delivery:
    """One MQTT delivery of a status at QoS 1 or 2: the publishing client, its packet id, and its DUP flag.

    A status without a timestamp takes its receive time as `ts`, so a resend after a lost PUBACK is not equal to
    the stored row. The client id, packet id and payload digest identify the delivery instead: storage keeps them
    with the row, and a resend (DUP) of the same delivery within RESEND_WINDOW is a duplicate, even across a restart.
    Equal payloads alone never are: an idle robot legitimately repeats the same status.
    """

    client_id: str
    packet_id: int
    resend: bool

    def key(self, payload_hash: bytes) -> bytes:
        """The delivery key stored with the row."""
        ident = self.client_id.encode("utf-8", "surrogatepass") + b"\0" + self.packet_id.to_bytes(2, "big")
        return hashlib.blake2b(ident + payload_hash, digest_size=16).digest()


# How far back a resend (DUP) of a status without a timestamp is matched against stored deliveries: a resend comes
# on the reconnect after a lost PUBACK, a restart included; an older row with the same key is more likely an earlier
# identical status whose packet id the client has since reused.
RESEND_WINDOW = timedelta(minutes=5)


def payload_digest(raw: bytes) -> bytes:
    """The digest that, with serial and ts, identifies a status for deduplication."""
    return hashlib.blake2b(raw, digest_size=16).digest()


@dataclass(slots=True)
class StoredStatus:
    """A status row as read back from storage."""

    id: int
    record: StatusRecord

    def to_api(self, *, include_payload: bool = False) -> dict[str, Any]:
        """The one JSON shape of a status, wherever the API shows it (built by `api_item`)."""
        row = self.to_row()
        return api_item((*row, self.record.payload) if include_payload else row)

    def to_row(self) -> StatusRow:
        """The columns the read routes show, in their order (no raw payload)."""
        rec = self.record
        return StatusRow(
            self.id,
            rec.serial_number,
            rec.ts,
            rec.received_at,
            rec.battery_level,
            rec.battery_status,
            rec.driving_status,
            rec.current_drive_id,
            rec.latitude,
            rec.longitude,
            rec.height,
        )


class StatusRow(NamedTuple):
    """A stored status as the read routes show it, without its raw payload: the columns they read, in this order."""

    id: int
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

    def to_api(self) -> dict[str, Any]:
        """The one JSON shape of a status (the same as StoredStatus.to_api)."""
        return api_item(self)


def api_item(row: Sequence[Any]) -> dict[str, Any]:
    """The JSON shape of a status from a row of StatusRow's columns, a raw payload text after them if any.

    `ts` and `received_at` may be datetimes or already the text `dumps` writes for them (`...Z`): the history
    route has SQLite format them, where it costs no Python time.
    """
    body = {
        "id": row[0],
        "serial_number": row[1],
        "ts": row[2],
        "received_at": row[3],
        "battery_level": row[4],
        "battery_status": row[5],
        "driving_status": row[6],
        "current_drive_id": row[7],
        "location": {"latitude": row[8], "longitude": row[9], "height": row[10]},
    }
    if len(row) > API_COLUMN_COUNT:
        body["payload"] = orjson.Fragment(row[API_COLUMN_COUNT])
    return body


API_COLUMN_COUNT = len(StatusRow._fields)


def api_items_json(rows: Sequence[Sequence[Any]]) -> bytes:
    """A JSON array of statuses from rows of StatusRow's columns (and a payload text), in one orjson call."""
    return dumps([api_item(row) for row in rows])


def dumps(value: Any) -> bytes:
    """JSON with UTC times written as `...Z`, the way every spotbox answer is encoded."""
    return orjson.dumps(value, option=orjson.OPT_UTC_Z)


def location_json(latitude: float, longitude: float, height: float) -> str:
    """A status's location object as the API writes it (orjson's floats): kept with each row, so that a history
    page is the database joining stored texts (see the storage backends)."""
    # float(): a whole number given as an int is written 34.0, as the stored double reads back.
    return orjson.dumps({"latitude": float(latitude), "longitude": float(longitude), "height": float(height)}).decode()


def dumps_kept(value: Any) -> bytes:
    """`dumps` for JSON held for long (a retained message, a queued webhook call): a copy of its own length.

    orjson's bytes keep the memory of its write buffer, about 4 KB however short the JSON (50,000 documents of
    150 bytes held 197 MB of RSS): one retained alert list per robot would cost 40 MB at 10,000 robots.
    """
    return bytes(memoryview(dumps(value)))
