"""The one JSON error shape of every HTTP answer: {"error": "...", "detail": ...}."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from spotbox.errors import (
    BadRequestError,
    ForbiddenError,
    InvalidStatusError,
    NotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
    StorageUnavailableError,
    TooManyStreamsError,
    UnauthorizedError,
)
from spotbox.status import dumps

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The challenge of a 401 (RFC 7617): the client is asked for HTTP Basic credentials of a spotbox user.
BASIC_CHALLENGE = 'Basic realm="spotbox"'

# Seconds a client is asked to wait while storage is away: about the writer's longest retry backoff.
RETRY_AFTER_S = 5


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer, encoded the way every spotbox answer is."""
    return web.Response(status=status, body=dumps(body), content_type="application/json", headers=headers)


def error_response(status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON error answer."""
    return json_response({"error": error, "detail": detail}, status, headers)


ClientError = (
    BadRequestError | NotFoundError | PayloadTooLargeError | InvalidStatusError | UnauthorizedError | ForbiddenError
)


def client_error_response(exc: ClientError) -> web.Response:
    """The 4xx answer to an error in the request, with the data its error carries as detail."""
    headers = None
    match exc:
        case BadRequestError():
            status, detail = 400, exc.detail
        case UnauthorizedError():
            status, detail, headers = 401, None, {"WWW-Authenticate": BASIC_CHALLENGE}
        case ForbiddenError():
            status, detail = 403, exc.detail
        case NotFoundError():
            status, detail = 404, exc.detail
        case PayloadTooLargeError():
            status, detail = 413, {"max_bytes": exc.max_bytes}
        case InvalidStatusError():
            status, detail = 422, {"errors": exc.errors, "field": exc.field}
    return error_response(status, str(exc), detail, headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:  # noqa: PLR0911 - one per kind
    """Translate spotbox and aiohttp errors into the one JSON error shape, at the HTTP edge only."""
    try:
        return await handler(request)
    except (
        BadRequestError,
        NotFoundError,
        PayloadTooLargeError,
        InvalidStatusError,
        UnauthorizedError,
        ForbiddenError,
    ) as exc:
        return client_error_response(exc)
    except RequestTimeoutError as exc:
        logger.warning("%s %s from %s: %s", request.method, request.path, request.remote, exc)
        response = error_response(408, str(exc), None)
        response.force_close()  # Connection: close (aiohttp drops what still comes for its lingering time)
        return response
    except ConnectionResetError as exc:
        # The client left while its request was read or answered: one line, no traceback (a flood of them is a
        # flood of lines otherwise). Nobody reads the answer.
        logger.info("%s %s from %s: the client went away (%s)", request.method, request.path, request.remote, exc)
        return error_response(400, "the client went away", None)
    except TooManyStreamsError as exc:
        detail = {"max_streams": exc.max_streams}
        return error_response(503, str(exc), detail, {"Retry-After": str(RETRY_AFTER_S)})
    except StorageUnavailableError as exc:
        logger.warning("%s %s: storage unavailable: %s", request.method, request.path, exc)
        return error_response(503, "storage unavailable, retry later", None, {"Retry-After": str(RETRY_AFTER_S)})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason, None)
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal error", None)
