"""Turn raw snapshot rows into a validated ``Snapshot``: one row per member, ids as text.

Nothing is dropped silently: rows with no ``user_id`` or one holding a control character, and
users whose rows disagree, are counted and reported with their row numbers. Users with
conflicting rows are *held*: neither entered nor exited this run, so a bad export cannot flip
their membership.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from audience_sync.arrowtext import arrow_text, text_buffers
from audience_sync.errors import SnapshotError
from audience_sync.model import IDENTITY_TRAITS, MAX_REJECTED_ROWS, RejectedRow, Snapshot
from audience_sync.repeats import has_repeated

__all__ = [
    "CONTROL_REASON",
    "MAX_REPORTED_ROWS",
    "has_control",
    "printable",
    "require_user_id",
    "require_value_column",
    "validate",
]

#: How many rejected rows are kept with their details (all are counted).
MAX_REPORTED_ROWS = MAX_REJECTED_ROWS
#: Control characters (Unicode category Cc): C0, DEL and C1.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_RE2 = r"[\x{00}-\x{1f}\x{7f}-\x{9f}]"  # the same, for Arrow's RE2
CONTROL_REASON = (
    "user_id contains a control character (shown as \\xNN); fix the export so ids are "
    "printable text"
)


def require_user_id(columns: list[str], source: str) -> None:
    """Raise the ``SnapshotError`` for a snapshot whose (stripped) columns lack ``user_id``."""
    if "user_id" not in columns:
        found = ", ".join(map(repr, columns)) or "none"
        raise SnapshotError(
            f"{source}: no `user_id` column (columns found: {found}); every snapshot needs one "
            "row per member with its user_id"
        )


def require_value_column(columns: list[str], source: str, column: str) -> None:
    """Raise the ``SnapshotError`` for a computed trait's snapshot without its value column."""
    if column not in columns:
        found = ", ".join(map(repr, columns))
        raise SnapshotError(
            f"{source}: no `{column}` column for the computed trait's values (columns found: "
            f'{found}); name the value column with `column = "..."` in its [[computed_traits]]'
        )


def validate(
    frame: pd.DataFrame,
    source: str,
    *,
    value_column: str | None = None,
    value_type: str = "auto",
    repeats: bool = True,
) -> Snapshot:
    """Validate ``frame`` (text columns) read from ``source`` into a ``Snapshot``.

    ``value_column``: a computed trait's snapshot; its values (of any column type) become the
    members' canonical ``value`` (``sources/values.py``), users without one are not members,
    and a row whose value cannot be used is rejected and its user held.

    ``repeats=False`` does not look for repeated ids: the snapshot is what validation makes of
    rows whose ids are all distinct, and the caller must prove them so (``diff.plan``'s
    ``unique=False`` does) or validate again with ``repeats=True``.
    """
    frame = frame.rename(columns=lambda c: str(c).strip())
    require_user_id(list(frame.columns), source)
    if frame.columns.duplicated().any():
        dupes = sorted(set(frame.columns[frame.columns.duplicated()]))
        raise SnapshotError(f"{source}: duplicate column names {dupes}")
    traits = [c for c in IDENTITY_TRAITS if c in frame.columns]
    rows = len(frame)
    data = pd.DataFrame({c: _clean(frame[c]) for c in ("user_id", *traits)})
    data.index = pd.RangeIndex(1, rows + 1, name="row")  # 1-based data row numbers
    problems: dict[int, str] | None = None
    if value_column is not None:
        data["value"], problems = _values(frame, data.index, source, value_column, value_type)

    rejected: list[RejectedRow] = []
    missing = data["user_id"].isna()
    rejected_count = int(missing.sum())
    for row in data.index[missing][:MAX_REPORTED_ROWS]:
        rejected.append(RejectedRow(int(row), None, "empty user_id"))
    data = data[~missing]
    # `u1\x00` is not `u1`, yet it would look the same in Crisp: refuse such ids.
    control = has_control(data["user_id"])
    if control.any():
        rejected_count += int(control.sum())
        for row, user_id in data["user_id"][control][:MAX_REPORTED_ROWS].items():
            rejected.append(RejectedRow(int(str(row)), printable(str(user_id)), CONTROL_REASON))
        data = data[~control]

    held: frozenset[str] = frozenset()
    if problems:
        # A user whose value cannot be used is held: neither sent a new value nor cleared.
        bad = data.index.isin(list(problems))
        if bad.any():
            rejected_count += int(bad.sum())
            for row, user_id in data["user_id"][bad][:MAX_REPORTED_ROWS].items():
                reason = problems[int(str(row))]
                rejected.append(RejectedRow(int(str(row)), str(user_id), reason))
            held = frozenset(data["user_id"][bad].tolist())
            data = data[~data["user_id"].isin(held)]

    # Identical duplicates collapse; users whose duplicate rows disagree are held and every one
    # of their rows is reported (also a row identical to another of the held user's rows).
    # Row-wise duplicate checks cost seconds on millions of rows: only pay when an id repeats
    # (one hash of the ids, 0.07 s for 1M, tells).
    repeats = repeats and has_repeated(data["user_id"])
    if repeats:
        distinct_ids = data.drop_duplicates()["user_id"]
        conflicting = frozenset(distinct_ids[distinct_ids.duplicated()].tolist())
    else:
        conflicting = frozenset()
    if conflicting:
        held |= conflicting
    if conflicting:
        repeated = data["user_id"].isin(conflicting)
        conflicts = data[repeated]
        rejected_count += len(conflicts)
        for row, user_id in conflicts["user_id"][:MAX_REPORTED_ROWS].items():
            rejected.append(
                RejectedRow(
                    int(str(row)),
                    str(user_id),
                    "conflicting duplicate: the same user_id appears with different "
                    f"{', '.join([*traits, *([value_column] if value_column else [])])}; fix "
                    "the export so each user has one row",
                )
            )
        data = data[~repeated]
    if repeats:
        data = data.drop_duplicates()

    if value_column is not None:
        data = data[data["value"].notna()]  # no value: not a member of the trait
    members = data.set_index("user_id")
    members.index = members.index.astype("string[pyarrow]")
    return Snapshot(
        source=source,
        members=members,
        rows=rows,
        rejected=tuple(sorted(rejected, key=lambda r: r.row)[:MAX_REPORTED_ROWS]),
        held=held,
        rejected_count=rejected_count,
    )


def _values(
    frame: pd.DataFrame, rows: pd.Index, source: str, column: str, value_type: str
) -> tuple[pd.Series, dict[int, str]]:
    """A computed trait's canonical values by row, and why each unusable one is, by row."""
    from audience_sync.sources.values import canonical_values

    if column not in frame.columns:
        found = ", ".join(map(repr, frame.columns))
        raise SnapshotError(
            f"{source}: no `{column}` column for the computed trait's values (columns found: "
            f'{found}); name the value column with `column = "..."` in its [[computed_traits]]'
        )
    raw = frame[column]
    values, problems = canonical_values(
        pa.array(raw.array), value_type=value_type, source=source, name=column
    )
    value = pd.Series(pd.array(values, dtype="string[pyarrow]"), index=rows)
    at = np.flatnonzero(problems.is_valid().to_numpy(zero_copy_only=False))
    shown = raw.iloc[at].tolist()
    reasons = problems.take(pa.array(at)).to_pylist()
    return value, {
        int(rows[i]): f"{column} {printable(str(v))!r} {why}; fix the export (or set `type`)"
        for i, v, why in zip(at.tolist(), shown, reasons, strict=True)
    }


def has_control(ids: pd.Series) -> np.ndarray:
    """Which of ``ids`` (text, no nulls) hold a control character, as a boolean mask.

    Looks for the bytes a control character starts with (below 0x20, 0x7f, or 0xc2 for C1)
    in the Arrow buffers first; only when one is there are the values matched one by one.
    """
    array = arrow_text(ids)
    chunks = array.chunks if isinstance(array, pa.ChunkedArray) else [array]
    suspect = False
    for chunk in chunks:
        offsets, data = text_buffers(chunk)
        # Only the chunk's own bytes: sliced chunks share one buffer (Parquet reads: dozens).
        data = data[offsets[0] : offsets[-1]] if len(offsets) else data[:0]
        if len(data) and bool((data < 0x20).any() or (data == 0x7F).any() or (data == 0xC2).any()):
            suspect = True
            break
    if not suspect:
        return np.zeros(len(ids), dtype=bool)
    found = pc.match_substring_regex(array, _CONTROL_RE2)
    mask: np.ndarray = found.fill_null(False).to_numpy(zero_copy_only=False)
    return mask


def printable(user_id: str) -> str:
    """``user_id`` with its control characters written as ``\\xNN`` (for messages and storage)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", user_id)


def _clean(column: pd.Series) -> pd.Series:
    """Text with surrounding blanks removed; blank becomes missing."""
    text = column.astype("string[pyarrow]")
    if _may_have_blank_ends(arrow_text(text)):
        text = text.str.strip()
    return text.mask(text == "")


def _may_have_blank_ends(column: pa.ChunkedArray | pa.Array) -> bool:
    """Whether any value might start or end with whitespace (False: stripping changes nothing).

    Reads each value's first and last byte off the Arrow buffers: several times cheaper than
    stripping millions of ids. A byte outside printable ASCII (0x21-0x7e) counts as maybe
    blank, which covers every character ``str.strip`` removes. An empty or null value reads a
    neighbour's byte instead (at worst a needless strip, never a missed one).
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for chunk in chunks:
        offsets, data = text_buffers(chunk)
        if len(chunk) == 0 or len(data) == 0:
            continue
        first = data[np.minimum(offsets[:-1], len(data) - 1)]
        last = data[offsets[1:] - 1]
        for edge in (first, last):
            # uint8 arithmetic wraps: printable ASCII lands on 0-0x5d, anything else above.
            if ((edge - np.uint8(0x21)) >= 0x5E).any():
                return True
    return False
