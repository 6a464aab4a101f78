"""Every rule of the robot-status schema (schemas/robot-status.schema.json), a case on each side of its boundary."""

from __future__ import annotations

from typing import Any

from tests.helpers import status

DRIVE = "5f0c6a53-2f4e-4d8a-9d55-2b4a3c1e7f10"

# (name, status document, the field the rejection must name)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("battery_zero", status(battery_level=0), "battery_level"),
    ("battery_over_max", status(battery_level=101), "battery_level"),
    ("battery_150", status(battery_level=150), "battery_level"),
    ("battery_fraction", status(battery_level=50.5), "battery_level"),
    ("battery_string", status(battery_level="50"), "battery_level"),
    ("battery_bool", status(battery_level=True), "battery_level"),
    ("battery_missing", status(battery_level=...), "battery_level"),
    ("battery_status_unknown", status(battery_status="FULL"), "battery_status"),
    ("battery_status_lowercase", status(battery_status="charging"), "battery_status"),
    ("battery_status_missing", status(battery_status=...), "battery_status"),
    ("driving_status_unknown", status(driving_status="PARKED"), "driving_status"),
    ("driving_status_missing", status(driving_status=...), "driving_status"),
    ("moving_without_drive_id", status(current_drive_id=...), "current_drive_id"),
    ("moving_null_drive_id", status(current_drive_id=None), "current_drive_id"),
    ("moving_drive_id_not_uuid", status(current_drive_id="drive-42"), "current_drive_id"),
    ("moving_drive_id_uuid_without_dashes", status(current_drive_id=DRIVE.replace("-", "")), "current_drive_id"),
    ("idle_with_drive_id", status(driving_status="IDLE", current_drive_id=DRIVE), "current_drive_id"),
    ("location_missing", status(location=...), "location"),
    ("location_not_object", status(location=[52.5, 13.4, 34.0]), "location"),
    ("latitude_missing", status(location={"longitude": 13.4, "height": 34.0}), "location.latitude"),
    (
        "longitude_string",
        status(location={"latitude": 52.5, "longitude": "13.4", "height": 34.0}),
        "location.longitude",
    ),
    ("height_null", status(location={"latitude": 52.5, "longitude": 13.4, "height": None}), "location.height"),
    ("timestamp_words", status(timestamp="yesterday"), "timestamp"),
    ("timestamp_without_offset", status(timestamp="2026-11-22T10:00:00"), "timestamp"),
    ("timestamp_date_only", status(timestamp="2026-11-22"), "timestamp"),
    ("timestamp_number", status(timestamp=1763805600), "timestamp"),
]

# Valid on the near side of each boundary above.
VALID: list[tuple[str, dict[str, Any]]] = [
    ("battery_min", status(battery_level=1)),
    ("battery_max", status(battery_level=100)),
    ("battery_integral_float", status(battery_level=42.0)),
    ("charging", status(battery_status="CHARGING")),
    ("idle_null_drive_id", status(driving_status="IDLE", current_drive_id=None)),
    ("idle_no_drive_id", status(driving_status="IDLE", current_drive_id=...)),
    ("moving_uppercase_uuid", status(current_drive_id=DRIVE.upper())),
    ("integer_location", status(location={"latitude": 52, "longitude": 13, "height": 0})),
    ("no_timestamp", status(timestamp=...)),
    ("timestamp_offset", status(timestamp="2026-11-22T11:00:00.250+01:00")),
    ("extra_fields_kept", status(firmware="1.4.2", sensors={"lidar": "ok"})),
]
