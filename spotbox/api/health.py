"""Liveness and readiness, for a container's HEALTHCHECK and a load balancer or orchestrator."""

from __future__ import annotations

import asyncio

from aiohttp import web

from spotbox.api.errors import error_response
from spotbox.errors import StorageError
from spotbox.keys import BROKER, CLUSTER, PIPELINE, STORAGE
from spotbox.status import dumps

# A database slower than this to answer `SELECT 1` is not ready to take statuses.
READY_TIMEOUT_S = 2.0


async def health(_: web.Request) -> web.Response:
    """GET /health: the process answers (it says nothing about the database)."""
    return web.Response(body=dumps({"status": "ok"}), content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    """GET /ready: 200 when storage answers and takes writes and MQTT listens (or the cluster is reached); else 503."""
    checks = {"storage": await _storage_check(request.app)}
    if CLUSTER in request.app:  # cluster mode: the MQTT cluster instead of an embedded broker
        checks["cluster"] = request.app[CLUSTER].check()
    else:
        checks["broker"] = _broker_check(request.app)
    if any(state != "ok" for state in checks.values()):
        return error_response(503, "not ready", checks)
    return web.Response(body=dumps({"status": "ready", "checks": checks}), content_type="application/json")


async def _storage_check(app: web.Application) -> str:
    # The writer's view counts too: a database that answers a ping but refuses writes is not ready.
    if not app[PIPELINE].storage_available:
        return "unavailable: writes are failing and being retried"
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await app[STORAGE].ping()
    except TimeoutError:
        return f"unavailable: no answer within {READY_TIMEOUT_S:.0f} s"
    except StorageError as exc:
        return f"unavailable: {exc}"
    return "ok"


def _broker_check(app: web.Application) -> str:
    broker = app.get(BROKER)
    return "ok" if broker is not None and broker.listening else "not listening"


def add_routes(app: web.Application) -> None:
    """Register /health and /ready."""
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
