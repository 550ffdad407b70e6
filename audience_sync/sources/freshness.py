"""When a snapshot was taken: a ``snapshot_at`` column if the source has one, else the file's mtime.

The safeguards refuse a snapshot older than ``max_snapshot_age``; this module only tells its time.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from audience_sync.errors import SnapshotError

__all__ = ["SNAPSHOT_AT_COLUMN", "snapshot_time"]

SNAPSHOT_AT_COLUMN = "snapshot_at"


def snapshot_time(frame: pd.DataFrame, source: str, path: Path | None) -> datetime | None:
    """The newest ``snapshot_at`` value (UTC), else ``path``'s mtime, else ``None`` (unknown)."""
    if SNAPSHOT_AT_COLUMN in frame.columns:
        values = frame[SNAPSHOT_AT_COLUMN].dropna()
        stamps = pd.to_datetime(values.astype(str), utc=True, errors="coerce", format="mixed")
        bad = values[stamps.isna()]
        if len(bad):
            row = int(frame.index.get_indexer(bad.index[:1])[0]) + 1  # rows count from 1
            raise SnapshotError(
                f"{source}: row {row}: column `{SNAPSHOT_AT_COLUMN}` has a value that is not a "
                f"timestamp: {str(bad.iloc[0])!r} (use ISO 8601, e.g. 2026-11-25T06:00:00Z)"
            )
        if len(stamps):
            newest: datetime = stamps.max().to_pydatetime()
            return newest
    if path is not None:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)
    return None
