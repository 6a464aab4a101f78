"""The fleet: every robot seen with its latest status, and one robot's latest status."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from spotbox.api.errors import json_response
from spotbox.api.params import serial_param
from spotbox.errors import NotFoundError
from spotbox.keys import STORAGE
from spotbox.status import StatusRow


def robot_summary(latest: StatusRow, last_seen: dict[str, datetime]) -> dict[str, Any]:
    """A robot as /robots shows it: its serial, when it last sent a status, and its latest status by ts.

    `last_seen` is a receive time, never a robot's own timestamp: a robot sending old statuses after an outage
    was still seen now.
    """
    serial = latest.serial_number
    return {"serial_number": serial, "last_seen": last_seen.get(serial, latest.received_at), "latest": latest.to_api()}


async def list_robots(request: web.Request) -> web.Response:
    """GET /robots: every robot seen, by serial number, each with its latest status by ts."""
    storage = request.app[STORAGE]
    rows = await storage.latest_per_robot()
    last_seen = await storage.last_received()
    return json_response({"items": [robot_summary(row, last_seen) for row in rows]})


async def get_robot(request: web.Request) -> web.Response:
    """GET /robots/{serial}: one robot's latest status by ts; 404 for a robot never seen."""
    serial = serial_param(request)
    storage = request.app[STORAGE]
    latest = await storage.latest(serial)
    if latest is None:
        raise NotFoundError("unknown robot", {"serial_number": serial})
    return json_response(robot_summary(latest, await storage.last_received(serial)))


def add_routes(app: web.Application) -> None:
    """Register the fleet routes."""
    app.router.add_get("/robots", list_robots)
    app.router.add_get("/robots/{serial}", get_robot)
