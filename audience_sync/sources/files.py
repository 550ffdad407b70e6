"""Read a snapshot file (CSV or Parquet) into a frame of text columns.

Every column is read as text so ``007`` stays ``007``; validation happens in ``validate.py``.

A CSV must parse to one record per non-blank line: an unbalanced quote otherwise swallows the
lines after it into one value, silently dropping their users. Counting the lines costs one
vectorised pass over the bytes; only when the counts disagree is the file scanned row by row to
name the line at fault.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from audience_sync.errors import SnapshotError
from audience_sync.model import IDENTITY_TRAITS

__all__ = ["file_header", "read_blocks", "read_file", "require_content"]

#: Bytes read at a time when counting lines.
_BLOCK = 1 << 24


def read_file(path: Path, *, multiline: bool = False, keep: str | None = None) -> pd.DataFrame:
    """The rows of ``path`` as a frame; a ``SnapshotError`` says what is wrong with the file.

    ``multiline``: a CSV's quoted values may span lines (else that is an error naming the line).
    ``keep``: a Parquet column read with its own type (a computed trait's values), not as text.
    """
    require_content(path)
    try:
        if path.suffix.lower() == ".parquet":
            return _read_parquet(path, keep)
        return _read_csv(path, multiline)
    except SnapshotError:
        raise
    except (OSError, ValueError, csv.Error, pa.ArrowException) as exc:
        raise SnapshotError(f"{path}: cannot read snapshot: {_first_line(exc)}") from None


def file_header(path: Path) -> tuple[list[str], int]:
    """The column names and the number of data rows of ``path``, without loading the rows
    (Parquet: from the footer; CSV: one pass of the csv module, no frame)."""
    require_content(path)
    try:
        if path.suffix.lower() == ".parquet":
            parquet = pq.ParquetFile(path)
            return list(parquet.schema_arrow.names), int(parquet.metadata.num_rows)
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = (row for row in csv.reader(f) if row)
            header = next(rows, [])
            return header, sum(1 for _ in rows)
    except (OSError, ValueError, csv.Error, pa.ArrowException) as exc:
        raise SnapshotError(f"{path}: cannot read snapshot: {_first_line(exc)}") from None


def require_content(path: Path) -> None:
    """Raise a ``SnapshotError`` when ``path`` is missing or empty."""
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


def _first_line(exc: BaseException) -> str:
    """An error's first line: Arrow appends internal detail (C++ source lines) after it."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _read_csv(path: Path, multiline: bool) -> pd.DataFrame:
    try:
        header, has_rows = _csv_header(path)
    except UnicodeDecodeError:
        _raise_not_utf8(path)
        raise
    if not has_rows:
        # pyarrow cannot parse a lone header line without a final newline; no rows to read anyway.
        return pd.DataFrame([], columns=pd.Index(header), dtype="string[pyarrow]")
    lines, terminated = _count_lines(path)
    if not terminated:
        raise SnapshotError(
            f"{path}: line {lines}: the last line does not end with a line break, so the file "
            "looks cut short (an export still being written, or truncated); end every row, the "
            "last one too, with a newline"
        )
    try:
        table = pa_csv.read_csv(
            path,
            # In a file of one column a blank line is a row with an empty user_id, which
            # validation rejects: skipping it would exit that user unseen.
            parse_options=pa_csv.ParseOptions(
                newlines_in_values=multiline, ignore_empty_lines=len(header) > 1
            ),
            convert_options=pa_csv.ConvertOptions(
                column_types=dict.fromkeys(header, pa.large_string()),
                null_values=[""],
                strings_can_be_null=True,
            ),
        )
    except pa.ArrowInvalid as exc:
        # Arrow names neither the line nor, always, the problem: find both.
        _raise_located(path, len(header), multiline)
        raise SnapshotError(f"{path}: not a valid CSV file: {_first_line(exc)}") from None
    if table.num_rows + 1 != lines and table.num_rows + 1 != lines - _blank_lines(path):
        # Fewer records than lines: a quoted value spans lines (allowed or not), or worse.
        _raise_located(path, len(header), multiline)
    elif _ends_in_a_line_break(table):
        # A quote opened on the last line and never closed swallows only its line break.
        _raise_located(path, len(header), multiline)
    if len(header) == 1:
        table = _without_trailing_blank_lines(path, table)
    columns = {str(i): column for i, column in enumerate(table.columns)}
    frame: pd.DataFrame = pa.table(columns).to_pandas(types_mapper=_as_string_dtype)
    # Arrow keeps a repeated column name as is (pandas would rename it `email.1`), so validation
    # reports the duplicate instead of silently using the first one.
    frame.columns = pd.Index(table.column_names)
    return frame


def _without_trailing_blank_lines(path: Path, table: pa.Table) -> pa.Table:
    """``table`` without the empty rows the blank lines ending the file made (an editor's extra
    newline is not an empty user_id; a blank line between rows still is)."""
    with path.open("rb") as f:
        f.seek(max(path.stat().st_size - 4096, 0))
        tail = f.read()
    ends = tail[len(tail.rstrip(b"\r\n")) :]
    blank = ends.count(b"\n") + ends.count(b"\r") - ends.count(b"\r\n") - 1
    column = table.column(0)
    drop = 0
    while drop < min(blank, table.num_rows) and column[table.num_rows - 1 - drop].as_py() is None:
        drop += 1
    return table.slice(0, table.num_rows - drop)


def _ends_in_a_line_break(table: pa.Table) -> bool:
    """Whether a value of the last row ends with a line break (one row: no per-row cost)."""
    last = table.slice(table.num_rows - 1)
    return any(
        isinstance(value, str) and value.endswith(("\n", "\r"))
        for value in last.to_pylist()[0].values()
    )


def _csv_header(path: Path) -> tuple[list[str], bool]:
    """The header row's column names, and whether any non-blank row follows it."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = (row for row in csv.reader(f) if row)
        header = next(rows, [])
        return header, next(rows, None) is not None


def read_blocks(path: Path) -> Iterator[bytes]:
    """The bytes of ``path``, a block at a time."""
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            yield block


def _count_lines(path: Path) -> tuple[int, bool]:
    """How many lines ``path`` has (LF, CRLF or CR ends), and whether the last one is ended."""
    lf = cr = crlf = 0
    last = b""
    for block in read_blocks(path):
        # NumPy's vectorised compare is about twice as fast as bytes.count for one byte.
        lf += int(np.count_nonzero(np.frombuffer(block, dtype=np.uint8) == 0x0A))
        if block.find(b"\r") >= 0:  # memchr: most files have no carriage return at all
            cr += block.count(b"\r")
            crlf += block.count(b"\r\n")
        if last == b"\r" and block.startswith(b"\n"):
            crlf += 1  # a CRLF split across two blocks
        last = block[-1:]
    terminated = last in (b"\n", b"\r")
    return lf + cr - crlf + (0 if terminated else 1), terminated


def _blank_lines(path: Path) -> int:
    """How many lines of ``path`` are empty (only read when the record count is off)."""
    data = np.fromfile(path, dtype=np.uint8)
    ends = np.flatnonzero((data == 0x0A) | (data == 0x0D))
    if not len(ends):
        return 0
    # A line break that directly follows another one ends an empty line, except the LF of a CRLF.
    follows = np.diff(ends) == 1
    crlf = (data[ends[:-1]] == 0x0D) & (data[ends[1:]] == 0x0A)
    return int(np.count_nonzero(follows & ~crlf)) + int(ends[0] == 0)


def _raise_located(path: Path, columns: int, multiline: bool) -> None:
    """Raise a ``SnapshotError`` naming the first line a strict CSV reading finds at fault.

    Row by row (slow): only called once a fast check has found something wrong.
    """
    _raise_not_utf8(path)
    with path.open(encoding="utf-8-sig", newline="") as text:
        reader = csv.reader(text, strict=True)
        start = 1
        header = False
        try:
            for row in reader:
                if row and header and len(row) != columns:
                    raise SnapshotError(
                        f"{path}: line {start} has {len(row)} values but the header has "
                        f"{columns} columns; check the delimiter (a comma) and quoting of that row"
                    )
                if reader.line_num > start and not multiline:
                    raise SnapshotError(
                        f"{path}: line {start}: a quoted value opened on this line does not "
                        'close on it (an unbalanced `"`?), so it would swallow the lines after '
                        "it; fix the export, or set `allow_multiline_values = true` for the "
                        "audience if its values really span lines"
                    )
                start = reader.line_num + 1
                header = header or bool(row)
        except csv.Error as exc:
            if "end of data" in str(exc):
                raise SnapshotError(
                    f"{path}: line {start}: a quoted value opened on this line never closes "
                    '(an unbalanced `"`); fix the export'
                ) from None
            raise SnapshotError(f"{path}: line {start} is not valid CSV: {exc}") from None


def _raise_not_utf8(path: Path) -> None:
    """Raise a ``SnapshotError`` naming the first line of ``path`` that is not UTF-8."""
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SnapshotError(
                    f"{path}: line {number} is not UTF-8 text (byte {line[exc.start]:#04x} at "
                    f"column {exc.start + 1}); export the file as UTF-8"
                ) from None


def _read_parquet(path: Path, keep: str | None = None) -> pd.DataFrame:
    table = pq.read_table(path)
    used = {"user_id", *IDENTITY_TRAITS}
    columns = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        if name.strip() == keep and keep not in used:
            columns[name] = column  # validation types it (sources/values.py)
            continue
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
            try:
                columns[name] = column.cast(pa.large_string(), safe=False)
            except pa.ArrowException:  # e.g. a list or struct: Arrow's message is about casts
                raise SnapshotError(
                    f"{path}: column `{name.strip()}` has type {column.type}, which is not text; "
                    "store identity traits as text"
                ) from None
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
    # A kept typed column stays Arrow: NumPy would turn an integer column with nulls into floats.
    return pd.ArrowDtype(arrow_type)
