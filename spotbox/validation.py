"""Turn a raw status payload into a StatusRecord, or into the reasons it was rejected."""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError, relevance

from spotbox.errors import ConfigError
from spotbox.status import SERIAL_PATTERN, StatusRecord, is_valid_serial, parse_utc, payload_digest

logger = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Rejection:
    """Why a status was refused; `errors[0]` names the first failing field."""

    serial_number: str
    errors: list[str]

    @property
    def reason(self) -> str:
        """The first error, as shown to the publisher and in logs."""
        return self.errors[0]

    @property
    def field(self) -> str:
        """The failing field of the first error (`payload` when the message is not JSON at all)."""
        return self.reason.split(":", 1)[0]


def _describe(error: ValidationError) -> str:
    """`battery_level: 150 is greater than the maximum of 100`, naming the field that failed."""
    path = [str(part) for part in error.absolute_path]
    message = error.message
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = next((name for name in error.validator_value if name not in error.instance), None)
        if missing is not None:
            path.append(missing)
            message = "is required"
    field = ".".join(path) if path else "payload"
    return f"{field}: {message}"


def _first_failing(error: ValidationError) -> tuple[bool, Any]:
    # A field's own rule names the culprit better than a conditional it only fails as a consequence
    # (PARKED fails the enum; the drive id then fails the `else` branch too).
    conditional = bool(error.schema_path) and error.schema_path[0] in ("if", "then", "else")
    return conditional, relevance(error)


def _finite_location(location: dict[str, Any]) -> str | None:
    for name in ("latitude", "longitude", "height"):
        if not math.isfinite(location[name]):
            return f"location.{name}: {location[name]} is not a finite number"
    return None


def _deeper_than(doc: Any, limit: int) -> bool:
    """True when objects and arrays nest more than `limit` levels (the status object itself is level 1)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


class StatusValidator:
    """The status JSON Schema, compiled once, applied to every status whatever its transport."""

    def __init__(self, schema_path: Path, *, max_depth: int = 32) -> None:
        try:
            schema = orjson.loads(schema_path.read_bytes())
            Draft202012Validator.check_schema(schema)
        except (OSError, orjson.JSONDecodeError, SchemaError) as exc:
            raise ConfigError("--schema", f"{schema_path} is not a JSON Schema 2020-12 document: {exc}") from exc
        self._validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
        # jsonschema is the reference and writes every rejection reason; jsonschema-rs (about 1 us against
        # about 200 us, the largest cost of ingest in the profile) only answers "valid?" for the common case.
        self._fast: Any = None
        try:
            self._fast = jsonschema_rs.validator_for(schema, validate_formats=True)
        except (ValueError, jsonschema_rs.ValidationError) as exc:
            logger.info("fast validator cannot compile %s (%s); validating with jsonschema only", schema_path, exc)
        self.schema_path = schema_path
        self.max_depth = max_depth

    def check(self, serial: str, raw: bytes, received_at: datetime) -> StatusRecord | Rejection:  # noqa: PLR0911
        """Validate one payload published for robot `serial`."""
        if not is_valid_serial(serial):
            return Rejection(serial, [f"serial_number: {serial!r} does not match {SERIAL_PATTERN}"])
        too_deep = f"payload: nests objects and arrays deeper than {self.max_depth} levels (--max-json-depth)"
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            # orjson stops at 1024 levels by itself; that is the same refusal, not a syntax error.
            return Rejection(
                serial, [too_deep if "depth limit" in str(exc) else f"payload: not valid UTF-8 JSON ({exc})"]
            )
        if not isinstance(doc, dict):
            return Rejection(serial, [f"payload: must be a JSON object, got {type(doc).__name__}"])
        # A document cannot nest deeper than it has brackets: most statuses skip the walk.
        if raw.count(b"{") + raw.count(b"[") > self.max_depth and _deeper_than(doc, self.max_depth):
            return Rejection(serial, [too_deep])
        if self._fast is None or not self._fast.is_valid(doc):
            errors = sorted(self._validator.iter_errors(doc), key=_first_failing)
            if errors:
                return Rejection(serial, [_describe(error) for error in errors])
        if b"\\u0000" in raw:
            # PostgreSQL's jsonb cannot hold U+0000; refuse it on every backend alike.
            return Rejection(serial, ["payload: the NUL character (\\u0000) is not accepted in strings"])
        try:
            return self._record(serial, doc, raw, received_at)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            # Only reachable with an operator's --schema looser than the typed columns need.
            return Rejection(serial, [f"payload: {exc!s} (spotbox stores every field of SPEC section 4)"])

    @staticmethod
    def _record(serial: str, doc: dict[str, Any], raw: bytes, received_at: datetime) -> StatusRecord | Rejection:
        location = doc["location"]
        if problem := _finite_location(location):
            return Rejection(serial, [problem])
        stamp = doc.get("timestamp")
        try:
            ts = parse_utc(stamp) if stamp is not None else received_at
        except (ValueError, OverflowError):
            return Rejection(serial, [f"timestamp: {stamp!r} is not a representable date-time"])
        drive_id = doc.get("current_drive_id")
        return StatusRecord(
            serial_number=serial,
            ts=ts,
            received_at=received_at,
            battery_level=int(doc["battery_level"]),
            battery_status=str(doc["battery_status"]),
            driving_status=str(doc["driving_status"]),
            current_drive_id=str(uuid.UUID(drive_id)) if drive_id is not None else None,
            latitude=float(location["latitude"]),
            longitude=float(location["longitude"]),
            height=float(location["height"]),
            payload=bytes(raw),
            payload_hash=payload_digest(raw),
        )
