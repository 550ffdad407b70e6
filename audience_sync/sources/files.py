"""Read a snapshot file (CSV or Parquet) into a frame of text columns.

Every column is read as text so ``007`` stays ``007``; validation happens in ``validate.py``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from audience_sync.errors import SnapshotError
from audience_sync.model import IDENTITY_TRAITS

__all__ = ["file_header", "read_file"]


def read_file(path: Path) -> pd.DataFrame:
    """The rows of ``path`` as a frame; a ``SnapshotError`` says what is wrong with the file."""
    _require_content(path)
    try:
        if path.suffix.lower() == ".parquet":
            return _read_parquet(path)
        return _read_csv(path)
    except SnapshotError:
        raise
    except (OSError, ValueError, csv.Error, pa.ArrowException) as exc:
        # pandas' ParserError and EmptyDataError are ValueErrors; the message names the line.
        raise SnapshotError(f"{path}: cannot read snapshot: {exc}") from None


def file_header(path: Path) -> tuple[list[str], int]:
    """The column names and the number of data rows of ``path``, without loading the rows
    (Parquet: from the footer; CSV: one pass of the csv module, no frame)."""
    _require_content(path)
    try:
        if path.suffix.lower() == ".parquet":
            parquet = pq.ParquetFile(path)
            return list(parquet.schema_arrow.names), int(parquet.metadata.num_rows)
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = (row for row in csv.reader(f) if row)
            header = next(rows, [])
            return header, sum(1 for _ in rows)
    except (OSError, ValueError, csv.Error, pa.ArrowException) as exc:
        raise SnapshotError(f"{path}: cannot read snapshot: {exc}") from None


def _require_content(path: Path) -> None:
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


def _read_csv(path: Path) -> pd.DataFrame:
    header, has_rows = _csv_header(path)
    if not has_rows:
        # pyarrow cannot parse a lone header line without a final newline; no rows to read anyway.
        return pd.DataFrame([], columns=pd.Index(header), dtype="string[pyarrow]")
    frame = pd.read_csv(
        path,
        dtype="string[pyarrow]",
        engine="pyarrow",
        keep_default_na=False,
        na_values=[""],
    )
    if len(frame.columns) == len(header):
        # pandas renames a repeated column `email` to `email.1`; restore the names so that
        # validation reports the duplicate instead of silently using the first one.
        frame.columns = pd.Index(header)
    return frame


def _csv_header(path: Path) -> tuple[list[str], bool]:
    """The header row's column names, and whether any non-blank row follows it."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = (row for row in csv.reader(f) if row)
        header = next(rows, [])
        return header, next(rows, None) is not None


def _read_parquet(path: Path) -> pd.DataFrame:
    table = pq.read_table(path)
    used = {"user_id", *IDENTITY_TRAITS}
    columns = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        if name.strip() not in used:
            # Only the column's name matters (for messages): a column of any type (lists,
            # structs) must not make the snapshot unreadable.
            columns[name] = pa.nulls(len(column), pa.large_string())
            continue
        if pa.types.is_dictionary(column.type):  # pandas categoricals
            column = column.cast(column.type.value_type)
        if _is_text_or_int(column.type):
            columns[name] = column.cast(pa.large_string())
        elif name.strip() == "user_id":
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
