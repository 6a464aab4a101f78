"""Storage of status rows behind one small async interface, picked by the database URL scheme."""

from __future__ import annotations

from spotbox.settings import DatabaseURL
from spotbox.storage.base import HistoryQuery, Storage


def open_storage(database: DatabaseURL) -> Storage:
    """A not yet opened Storage for `database` (SQLite or PostgreSQL)."""
    if database.scheme == "sqlite":
        from spotbox.storage.sqlite import SQLiteStorage  # noqa: PLC0415 - only load the backend in use

        assert database.sqlite_path is not None
        return SQLiteStorage(database.sqlite_path)
    from spotbox.storage.postgres import PostgresStorage  # noqa: PLC0415

    return PostgresStorage(database.url)


__all__ = ["HistoryQuery", "Storage", "open_storage"]
