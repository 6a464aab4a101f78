"""Query and path parameters, checked and turned into values, or a 400 naming the parameter."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime

from aiohttp import web

from spotbox.errors import BadRequestError
from spotbox.status import SERIAL_PATTERN, from_micros, is_valid_serial, parse_utc, to_micros

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def serial_param(request: web.Request) -> str:
    """The `{serial}` path part, which must look like a robot serial number."""
    serial = request.match_info["serial"]
    if not is_valid_serial(serial):
        raise BadRequestError("invalid serial number", {"serial": serial, "pattern": SERIAL_PATTERN})
    return serial


def time_param(request: web.Request, name: str) -> datetime | None:
    """An ISO 8601 date-time; one without an offset is taken as UTC."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isprintable()):
        raise BadRequestError(f"{name} is not an ISO 8601 date-time", {name: raw})
    try:
        return parse_utc(raw.strip())
    except ValueError:
        raise BadRequestError(f"{name} is not an ISO 8601 date-time", {name: raw}) from None
    except OverflowError:
        # 0001-01-01T00:00:00+01:00 and 9999-12-31T23:59:59-01:00 are outside what a UTC datetime holds.
        raise BadRequestError(f"{name} is outside the years 1 to 9999 in UTC", {name: raw}) from None


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """An integer within [low, high]."""
    raw = request.query.get(name)
    if raw is None:
        return default
    # ASCII digits only: int() also takes " 1", "1_0" and other scripts' digits. Length first: int() refuses strings
    # over 4300 digits with an error of its own.
    digits = raw.removeprefix("-")
    if not (digits.isascii() and digits.isdecimal() and len(digits) <= 19):
        raise BadRequestError(f"{name} must be an integer from {low} to {high}", {name: raw})
    value = int(raw)
    if not low <= value <= high:
        raise BadRequestError(f"{name} must be an integer from {low} to {high}", {name: raw})
    return value


def bool_param(request: web.Request, name: str) -> bool:
    """`true`/`false` (also 1/0, yes/no); absent is false."""
    raw = request.query.get(name)
    if raw is None:
        return False
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise BadRequestError(f"{name} must be true or false", {name: raw})


def encode_cursor(ts: datetime, row_id: int) -> str:
    """An opaque cursor for the row after (ts, id)."""
    return base64.urlsafe_b64encode(f"{to_micros(ts)}:{row_id}".encode()).decode().rstrip("=")


def cursor_param(request: web.Request) -> tuple[datetime, int] | None:
    """The (ts, id) a `cursor` from a previous page points after."""
    raw = request.query.get("cursor")
    if not raw:
        return None
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        micros, row_id = (int(part) for part in text.split(":"))
        # Row ids are signed 64-bit integers on both backends; a larger one cannot even be bound to a query.
        if not 0 <= row_id <= _ROW_ID_MAX:
            raise ValueError(row_id)  # noqa: TRY301 - the one refusal below
        return from_micros(micros), row_id
    except (ValueError, binascii.Error, UnicodeDecodeError, OverflowError, OSError):
        # OSError: a time far outside the years 1 to 9999 (EOVERFLOW from the C library).
        raise BadRequestError("cursor is not one this server issued", {"cursor": raw}) from None


# Row ids are signed 64-bit integers on both backends.
_ROW_ID_MAX = 2**63 - 1


def last_event_id_param(request: web.Request) -> int | None:
    """The row id a reconnecting SSE client saw last: the `Last-Event-ID` header, else `last_event_id`.

    The query parameter is for EventSource polyfills that cannot set the header; absent or empty is None.
    """
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if not raw:
        return None
    # Length first: int() refuses strings over 4300 digits with an error of its own.
    if not (raw.isascii() and raw.isdecimal()) or len(raw) > 19 or int(raw) > _ROW_ID_MAX:
        raise BadRequestError(
            "Last-Event-ID must be a row id (an integer from 0) sent by this feed", {"last_event_id": raw}
        )
    return int(raw)
