"""One spotbox per SQLite file: an exclusive flock on a sidecar file that records the holder's pid.

Two spotboxes on one file would each stream only their own statuses; the kernel drops the lock when its holder
exits, even by kill -9, so a stale lock never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from spotbox.errors import StorageError


class DatabaseLock:
    """The lock of one SQLite database file, held from `acquire` to `release`."""

    def __init__(self, database: Path) -> None:
        self.database = database
        self.path = database.with_name(database.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and record this process's pid; StorageError names the holder when it is taken."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot create the lock file {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StorageError(
                f"SQLite database {self.database} is in use by another spotbox (pid {holder}); stop it, "
                "or give this one another database"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Let the lock go (the file stays: removing it could race a process that just opened it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
