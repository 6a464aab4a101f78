"""The SQLite library of this process, configured once: without its memory statistics.

SQLite keeps a count of the memory it holds unless told otherwise, and every allocation takes one process-wide
mutex to update it. spotbox's SQLite threads (two readers and the writer) each have their own connection, and a
history page allocates for each row it formats: with that mutex, two reader threads took 2.3 times the CPU a page
took one thread alone, most of it contending for the lock in the kernel (`perf`), and two threads together served
pages hardly faster than one. Without it, each page costs what it costs alone. Python's `sqlite3` has no call for
this setting, so it is made through ctypes, on the library `_sqlite3` itself uses.

The setting can only be changed while the library holds nothing: `sqlite3_config` refuses it once SQLite is
initialized (importing `sqlite3` does that), and shutting SQLite down under an open connection is undefined. So
it is applied only when SQLite counts zero bytes held once a probe connection is closed again, i.e. no connection
of this process is open. Where the library cannot be reached (a build without the symbols exported) or something
is open, nothing changes and SQLite works as before, a little slower with several threads.
"""

from __future__ import annotations

import _sqlite3
import ctypes
import functools
import logging
import sqlite3

logger = logging.getLogger(__name__)

SQLITE_OK = 0
SQLITE_CONFIG_MEMSTATUS = 9


def _library() -> ctypes.CDLL | None:
    """The SQLite functions `_sqlite3` is linked with (dlsym on a module's handle searches what it loaded)."""
    try:
        library = ctypes.CDLL(_sqlite3.__file__)
        library.sqlite3_memory_used.restype = ctypes.c_int64
        # The fixed argument declared: on some ABIs (Apple arm64) a variadic one is passed elsewhere.
        library.sqlite3_config.argtypes = [ctypes.c_int]
        for name in ("sqlite3_shutdown", "sqlite3_config", "sqlite3_initialize"):
            getattr(library, name)
    except (OSError, AttributeError) as exc:
        logger.debug("SQLite library not reachable through ctypes (%s): memory statistics left on", exc)
        return None
    return library


def memory_held(library: ctypes.CDLL) -> int:
    """Bytes SQLite counts as held now (always 0 while its memory statistics are off)."""
    return int(library.sqlite3_memory_used())


def statistics_on(library: ctypes.CDLL) -> bool:
    """True when SQLite counts the memory of a connection it opens (its memory statistics, and their mutex, on)."""
    probe = sqlite3.connect(":memory:")
    try:
        return memory_held(library) > 0
    finally:
        probe.close()


@functools.cache
def without_memory_statistics() -> bool:
    """Turn SQLite's memory statistics off for this process, once, if nothing of SQLite is open; True if they are
    off now. Call from one thread before opening a connection."""
    library = _library()
    if library is None:
        return False
    if not statistics_on(library):
        return True
    if memory_held(library) != 0:
        logger.debug("SQLite connections are open in this process: its memory statistics are left on")
        return False
    library.sqlite3_shutdown()
    configured = library.sqlite3_config(SQLITE_CONFIG_MEMSTATUS, ctypes.c_int(0))
    initialized = library.sqlite3_initialize()
    if initialized != SQLITE_OK:
        raise sqlite3.OperationalError(f"SQLite did not initialize again (code {initialized})")
    if configured != SQLITE_OK or statistics_on(library):
        logger.debug("SQLite did not turn its memory statistics off (code %d)", configured)
        return False
    return True
