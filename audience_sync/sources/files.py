"""Read a snapshot file (CSV or Parquet) into a frame of text columns.

Every column is read as text so ``007`` stays ``007``; validation happens in ``validate.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from audience_sync.errors import SnapshotError

__all__ = ["read_file"]


def read_file(path: Path) -> pd.DataFrame:
    """The rows of ``path`` as a frame; a ``SnapshotError`` says what is wrong with the file."""
    if not path.exists():
        raise SnapshotError(
            f"{path}: snapshot file not found; check the audience's `source` and that the "
            "export that writes it ran"
        )
    if path.stat().st_size == 0:
        raise SnapshotError(
            f"{path}: snapshot file is empty (0 bytes, not even a header row); an audience with "
            "no members is a header line `user_id` and no rows"
        )
    try:
        if path.suffix.lower() == ".parquet":
            return _read_parquet(path)
        return pd.read_csv(
            path,
            dtype="string[pyarrow]",
            engine="pyarrow",
            keep_default_na=False,
            na_values=[""],
        )
    except SnapshotError:
        raise
    except (OSError, ValueError, pa.ArrowException) as exc:
        # pandas' ParserError and EmptyDataError are ValueErrors; the message names the line.
        raise SnapshotError(f"{path}: cannot read snapshot: {exc}") from None


def _read_parquet(path: Path) -> pd.DataFrame:
    table = pq.read_table(path)
    columns = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        if _is_text_or_int(column.type):
            columns[name] = column.cast(pa.large_string())
        elif name == "user_id":
            raise SnapshotError(
                f"{path}: column `user_id` has type {column.type}; store user ids as text "
                "(or integers) so they are not rounded or reformatted"
            )
        else:
            columns[name] = column.cast(pa.large_string(), safe=False)
    frame: pd.DataFrame = pa.table(columns).to_pandas(types_mapper=_as_string_dtype)
    return frame


def _is_text_or_int(arrow_type: pa.DataType) -> bool:
    t = pa.types
    return bool(
        t.is_string(arrow_type) or t.is_large_string(arrow_type) or t.is_integer(arrow_type)
    )


def _as_string_dtype(arrow_type: pa.DataType) -> Any:
    if pa.types.is_large_string(arrow_type):
        return pd.StringDtype("pyarrow")
    return None
