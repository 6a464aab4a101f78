"""Logging setup for the CLI: plain text, or one JSON object per line."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

# Attributes every LogRecord has; anything else was passed with `extra=` and belongs in the JSON line.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


# What a terminal or a log reader would act on instead of showing: C0 controls (newline, escape), DEL, C1 controls
# (0x9b starts an escape sequence on some terminals) and Unicode's line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# The same, newline excepted: a traceback keeps its lines.
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_controls(text: str) -> str:
    """`text` with every control character written as an escape (`\\n`, `\\x1b`): one line, no terminal codes."""
    return _CONTROL.sub(_escape_one, text) if _CONTROL.search(text) else text


class TextFormatter(logging.Formatter):
    """One line per record whatever its arguments hold: a client id, topic or user name sent by anyone is escaped.

    Control characters in the message (after %-formatting) become escapes, so a newline cannot forge a record
    and terminal codes reach no terminal. An exception's traceback keeps its lines, each indented and escaped
    likewise, so none of them can pass for a record either.
    """

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """The record as one escaped line, then its indented traceback, if any."""
        record.message = escape_controls(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        extra: list[str] = []
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            extra.append(record.exc_text)
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        for block in extra:
            escaped = _CONTROL_BUT_NEWLINE.sub(_escape_one, block)
            line += "\n" + "\n".join(f"  {part}" for part in escaped.split("\n"))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the `extra` fields, and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        """Encode one record."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in record.__dict__.items() if key not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, option=orjson.OPT_UTC_Z, default=str).decode()


class BadRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (a line over 8 KB, too many headers) as an ERROR with a traceback of
    its parser, about ten lines each: an attacker's way to flood the log. This makes it one WARNING line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = "bad HTTP request: %d %s", (exc.code, exc.message)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


def configure_logging(level: str, fmt: str) -> None:
    """Configure the root logger once, for the CLI."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("aiohttp.server").addFilter(BadRequestFilter())
