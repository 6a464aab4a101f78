"""The one JSON error shape of every HTTP answer: {"error": "...", "detail": ...}."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from spotbox.errors import BadRequestError, NotFoundError, StorageUnavailableError
from spotbox.status import dumps

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, error: str, detail: Any = None) -> web.Response:
    """A JSON error answer."""
    return web.Response(status=status, body=dumps({"error": error, "detail": detail}), content_type="application/json")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Translate spotbox and aiohttp errors into the one JSON error shape, at the HTTP edge only."""
    try:
        return await handler(request)
    except BadRequestError as exc:
        return error_response(400, str(exc), exc.detail)
    except NotFoundError as exc:
        return error_response(404, str(exc), exc.detail)
    except StorageUnavailableError as exc:
        logger.warning("%s %s: storage unavailable: %s", request.method, request.path, exc)
        return error_response(503, "storage unavailable, retry later", None)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason, None)
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal error", None)
