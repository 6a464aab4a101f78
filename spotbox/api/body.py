"""Request bodies: read within --http-idle-timeout-s, and what goes wrong while reading them a client error.

aiohttp's idle timeout covers a request's headers, not its body: a client that sent its headers and a few bytes of
a declared 100 KB body held its connection (and a handler) for ever. A body is now read within the same timeout
(408 with Connection: close). A body aiohttp cannot decode (a Content-Encoding it is not in, a broken
chunked encoding) or a form it cannot parse (no multipart boundary, an unknown charset, bytes that are not the
charset) is a 400, not an error of spotbox's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from spotbox.errors import BadRequestError, PayloadTooLargeError, RequestTimeoutError
from spotbox.keys import SETTINGS


@contextlib.asynccontextmanager
async def reading(request: web.Request) -> AsyncIterator[None]:
    """Around the reading (and parsing) of `request`'s body, and nothing else."""
    settings = request.app[SETTINGS]
    timeout_s = settings.http_idle_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError:
        raise RequestTimeoutError(f"the request body did not arrive within {timeout_s:g} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLargeError(settings.max_payload) from None
    except (RequestPayloadError, ValueError, LookupError) as exc:
        # ValueError: a multipart body without its boundary, bytes that are not the charset (UnicodeDecodeError);
        # LookupError: an unknown charset.
        raise BadRequestError(f"the request body could not be read: {exc}", None) from None


async def read_body(request: web.Request) -> bytes:
    """The whole body (at most --max-payload, which client_max_size also enforces while it streams in)."""
    max_bytes = request.app[SETTINGS].max_payload
    # A declared length over the limit is refused before a byte of the body is read.
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLargeError(max_bytes)
    async with reading(request):
        return await request.read()
