"""Downsampled history for charts: one robot's battery level per time bucket, aggregated by the database."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from spotbox.api.errors import json_response
from spotbox.errors import BadRequestError, NotFoundError
from spotbox.keys import STORAGE
from spotbox.status import to_micros
from spotbox.storage.base import AGGREGATES, Aggregate, Bucket, DownsampleQuery

# At most 9 digits: more are past MAX_INTERVAL in any unit (and int() refuses 4,300 digits with an error of its own).
INTERVAL_RE = re.compile(r"(\d{1,9})([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Ten years: far beyond any chart, and far from overflowing microseconds.
MAX_INTERVAL = timedelta(days=3650)
MAX_BUCKETS = 5000
# Parameters of a page of rows that mean nothing for buckets; refused rather than silently ignored.
_ROW_PARAMS = ("cursor", "limit", "include_payload")


def interval_param(request: web.Request) -> tuple[str, timedelta]:
    """`interval` as given (`1m`) and as a duration: a positive number of s, m, h or d."""
    raw = request.query.get("interval")
    if raw is None:
        raise BadRequestError("agg needs an interval", {"agg": request.query.get("agg")})
    match = INTERVAL_RE.fullmatch(raw)
    if match is None or int(match[1]) == 0 or int(match[1]) * _UNIT_S[match[2]] > MAX_INTERVAL.total_seconds():
        raise BadRequestError(
            "interval must be a whole number of s, m, h or d, from 1s to 3650d (e.g. 1m)", {"interval": raw}
        )
    return raw, timedelta(seconds=int(match[1]) * _UNIT_S[match[2]])


def agg_param(request: web.Request) -> Aggregate:
    """`agg`: avg (the default), min, max, last or count."""
    raw = request.query.get("agg", "avg")
    for agg in AGGREGATES:
        if raw == agg:
            return agg
    raise BadRequestError(f"agg must be one of {', '.join(AGGREGATES)}", {"agg": raw})


def bucket_count(start: datetime, end: datetime, interval: timedelta) -> int:
    """How many epoch-aligned buckets of `interval` the range [start, end] touches."""
    step = interval // timedelta(microseconds=1)
    return to_micros(end) // step - to_micros(start) // step + 1


def bucket_item(bucket: Bucket, agg: Aggregate) -> dict[str, Any]:
    """One bucket as the API shows it: battery level unless agg is count, location only for last."""
    item: dict[str, Any] = {"bucket": bucket.start, "count": bucket.count}
    if agg != "count":
        item["battery_level"] = bucket.battery_level
    if agg == "last" and bucket.location is not None:
        latitude, longitude, height = bucket.location
        item["location"] = {"latitude": latitude, "longitude": longitude, "height": height}
    return item


async def downsampled_history(
    request: web.Request, serial: str, start: datetime | None, end: datetime | None
) -> web.Response:
    """GET /robots/{serial}/history?interval=...&agg=...: non-empty buckets, oldest first."""
    for name in _ROW_PARAMS:
        if name in request.query:
            raise BadRequestError(f"{name} does not apply to a downsampled history", {name: request.query[name]})
    label, interval = interval_param(request)
    agg = agg_param(request)
    storage = request.app[STORAGE]
    span = await storage.time_range(serial)
    if span is None:
        raise NotFoundError("unknown robot", {"serial_number": serial})
    # An open end of the range stops at the robot's first or last row, so the bucket count is known.
    low, high = start or span[0], end or span[1]
    items: list[dict[str, Any]] = []
    if low <= high:
        count = bucket_count(low, high, interval)
        if count > MAX_BUCKETS:
            raise BadRequestError(
                f"too many buckets: at most {MAX_BUCKETS}; widen the interval or narrow the time range",
                {"buckets": count, "interval": label},
            )
        buckets = await storage.downsample(DownsampleQuery(serial, interval, agg, low, high))
        items = [bucket_item(bucket, agg) for bucket in buckets]
    return json_response({"serial_number": serial, "interval": label, "agg": agg, "items": items})
