"""Alerts: a page of them (newest first), one with its transitions, and acknowledging one."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime

from aiohttp import web

from spotbox.api.errors import json_response
from spotbox.api.login import operator
from spotbox.api.params import int_param, time_param
from spotbox.errors import BadRequestError, NotFoundError
from spotbox.keys import OPS, STORAGE
from spotbox.ops.alerts import ALERT_STATES, Alert
from spotbox.ops.store import AlertQuery, acknowledge_once, get_alert, query_alerts
from spotbox.status import from_micros, is_valid_serial, to_micros

ALERTS_LIMIT_DEFAULT = 100
ALERTS_LIMIT_MAX = 1000
_STATES = (*ALERT_STATES, "open")


def _is_alert_id(text: str) -> bool:
    """Whether `text` can be an alert id (a UUID spotbox made): anything else names no alert, and PostgreSQL
    refuses some text (NUL) outright."""
    return len(text) <= 64 and text.isascii() and text.isprintable()


def _cursor(raw: str | None) -> tuple[datetime, str] | None:
    if not raw:
        return None
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        micros, alert_id = text.split(":", 1)
        if not _is_alert_id(alert_id):
            raise ValueError(alert_id)  # noqa: TRY301 - the one refusal below
        return from_micros(int(micros)), alert_id
    except (ValueError, binascii.Error, UnicodeDecodeError, OverflowError, OSError):
        raise BadRequestError("cursor is not one this server issued", {"cursor": raw}) from None


async def list_alerts(request: web.Request) -> web.Response:
    """GET /alerts: alerts newest first, by `state` (pending, active, cleared, or open), `serial` and `since`;
    `limit` and `cursor` page them as history is paged."""
    state = request.query.get("state") or None
    if state is not None and state not in _STATES:
        raise BadRequestError(f"state must be one of {', '.join(_STATES)}", {"state": state})
    serial = request.query.get("serial") or None
    if serial is not None and not is_valid_serial(serial):
        raise BadRequestError("serial is not a robot serial number", {"serial": serial})
    limit = int_param(request, "limit", ALERTS_LIMIT_DEFAULT, 1, ALERTS_LIMIT_MAX)
    before = _cursor(request.query.get("cursor"))
    ops = request.app[OPS]
    await ops.writer.flushed()
    query = AlertQuery(state, serial, time_param(request, "since"), before, limit + 1)
    alerts = await query_alerts(request.app[STORAGE], query)
    page = alerts[:limit]
    next_cursor = None
    if len(alerts) > limit:
        last = page[-1]
        next_cursor = base64.urlsafe_b64encode(f"{to_micros(last.created_at)}:{last.id}".encode()).decode().rstrip("=")
    # The alert engine's open alerts are the live state; the table may lag behind its writer under load.
    live = ops.alerts.open
    items = [_newest(alert, live.get(alert.id)).to_api() for alert in page]
    return json_response({"items": items, "next_cursor": next_cursor})


def _newest(stored: Alert, live: Alert | None) -> Alert:
    return live if live is not None and live.updated_at >= stored.updated_at else stored


async def _find(request: web.Request) -> Alert:
    alert_id = request.match_info["id"]
    if not _is_alert_id(alert_id):
        raise NotFoundError("no such alert", {"id": alert_id})
    ops = request.app[OPS]
    alert = ops.alerts.open.get(alert_id)
    if alert is None:
        await ops.writer.flushed()
        alert = await get_alert(request.app[STORAGE], alert_id)
    if alert is None:
        raise NotFoundError("no such alert", {"id": alert_id})
    return alert


async def show_alert(request: web.Request) -> web.Response:
    """GET /alerts/{id}: one alert with every transition it went through."""
    alert = await _find(request)
    return json_response(alert.to_api())


async def acknowledge_alert(request: web.Request) -> web.Response:
    """POST /alerts/{id}/ack: acknowledge the alert (a login with --users); acknowledging twice changes nothing."""
    user = await operator(request)
    alert = await _find(request)
    ops = request.app[OPS]
    storage = request.app[STORAGE]
    if not alert.acknowledged:
        # The database decides: of two acknowledgements at once (on two instances sharing it), one is made.
        await ops.writer.flushed()
        now = ops.clock()
        if await acknowledge_once(storage, alert.id, user, now):
            ops.alerts.acknowledge(alert, user, now)
        else:
            alert = await get_alert(storage, alert.id) or alert
    return json_response(alert.to_api())


def add_routes(app: web.Application) -> None:
    """Register the alert routes."""
    app.router.add_get("/alerts", list_alerts)
    app.router.add_get("/alerts/{id}", show_alert)
    app.router.add_post("/alerts/{id}/ack", acknowledge_alert)
