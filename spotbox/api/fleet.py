"""The fleet: every robot seen with its latest status, and one robot's latest status."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from spotbox.api.errors import json_response
from spotbox.api.params import serial_param
from spotbox.errors import NotFoundError
from spotbox.keys import STORAGE
from spotbox.status import StatusRow


def robot_summary(latest: StatusRow) -> dict[str, Any]:
    """A robot as /robots shows it: its serial, when its latest status arrived, and that status."""
    return {"serial_number": latest.serial_number, "last_seen": latest.received_at, "latest": latest.to_api()}


async def list_robots(request: web.Request) -> web.Response:
    """GET /robots: every robot seen, by serial number, each with its latest status by ts."""
    rows = await request.app[STORAGE].latest_per_robot()
    return json_response({"items": [robot_summary(row) for row in rows]})


async def get_robot(request: web.Request) -> web.Response:
    """GET /robots/{serial}: one robot's latest status by ts; 404 for a robot never seen."""
    serial = serial_param(request)
    latest = await request.app[STORAGE].latest(serial)
    if latest is None:
        raise NotFoundError("unknown robot", {"serial_number": serial})
    return json_response(robot_summary(latest))


def add_routes(app: web.Application) -> None:
    """Register the fleet routes."""
    app.router.add_get("/robots", list_robots)
    app.router.add_get("/robots/{serial}", get_robot)
