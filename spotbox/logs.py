"""Logging setup for the CLI: plain text, or one JSON object per line."""

from __future__ import annotations

import atexit
import logging
import queue
import re
import sys
import threading
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


# Lines waiting for the log thread. Past this many (stderr not taken: a stalled terminal or log driver), new ones
# are dropped and counted, rather than held without bound or waited for.
LOG_QUEUE_MAX = 10_000
# Most lines the log thread writes with one call.
LOG_WRITE_LINES = 512


class _Handoff(logging.Handler):
    """Formats each record where it is logged and hands the line to the log thread, which writes it.

    A write to stderr blocks whenever its reader is slow (a pipe holds 64 KiB): on the event loop, that stopped
    MQTT and HTTP alike until someone read the log. Formatting stays here: a thread formatting records holds the
    GIL for up to 5 ms each time the event loop lets go of it for a system call, which slowed the loop more than
    the formatting itself (in one probe of 10,000 robots coming online, a latency peak of 700 ms against 240
    with the formatting on the loop).
    """

    def __init__(self, lines: queue.Queue[str | None]) -> None:
        super().__init__()
        self.lines = lines
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        try:
            if self.dropped:
                self.lines.put_nowait(self.format(_dropped(self.dropped)))
                self.dropped = 0
            self.lines.put_nowait(line)
        except queue.Full:
            self.dropped += 1


def _dropped(count: int) -> logging.LogRecord:
    return logging.LogRecord(
        "spotbox.logs", logging.WARNING, __file__, 0, "%d log records dropped: stderr was not read", (count,), None
    )


class _LogThread:
    """Writes the handed-off lines to a stream, as many as are waiting in one write."""

    def __init__(self, lines: queue.Queue[str | None], stream: Any) -> None:
        self.lines = lines
        self.stream = stream
        self.thread = threading.Thread(target=self._run, name="spotbox-log", daemon=True)

    def _run(self) -> None:
        while True:
            batch = [self.lines.get()]
            while batch[-1] is not None and len(batch) < LOG_WRITE_LINES:
                try:
                    batch.append(self.lines.get_nowait())
                except queue.Empty:
                    break
            done = batch[-1] is None
            text = "".join(f"{line}\n" for line in batch if line is not None)
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # stderr closed: nothing more can be said
                return
            if done:
                return

    def stop(self) -> None:
        """Write what is waiting, then end (at exit); a stderr that takes nothing holds the exit 5 s at most."""
        try:
            self.lines.put(None, timeout=5)
        except queue.Full:
            return
        self.thread.join(timeout=5)


def configure_logging(level: str, fmt: str) -> None:
    """Configure the root logger once, for the CLI: each record formatted where it is logged, written to stderr
    by a thread of its own (which writes what it holds at exit)."""
    lines: queue.Queue[str | None] = queue.Queue(LOG_QUEUE_MAX)
    handler = _Handoff(lines)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("aiohttp.server").addFilter(BadRequestFilter())
    writer = _LogThread(lines, sys.stderr)
    writer.thread.start()
    atexit.register(writer.stop)
