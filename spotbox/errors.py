"""The one error root of spotbox; errors are translated to CLI or HTTP answers only at the edges."""

from __future__ import annotations

import errno


class SpotboxError(Exception):
    """Root of every error spotbox raises on purpose."""


class ConfigError(SpotboxError):
    """A setting is invalid; the message names the option and how to fix it."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


class ListenError(SpotboxError):
    """A listener could not bind its address."""

    def __init__(
        self, what: str, host: str, port: int, option: str, cause: OSError, *, host_option: str | None = None
    ) -> None:
        if cause.errno == errno.EADDRINUSE:
            # Another broker on 1883 is the common case: say what to run instead.
            advice = f"another program holds it: start with {option} 0 (any free port) or another {option}"
            reason = "address already in use"
        else:
            advice = f"change {option}" + (f" (or {host_option})" if host_option else "")
            reason = cause.strerror or str(cause)
        super().__init__(f"cannot listen for {what} on {host}:{port} ({reason}); {advice}")
        self.host = host
        self.port = port
        self.option = option


class StorageError(SpotboxError):
    """The database could not be opened, migrated, written or read."""


class StorageUnavailableError(StorageError):
    """The database cannot be reached right now; the operation may succeed later."""


class StorageConflictError(StorageError):
    """A write breaks a constraint of the database (a unique index): the same write will never succeed."""


class BadRequestError(SpotboxError):
    """An HTTP request carries a bad parameter; answered with 400."""

    def __init__(self, message: str, detail: object = None) -> None:
        super().__init__(message)
        self.detail = detail


class NotFoundError(SpotboxError):
    """The requested resource (a robot, a route) does not exist; answered with 404."""

    def __init__(self, message: str, detail: object = None) -> None:
        super().__init__(message)
        self.detail = detail


class InvalidStatusError(SpotboxError):
    """A status sent over HTTP failed validation; answered with 422 and every error."""

    def __init__(self, errors: list[str], field: str) -> None:
        super().__init__("invalid status")
        self.errors = errors
        self.field = field


class PayloadTooLargeError(SpotboxError):
    """A request body is over the size limit; answered with 413 before it is read whole."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"body larger than {max_bytes} bytes")
        self.max_bytes = max_bytes


class UnauthorizedError(SpotboxError):
    """An HTTP request needs a user of the users file and has none, or a wrong password; answered with 401."""


class ForbiddenError(SpotboxError):
    """The authenticated user is not granted what the request does; answered with 403."""

    def __init__(self, message: str, detail: object = None) -> None:
        super().__init__(message)
        self.detail = detail


class RequestTimeoutError(SpotboxError):
    """An HTTP request body did not arrive whole within --http-idle-timeout-s; answered with 408, connection closed."""


class TooManyStreamsError(SpotboxError):
    """Every SSE stream `--max-streams` allows is open; answered with 503 until one ends."""

    def __init__(self, max_streams: int) -> None:
        super().__init__(f"too many open feeds: at most {max_streams} (--max-streams); retry later")
        self.max_streams = max_streams
