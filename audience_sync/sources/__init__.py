"""Sources: load one audience's membership snapshot (a CSV/Parquet file or a SQL query)."""

from __future__ import annotations

import dataclasses

import pandas as pd

from audience_sync.config import AudienceConfig, ComputedTraitConfig
from audience_sync.model import Snapshot
from audience_sync.sources.files import file_header, read_file
from audience_sync.sources.freshness import snapshot_time
from audience_sync.sources.sql import query_header, read_query
from audience_sync.sources.validate import require_user_id, require_value_column, validate

__all__ = [
    "RawSnapshot",
    "SnapshotHeader",
    "load_snapshot",
    "read_snapshot",
    "snapshot_header",
    "validate",
]


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotHeader:
    """What ``check`` reads of a snapshot: its columns and row count, not its rows."""

    source: str
    columns: tuple[str, ...]
    rows: int


@dataclasses.dataclass(frozen=True, slots=True)
class RawSnapshot:
    """An audience's snapshot as read, before validation: its rows, every column as text."""

    audience: AudienceConfig
    frame: pd.DataFrame
    source: str
    """The file's path, or ``query for 'Name'``: how messages name the snapshot."""

    def validate(self, *, repeats: bool = True) -> Snapshot:
        """The validated snapshot; raises ``SnapshotError`` when unusable.

        ``repeats=False`` leaves repeated ids unchecked (``validate``): for a caller that
        checks them more cheaply (``diff.plan(..., unique=False)``) and validates again, in
        full, when one repeats.
        """
        trait = self.audience if isinstance(self.audience, ComputedTraitConfig) else None
        snapshot = validate(
            self.frame,
            self.source,
            value_column=trait.value_column if trait is not None else None,
            value_type=trait.type if trait is not None else "auto",
            repeats=repeats,
        )
        taken_at = snapshot_time(self.frame, self.source, self.audience.source)
        return dataclasses.replace(snapshot, taken_at=taken_at)


def read_snapshot(audience: AudienceConfig) -> RawSnapshot:
    """Read ``audience``'s snapshot; raises ``SnapshotError`` when it cannot be read."""
    # A computed trait's value column keeps its type (Parquet, SQL): equality is by value.
    typed = audience.value_column if isinstance(audience, ComputedTraitConfig) else None
    if audience.source is not None:
        frame = read_file(audience.source, multiline=audience.allow_multiline_values, keep=typed)
        return RawSnapshot(audience, frame, str(audience.source))
    assert audience.query is not None and audience.source_url is not None
    frame = read_query(audience.source_url, audience.query, keep=typed)
    return RawSnapshot(audience, frame, f"query for {audience.name!r}")


def load_snapshot(audience: AudienceConfig) -> Snapshot:
    """Read and validate ``audience``'s snapshot; raises ``SnapshotError`` when unusable.

    Validated in full: its members are unique (repeated ids collapse or are held).
    """
    return read_snapshot(audience).validate()


def snapshot_header(audience: AudienceConfig) -> SnapshotHeader:
    """``audience``'s snapshot columns and row count; ``SnapshotError`` when it cannot be used
    (missing, unreadable, no ``user_id`` column)."""
    if audience.source is not None:
        columns, rows = file_header(audience.source)
        source = str(audience.source)
    else:
        assert audience.query is not None and audience.source_url is not None
        columns, rows = query_header(audience.source_url, audience.query)
        source = f"query for {audience.name!r}"
    stripped = [str(c).strip() for c in columns]
    require_user_id(stripped, source)
    if isinstance(audience, ComputedTraitConfig):
        require_value_column(stripped, source, audience.value_column)
    return SnapshotHeader(source, tuple(stripped), rows)
