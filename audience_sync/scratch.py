"""One in-memory DuckDB per process for scratch queries over Arrow buffers.

The diff, the repeated-id check and delivery each run a few queries per audience. Opening a
database costs about 35 ms of CPU where a cursor on an open one costs nothing measurable, so
a run of 8 audiences spent half a second opening databases. A cursor is DuckDB's own
connection to the same database: its registered tables are its own and it is used by one
thread, so callers on different threads do not see each other.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import duckdb

__all__ = ["scratch"]

_lock = threading.Lock()
_database: tuple[int, duckdb.DuckDBPyConnection] | None = None


@contextmanager
def scratch() -> Iterator[duckdb.DuckDBPyConnection]:
    """A fresh cursor on the process's scratch database, closed on exit (its registered
    tables with it). Set nothing on it: settings may be the database's, shared by all."""
    global _database
    with _lock:
        # A forked child must not use its parent's database (its threads did not survive).
        if _database is None or _database[0] != os.getpid():
            import duckdb  # imported when used: a run with nothing to diff never loads it

            database = duckdb.connect(":memory:")
            # DuckDB's allocator (jemalloc) keeps the pages a query freed: after diffing 2.5M
            # ids, 200 MB stayed in use until the database closed. Its background threads hand
            # them back to the system within seconds, so memory between runs (`serve`) falls
            # back; a setting of the process's allocator, not of this database.
            database.execute("SET allocator_background_threads = true")
            _database = (os.getpid(), database)
        cursor = _database[1].cursor()
    try:
        yield cursor
    finally:
        cursor.close()
