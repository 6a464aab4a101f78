"""The status validator against the bundled robot-status schema."""

from __future__ import annotations

import timeit
import uuid
from datetime import UTC, datetime, timedelta
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
        (payload().replace(b'"latitude":52.52', b'"latitude":1e400'), "location.latitude: 1e400 is beyond"),
    ],
    ids=["malformed", "invalid_utf8", "array", "empty", "deep", "nul_character", "infinite_number"],
)
def test_unparseable_payload_is_rejected(validator: StatusValidator, raw: bytes, expected: str) -> None:
    """Test that payloads that are not a storable JSON object get a clear reason."""
    verdict = validator.check("ROBOT-001", raw, NOW)
    assert isinstance(verdict, Rejection)
    assert verdict.reason.startswith(expected), verdict.reason


@pytest.mark.parametrize("serial", ["", "robot 1", "a" * 65, "ROBOT/../x", "röbot", ".", ".."])
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


def test_each_missing_field_is_named(validator: StatusValidator) -> None:
    """Test that every missing required field gets its own error naming it, not the first one three times."""
    verdict = validator.check("R1", b'{"battery_level": 50}', NOW)
    assert isinstance(verdict, Rejection)
    assert verdict.errors == [
        "battery_status: is required",
        "driving_status: is required",
        "location: is required",
    ]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"battery_status": None}, 'battery_status: null is not one of ["CHARGING", "DISCHARGING"]'),
        ({"battery_status": True}, 'battery_status: true is not one of ["CHARGING", "DISCHARGING"]'),
        ({"battery_level": None}, 'battery_level: null is not of type "integer"'),
        ({"battery_level": False}, 'battery_level: false is not of type "integer"'),
        ({"driving_status": "PARKED"}, 'driving_status: "PARKED" is not one of ["IDLE", "MOVING"]'),
        ({"current_drive_id": None}, 'current_drive_id: null is not of type "string"'),
    ],
    ids=["null_enum", "true_enum", "null_type", "false_type", "string_enum", "null_drive_id"],
)
def test_reasons_are_written_in_json_terms(validator: StatusValidator, changes: dict[str, Any], expected: str) -> None:
    """Test that reasons spell values and lists as JSON (null, true, ["A", "B"]), not as Python."""
    verdict = validator.check("R1", payload(**changes), NOW)
    assert isinstance(verdict, Rejection)
    assert verdict.reason == expected


BIG_ARRAY = [1e15] * 60_000  # about 1 MB of JSON


@pytest.mark.parametrize("where", ["battery_level", "location", "battery_status", "current_drive_id", "timestamp"])
def test_a_huge_value_gives_a_short_reason(validator: StatusValidator, where: str) -> None:
    """Test that a 1 MB array in a field gives a reason of at most 200 characters naming the field and the rule."""
    raw = payload(**{where: BIG_ARRAY})
    assert len(raw) > 1_000_000
    verdict = validator.check("R1", raw, NOW)
    assert isinstance(verdict, Rejection)
    assert verdict.field == where
    assert all(len(error) <= 200 for error in verdict.errors), verdict.errors
    assert "an array of 60000 items" in verdict.reason


def test_a_huge_value_costs_about_a_parse(validator: StatusValidator) -> None:
    """Test that refusing a 1 MB array costs a small multiple of parsing it, not a rendering of the whole value."""
    raw = payload(battery_level=BIG_ARRAY, location=BIG_ARRAY)
    parse = min(timeit.repeat(lambda: orjson.loads(raw), number=1, repeat=3))
    check = min(timeit.repeat(lambda: validator.check("R1", raw, NOW), number=1, repeat=3))
    # Measured about 8x here (the walk for depth and numbers, the error pass); rendering the values was 20x more.
    assert check < 40 * parse + 0.02, (check, parse)


def test_a_long_string_is_quoted_only_in_part(validator: StatusValidator) -> None:
    """Test that a reason quotes at most the start of a long string value."""
    verdict = validator.check("R1", payload(battery_status="X" * 100_000), NOW)
    assert isinstance(verdict, Rejection)
    assert verdict.field == "battery_status"
    assert len(verdict.reason) <= 200
    assert '"XXXX' in verdict.reason


# (name, raw JSON of the latitude, or of an extra field `extra`, the field the rejection names)
BAD_NUMBERS = [
    ("underflow_exponent", b'"latitude":1e-999999', "location.latitude"),
    ("underflow_long_mantissa", b'"latitude":0.' + b"0" * 400 + b"1", "location.latitude"),
    ("underflow_mixed", b'"latitude":0.0000000000000000000001e-310', "location.latitude"),
    ("negative_underflow", b'"latitude":-2e-324', "location.latitude"),
    ("overflow", b'"latitude":1e309', "location.latitude"),
    ("overflow_digits", b'"latitude":1' + b"0" * 400, "location.latitude"),
    ("int_past_int64", b'"extra":9223372036854775808', "extra"),
    ("int_below_int64", b'"extra":-9223372036854775809', "extra"),
    ("int_past_uint64", b'"extra":18446744073709551616', "extra"),
    ("int_of_5000_digits", b'"extra":' + b"7" * 5000, "extra"),
    ("nested_underflow", b'"extra":{"a":[1,{"b":1e-400}]}', "extra.a.1.b"),
]
GOOD_NUMBERS = [
    ("smallest_subnormal", b'"latitude":5e-324'),
    ("zero_with_exponent", b'"latitude":0e-999'),
    ("negative_zero", b'"latitude":-0.0'),
    ("large_double", b'"latitude":1.7976931348623157e308'),
    ("int64_max", b'"extra":9223372036854775807'),
    ("int64_min", b'"extra":-9223372036854775808'),
    ("many_digits_in_range", b'"extra":0.12345678901234567890123456789'),
    ("bad_number_in_a_string", b'"extra":"1e-999999 and 18446744073709551616"'),
    ("zero_beside_a_long_string", b'"latitude":0.0,"extra":"12345678901234567890123"'),
]


def _with_number(fragment: bytes) -> bytes:
    raw = payload()
    if fragment.startswith(b'"latitude"'):
        return raw.replace(b'"latitude":52.52', fragment)
    return raw[:-1] + b"," + fragment + b"}"


@pytest.mark.parametrize(("name", "fragment", "field"), BAD_NUMBERS, ids=[case[0] for case in BAD_NUMBERS])
def test_number_no_database_keeps_as_written_is_refused(
    validator: StatusValidator, name: str, fragment: bytes, field: str
) -> None:
    """Test that a number out of the double or int64 range, or rounding to 0 from non-zero text, is refused by field."""
    verdict = validator.check("R1", _with_number(fragment), NOW)
    assert isinstance(verdict, Rejection), name
    assert verdict.field == field, verdict.errors
    assert len(verdict.reason) <= 200


@pytest.mark.parametrize(("name", "fragment"), GOOD_NUMBERS, ids=[case[0] for case in GOOD_NUMBERS])
def test_number_in_range_is_accepted(validator: StatusValidator, name: str, fragment: bytes) -> None:
    """Test that numbers at the edges of the ranges, and number-like text in strings, are accepted."""
    verdict = validator.check("R1", _with_number(fragment), NOW)
    assert isinstance(verdict, StatusRecord), (name, verdict)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"battery_level": 150, ' + payload()[1:], "battery_level"),
        (payload()[:-1] + b', "battery_level" : 50}', "battery_level"),
        (payload().replace(b'"latitude":52.52', b'"latitude":1,"latitude":52.52'), "location.latitude"),
        (payload()[:-1] + b',"extra":[{"a":1,"b":2,"a":3}]}', "extra.0.a"),
    ],
    ids=["top_level", "space_before_colon", "nested", "inside_an_array"],
)
def test_duplicate_key_is_refused(validator: StatusValidator, raw: bytes, field: str) -> None:
    """Test that a status repeating a key at any depth is refused, naming the repeated field."""
    verdict = validator.check("R1", raw, NOW)
    assert isinstance(verdict, Rejection)
    assert verdict.field == field, verdict.errors
    assert "duplicate key" in verdict.reason


def test_key_like_text_in_strings_is_not_a_duplicate(validator: StatusValidator) -> None:
    """Test that strings holding `":` (which the quick key count sees) do not make a status a duplicate."""
    verdict = validator.check("R1", payload(note='say "a": 1, "a": 2'), NOW)
    assert isinstance(verdict, StatusRecord), verdict


@pytest.mark.parametrize(
    "drive_id",
    [
        "\uff15f0c6a53-2f4e-4d8a-9d55-2b4a3c1e7f10",  # fullwidth 5
        "\u0665f0c6a53-2f4e-4d8a-9d55-2b4a3c1e7f10",  # Arabic-Indic 5
        "5f0c6a53-2f4e-4d8a-9d55-2b4a3c1e7f1\U0001d7ce",  # mathematical bold 0
        "{5f0c6a53-2f4e-4d8a-9d55-2b4a3c1e7f10}",
        "urn:uuid:5f0c6a53-2f4e-4d8a-9d55-2b4a3c1e7f10",
    ],
    ids=["fullwidth", "arabic_indic", "math_digit", "braces", "urn"],
)
def test_drive_id_must_be_ascii_rfc4122_text(validator: StatusValidator, drive_id: str) -> None:
    """Test that only the RFC 4122 text form in ASCII hex passes current_drive_id."""
    verdict = validator.check("R1", payload(current_drive_id=drive_id), NOW)
    assert isinstance(verdict, Rejection)
    assert verdict.field == "current_drive_id"


def test_stored_drive_id_is_the_payload_uuid() -> None:
    """Test that the stored id is the same UUID value as the payload's, on the reference and fast validators alike."""
    validator = StatusValidator(BUNDLED_SCHEMA)
    text = "5F0C6A53-2F4E-4D8A-9D55-2B4A3C1E7F10"
    record = validator.check("R1", payload(current_drive_id=text), NOW)
    assert isinstance(record, StatusRecord)
    assert record.current_drive_id is not None
    assert uuid.UUID(record.current_drive_id) == uuid.UUID(text)


def test_timestamp_far_ahead_is_refused() -> None:
    """Test that a timestamp beyond --max-future of the receive time is refused naming timestamp, one within it not."""
    validator = StatusValidator(BUNDLED_SCHEMA, max_future=timedelta(minutes=5))
    year_9999 = validator.check("R1", payload(timestamp="9999-12-31T23:59:59Z"), NOW)
    assert isinstance(year_9999, Rejection)
    assert year_9999.field == "timestamp"
    assert "--max-future" in year_9999.reason
    later = validator.check("R1", payload(timestamp=(NOW + timedelta(minutes=6)).isoformat()), NOW)
    assert isinstance(later, Rejection)
    soon = validator.check("R1", payload(timestamp=(NOW + timedelta(minutes=4)).isoformat()), NOW)
    assert isinstance(soon, StatusRecord)
    past = validator.check("R1", payload(timestamp="2001-01-01T00:00:00Z"), NOW)
    assert isinstance(past, StatusRecord)


LARGE_EXTRA = [1.5e-100] * 20_000  # about 200 KB: past the size at which a second, naming parse is used


@pytest.mark.parametrize(
    ("tail", "rule"),
    [
        (b',"extra":1}', "repeats a key"),
        (b',"more":1e-999}', "1e-999 rounds to 0"),
        (b',"more":9223372036854775808}', "9223372036854775808"),
        (b',"more":[18446744073709551616]}', "18446744073709551616"),
    ],
    ids=["duplicate", "underflow", "past_int64", "past_uint64"],
)
def test_large_status_is_checked_exactly_too(validator: StatusValidator, tail: bytes, rule: str) -> None:
    """Test that past 64 KiB a repeated key or an unstorable number is still refused (naming `payload`)."""
    raw = payload(location={"latitude": 1.0, "longitude": 2.0, "height": 0.0}, extra=LARGE_EXTRA)[:-1] + tail
    assert len(raw) > 64 * 1024
    verdict = validator.check("R1", raw, NOW)
    assert isinstance(verdict, Rejection)
    assert verdict.field == "payload"
    assert rule in verdict.reason


def test_large_status_with_number_like_strings_is_accepted_at_about_parse_cost(validator: StatusValidator) -> None:
    """Test that a large status full of numbers and strings the quick checks cannot clear is accepted, and that the
    exact checks cost a small multiple of parsing it (not a second parse in Python)."""
    strings = ['12345678901234567890 ": 1e-999, "k": 0'] * 5_000
    location = {"latitude": 1.0, "longitude": 2.0, "height": 0.0}
    raw = payload(location=location, extra=[1.5e-100] * 60_000, ids=strings, n=9223372036854775807)
    assert len(raw) > 700_000
    assert isinstance(validator.check("R1", raw, NOW), StatusRecord)
    parse = min(timeit.repeat(lambda: orjson.loads(raw), number=1, repeat=3))
    check = min(timeit.repeat(lambda: validator.check("R1", raw, NOW), number=1, repeat=3))
    # Measured about 15x on a loaded machine; parsing it again in Python with hooks was about 100x.
    assert check < 50 * parse + 0.03, (check, parse)
