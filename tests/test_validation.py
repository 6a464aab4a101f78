"""The status validator against the bundled robot-status schema."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
import pytest
from jsonschema import Draft202012Validator

from spotbox.errors import ConfigError
from spotbox.settings import BUNDLED_SCHEMA
from spotbox.status import StatusRecord
from spotbox.validation import Rejection, StatusValidator
from tests.cases import INVALID, VALID
from tests.helpers import payload

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def validator() -> StatusValidator:
    """The validator as `spotbox run` builds it by default."""
    return StatusValidator(BUNDLED_SCHEMA)


@pytest.mark.parametrize(("name", "doc", "field"), INVALID, ids=[case[0] for case in INVALID])
def test_invalid_status_is_rejected_naming_its_field(
    validator: StatusValidator, name: str, doc: dict[str, Any], field: str
) -> None:
    """Test that each broken rule is rejected and the first error names the failing field."""
    verdict = validator.check("ROBOT-001", orjson.dumps(doc), NOW)
    assert isinstance(verdict, Rejection), name
    assert verdict.field == field, verdict.errors


@pytest.mark.parametrize(("name", "doc"), VALID, ids=[case[0] for case in VALID])
def test_valid_status_is_accepted(validator: StatusValidator, name: str, doc: dict[str, Any]) -> None:
    """Test that each status on the valid side of a boundary is accepted."""
    verdict = validator.check("ROBOT-001", orjson.dumps(doc), NOW)
    assert isinstance(verdict, StatusRecord), (name, verdict)


def test_reason_reads_like_the_spec(validator: StatusValidator) -> None:
    """Test that the reason for battery_level 150 names the field, the value and the limit in one sentence."""
    verdict = validator.check("ROBOT-001", payload(battery_level=150), NOW)
    assert isinstance(verdict, Rejection)
    assert verdict.reason == "battery_level: 150 is greater than the maximum of 100"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"{not json", "payload: not valid UTF-8 JSON"),
        (b"\xff\xfe{}", "payload: not valid UTF-8 JSON"),
        (b"[1, 2, 3]", "payload: must be a JSON object, got list"),
        (b"", "payload: not valid UTF-8 JSON"),
        (b"[" * 5000 + b"]" * 5000, "payload: nests objects and arrays deeper than 32 levels"),
        (payload(firmware="a\u0000b"), "payload: the NUL character"),
        (payload().replace(b'"latitude":52.52', b'"latitude":1e400'), "payload: not valid UTF-8 JSON"),
    ],
    ids=["malformed", "invalid_utf8", "array", "empty", "deep", "nul_character", "infinite_number"],
)
def test_unparseable_payload_is_rejected(validator: StatusValidator, raw: bytes, expected: str) -> None:
    """Test that payloads that are not a storable JSON object get a clear reason."""
    verdict = validator.check("ROBOT-001", raw, NOW)
    assert isinstance(verdict, Rejection)
    assert verdict.reason.startswith(expected), verdict.reason


@pytest.mark.parametrize("serial", ["", "robot 1", "a" * 65, "ROBOT/../x", "röbot"])
def test_bad_serial_is_rejected(validator: StatusValidator, serial: str) -> None:
    """Test that a topic level that is not a valid serial number is rejected."""
    verdict = validator.check(serial, payload(), NOW)
    assert isinstance(verdict, Rejection)
    assert verdict.field == "serial_number"


def test_timestamp_becomes_utc_ts_and_missing_one_uses_receive_time(validator: StatusValidator) -> None:
    """Test that `timestamp` is stored as UTC `ts`, and the receive time stands in when it is absent."""
    with_offset = validator.check("R1", payload(timestamp="2026-11-22T11:00:00.250+01:00"), NOW)
    assert isinstance(with_offset, StatusRecord)
    assert with_offset.ts == datetime(2026, 11, 22, 10, 0, 0, 250000, tzinfo=UTC)
    without = validator.check("R1", payload(timestamp=...), NOW)
    assert isinstance(without, StatusRecord)
    assert without.ts == NOW == without.received_at


def test_extra_fields_are_kept_in_the_payload(validator: StatusValidator) -> None:
    """Test that unknown fields survive validation byte for byte."""
    raw = payload(firmware="1.4.2")
    record = validator.check("R1", raw, NOW)
    assert isinstance(record, StatusRecord)
    assert record.payload == raw
    assert orjson.loads(record.payload)["firmware"] == "1.4.2"


def test_drive_id_is_normalised_to_lowercase(validator: StatusValidator) -> None:
    """Test that an upper-case UUID is stored in canonical form on every backend."""
    record = validator.check("R1", payload(current_drive_id="5F0C6A53-2F4E-4D8A-9D55-2B4A3C1E7F10"), NOW)
    assert isinstance(record, StatusRecord)
    assert record.current_drive_id == "5f0c6a53-2f4e-4d8a-9d55-2b4a3c1e7f10"


def test_unreadable_schema_is_a_config_error(tmp_path: Path) -> None:
    """Test that a --schema file that is not a JSON Schema is refused with the option named."""
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": 12}')
    with pytest.raises(ConfigError, match="--schema"):
        StatusValidator(bad)


def test_operator_schema_looser_than_storage_is_rejected_cleanly(tmp_path: Path) -> None:
    """Test that an operator schema allowing a status without location yields a rejection, not a crash."""
    loose = tmp_path / "loose.json"
    loose.write_text('{"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}')
    verdict = StatusValidator(loose).check("R1", payload(location=...), NOW)
    assert isinstance(verdict, Rejection)
    assert verdict.field == "payload"


@pytest.mark.parametrize(
    ("name", "doc", "valid"),
    [(name, doc, False) for name, doc, _ in INVALID] + [(name, doc, True) for name, doc in VALID],
    ids=[case[0] for case in INVALID] + [case[0] for case in VALID],
)
def test_fast_validator_agrees_with_jsonschema(name: str, doc: dict[str, Any], valid: bool) -> None:
    """Test that jsonschema-rs (the hot path's "valid?") and jsonschema (the reference) agree on every case."""
    schema = orjson.loads(BUNDLED_SCHEMA.read_bytes())
    reference = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    fast = jsonschema_rs.validator_for(schema, validate_formats=True)
    assert reference.is_valid(doc) is valid, name
    assert fast.is_valid(doc) is valid, name
