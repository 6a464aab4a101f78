"""Turn a raw status payload into a StatusRecord, or into the reasons it was rejected."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from math import isfinite
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError, relevance

from spotbox import rawjson
from spotbox.errors import ConfigError
from spotbox.rawjson import preview
from spotbox.status import SERIAL_RULE, StatusRecord, dumps, is_valid_serial, parse_utc, payload_digest

logger = logging.getLogger(__name__)

# A reason names the field and the rule; it quotes at most the start of a value, never the whole of it.
REASON_MAX = 200
# The copy of a refused payload an operator sees on spotbox/rejected/{serial}: its start, enough to recognise it.
REPORTED_PAYLOAD_MAX = 4096
# A status failing every rule of an operator's schema still gets a bounded list.
ERRORS_MAX = 20
# jsonschema-rs writes this where its messages would print the whole failing value; spotbox prints a preview.
_MASK = "\x00value\x00"
# RFC 4122's text form in ASCII hex only: Python's UUID() also takes fullwidth or Arabic-Indic digits, and would
# then store an id that differs from the payload's text.
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


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

    def event(self, received_at: datetime) -> dict[str, Any]:
        """The refusal as the fleet feed and the uplink show it: serial, field, reason, receive time."""
        return {
            "serial_number": self.serial_number,
            "field": self.field,
            "reason": self.reason,
            "received_at": received_at,
        }


def reason(field: str, rule: str) -> str:
    """`field: rule`, cut to REASON_MAX characters."""
    text = f"{preview(field, 64)}: {rule}"
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 1] + "…"


def show(value: Any) -> str:
    """A value as JSON, or as much of it as a reason may quote (a large array or object is only counted)."""
    if isinstance(value, str):
        return json.dumps(preview(value), ensure_ascii=False)
    if isinstance(value, list):
        return f"an array of {len(value)} items" if len(value) > 4 else preview(_json(value))
    if isinstance(value, dict):
        return f"an object of {len(value)} keys" if len(value) > 4 else preview(_json(value))
    return preview(_json(value))


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _json_list(values: Iterable[Any]) -> str:
    return preview(_json(list(values)), 100)


def _field(path: Iterable[Any]) -> str:
    return ".".join(str(part) for part in path)


def _describe_fast(error: Any) -> str:
    """A jsonschema-rs error in JSON terms, naming its own field: `battery_status: is required`."""
    kind = error.kind
    path = list(error.instance_path)
    match type(kind).__name__:
        case "Required":
            return reason(_field([*path, kind.property]), "is required")
        case "Type":
            types = kind.types
            wanted = _json(types[0]) if len(types) == 1 else _json_list(types)
            return reason(_field(path) or "payload", f"{show(error.instance)} is not of type {wanted}")
        case "Enum":
            return reason(_field(path), f"{show(error.instance)} is not one of {_json_list(kind.options)}")
        case "Constant":
            return reason(_field(path), f"{show(error.instance)} is not {preview(_json(kind.expected_value))}")
        case "AdditionalProperties":
            return reason(_field(path) or "payload", f"unexpected properties {_json_list(kind.unexpected)}")
        case _:
            message = error.message.replace(_MASK, show(error.instance))
            return reason(_field(path) or "payload", message)


def _conditional(error: Any) -> bool:
    # A field's own rule names the culprit better than a conditional it only fails as a consequence
    # (PARKED fails the enum; the drive id then fails the `else` branch too).
    schema_path = list(error.schema_path)
    return bool(schema_path) and schema_path[0] in ("if", "then", "else")


def _describe(error: ValidationError) -> str:
    """A jsonschema error (the fallback validator), naming the field that failed."""
    path = [str(part) for part in error.absolute_path]
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [name for name in error.validator_value if name not in error.instance]
        if missing:
            return reason(_field([*path, missing[0]]), "is required")
    return reason(_field(path) or "payload", error.message)


def _first_failing(error: ValidationError) -> tuple[bool, Any]:
    conditional = bool(error.schema_path) and error.schema_path[0] in ("if", "then", "else")
    return conditional, relevance(error)


def _finite_location(location: dict[str, Any]) -> str | None:
    for name in ("latitude", "longitude", "height"):
        if not math.isfinite(location[name]):
            return reason(f"location.{name}", f"{show(location[name])} is not a finite number")
    return None


class StatusValidator:
    """The status JSON Schema, compiled once, applied to every status whatever its transport."""

    def __init__(self, schema_path: Path, *, max_depth: int = 32, max_future: timedelta | None = None) -> None:
        try:
            schema = orjson.loads(schema_path.read_bytes())
            Draft202012Validator.check_schema(schema)
        except (OSError, orjson.JSONDecodeError, SchemaError) as exc:
            raise ConfigError("--schema", f"{schema_path} is not a JSON Schema 2020-12 document: {exc}") from exc
        # jsonschema-rs (about 1 us against about 200 us for jsonschema) answers "valid?" and writes the reasons:
        # masked, its messages never print a whole value, so a refused 1 MB array costs no more than parsing it.
        # jsonschema is the fallback for a schema jsonschema-rs cannot compile.
        self._validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
        self._fast: Any = None
        try:
            self._fast = jsonschema_rs.validator_for(schema, validate_formats=True, mask=_MASK)
        except (ValueError, jsonschema_rs.ValidationError) as exc:
            logger.info("fast validator cannot compile %s (%s); validating with jsonschema only", schema_path, exc)
        self.schema_path = schema_path
        self.max_depth = max_depth
        self.max_future = max_future
        self._too_deep = f"payload: nests objects and arrays deeper than {max_depth} levels (--max-json-depth)"

    def check(self, serial: str, raw: bytes, received_at: datetime) -> StatusRecord | Rejection:  # noqa: PLR0911
        """Validate one payload published for robot `serial`."""
        if not is_valid_serial(serial):
            return Rejection(serial, [reason("serial_number", f"{show(serial)} {SERIAL_RULE}")])
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            # orjson stops at 1024 levels by itself; that is the same refusal, not a syntax error.
            if "depth limit" in str(exc):
                return Rejection(serial, [self._too_deep])
            if "infinity" in str(exc) and (found := rawjson.exact_problem(raw)):
                return Rejection(serial, [reason(*found.split(": ", 1))])
            return Rejection(serial, [reason("payload", f"not valid UTF-8 JSON ({preview(str(exc), 120)})")])
        if type(doc) is not dict:
            return Rejection(serial, [f"payload: must be a JSON object, got {type(doc).__name__}"])
        if problem := rawjson.screen(raw, doc, self.max_depth):
            return Rejection(
                serial, [self._too_deep if problem is rawjson.TOO_DEEP else reason(*problem.split(": ", 1))]
            )
        if errors := self._errors(doc):
            return Rejection(serial, errors)
        if b"\\u0000" in raw:
            # PostgreSQL's jsonb cannot hold U+0000; refuse it on every backend alike.
            return Rejection(serial, ["payload: the NUL character (\\u0000) is not accepted in strings"])
        try:
            return self._record(serial, doc, raw, received_at)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            # Only reachable with an operator's --schema looser than the typed columns need.
            return Rejection(serial, [reason("payload", f"{preview(str(exc), 80)} (spotbox stores every field)")])

    def _errors(self, doc: dict[str, Any]) -> list[str]:
        """Every schema error, field rules before conditionals; empty when the status is valid."""
        if self._fast is not None:
            if self._fast.is_valid(doc):
                return []
            failing = sorted(self._fast.iter_errors(doc), key=_conditional)
            return [_describe_fast(error) for error in failing[:ERRORS_MAX]]
        return [_describe(error) for error in sorted(self._validator.iter_errors(doc), key=_first_failing)][:ERRORS_MAX]

    def _record(self, serial: str, doc: dict[str, Any], raw: bytes, received_at: datetime) -> StatusRecord | Rejection:
        location = doc["location"]
        latitude, longitude, height = location["latitude"], location["longitude"], location["height"]
        if not (isfinite(latitude) and isfinite(longitude) and isfinite(height)) and (
            problem := _finite_location(location)
        ):
            return Rejection(serial, [problem])
        stamp = doc.get("timestamp")
        try:
            ts = parse_utc(stamp) if stamp is not None else received_at
        except (ValueError, OverflowError):
            return Rejection(serial, [reason("timestamp", f"{show(stamp)} is not a representable date-time")])
        if self.max_future is not None and ts - received_at > self.max_future:
            ahead = f"{self.max_future.total_seconds():g} s"
            rule = f"{show(stamp)} is more than {ahead} ahead of the receive time (--max-future)"
            return Rejection(serial, [reason("timestamp", rule)])
        drive_id = doc.get("current_drive_id")
        if drive_id is not None and (not isinstance(drive_id, str) or not _UUID_RE.fullmatch(drive_id)):
            return Rejection(serial, [reason("current_drive_id", f'{show(drive_id)} is not a "uuid"')])
        return StatusRecord(
            serial_number=serial,
            ts=ts,
            received_at=received_at,
            battery_level=int(doc["battery_level"]),
            battery_status=str(doc["battery_status"]),
            driving_status=str(doc["driving_status"]),
            current_drive_id=drive_id.lower() if drive_id is not None else None,
            latitude=float(latitude),
            longitude=float(longitude),
            height=float(height),
            payload=raw if type(raw) is bytes else bytes(raw),
            payload_hash=payload_digest(raw),
        )


def rejection_report(topic: str, rejection: Rejection, payload: bytes) -> bytes:
    """The JSON an operator sees on `spotbox/rejected/{serial}`: the topic, the reasons, the payload's first 4 KiB.

    `payload_truncated` says whether the payload was longer; the copy is cut on a character boundary.
    """
    shown = payload[:REPORTED_PAYLOAD_MAX].decode("utf-8", errors="replace")
    truncated = len(payload) > REPORTED_PAYLOAD_MAX
    if truncated and shown.endswith("\ufffd"):
        # The cut fell inside a multi-byte character: drop its first bytes rather than show a replacement mark.
        shown = shown[:-1]
    return dumps({"topic": topic, "errors": rejection.errors, "payload": shown, "payload_truncated": truncated})
