"""The diff: compare a snapshot's members with the last synced state, as a pure function.

No I/O, no clock: ids in, a ``Plan`` out. ``entered`` get ``true``, ``exited`` get ``false``;
a full resync also re-sends ``true`` to every unchanged member (``resend``). A computed trait
is diffed the same way with its values: a user whose value changed is ``entered`` again (with
the new value) and one whose value disappeared is ``exited`` (a clear). The diff is one
full outer join in an in-memory DuckDB over the ids' Arrow buffers (zero copy): measured 5x
faster than pyarrow's ``is_in`` and 40x faster than ``pandas.Index.isin`` on millions of ids.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from audience_sync.arrowtext import arrow_text
from audience_sync.repeats import has_repeated
from audience_sync.scratch import scratch

__all__ = ["Plan", "RepeatedIds", "plan"]

_EMPTY = pd.Index([], dtype="string[pyarrow]")
_Values = TypeVar("_Values", pd.Index, pd.Series)


def _no_rows() -> pd.DataFrame:
    return pd.DataFrame(index=_EMPTY.rename("user_id"))


@dataclass(frozen=True, slots=True)
class Plan:
    """What one audience's run must send."""

    entered: pd.Index
    exited: pd.Index
    resend: pd.Index
    unchanged: int
    sent: pd.DataFrame = field(default_factory=_no_rows, compare=False, repr=False)
    """The snapshot rows of the users the plan sends ``true`` (``entered``, then ``resend``),
    indexed by user id: their identity columns and a computed trait's ``value``. Whichever way
    the plan was made (in memory or pushed down into the database), the rest of the run needs
    no other snapshot row, so memory follows the changes, not the audience."""
    exits_held: int = 0
    """Users who left the snapshot but stay members this run (``planning.hold_exits``)."""
    changed: int = 0
    """A computed trait's users among ``entered`` who had another value (the rest are new)."""
    previous: pd.Series | None = field(default=None, compare=False, repr=False)
    """A computed trait's values before the run (canonical JSON) of the users it replaces or
    clears, indexed by user id: the change log's old values."""

    @property
    def sends(self) -> int:
        """How many changes the plan sends (``true`` plus ``false``)."""
        return len(self.entered) + len(self.resend) + len(self.exited)


class RepeatedIds(Exception):
    """``plan(..., unique=False)`` found an id that ``members`` holds twice."""


def plan(
    members: pd.Index | pd.DataFrame,
    synced: pd.Index,
    *,
    full: bool = False,
    held: Collection[str] = (),
    values: tuple[pa.Array, pa.Array] | None = None,
    unique: bool = True,
) -> Plan:
    """Diff ``members`` (this snapshot) against ``synced`` (the state's members).

    Both are unique user ids; ``members`` may be the snapshot's rows indexed by them, which the
    plan's ``sent`` then takes its rows from (given ids, ``sent`` has no columns). ``held``
    users (rejected snapshot rows) are neither entered nor exited: whatever the state says
    about them stands. With ``full``, unchanged members are
    re-sent as ``resend``. Results keep the order of their input. ``values``: a computed
    trait's values of ``members`` and of ``synced`` (canonical JSON text, in their order); a
    member whose value differs from the state's is entered again.

    ``unique=False``: ``members`` has not been checked for repeated ids yet; the plan checks
    them and raises ``RepeatedIds`` if one repeats. Most of the proof is the join's own counts:
    the members the state knows are unique exactly when as many of them matched as state ids
    were matched. So only the entered ids are looked at one by one (the whole snapshot's when
    the state is empty), where validating the snapshot hashed and sorted every id.
    """
    rows = members if isinstance(members, pd.DataFrame) else pd.DataFrame(index=members)
    members = rows.index
    if len(synced) == 0:  # an initial sync: everyone enters, nothing to join
        if not unique and has_repeated(members):
            raise RepeatedIds
        return Plan(entered=members, exited=synced, resend=_EMPTY, unchanged=0, sent=rows)
    entered_at, exited_at, replaced_at = _anti_joins(members, synced, values)
    entered = _take(members, entered_at)
    if not unique:
        # A member in the state matches its one row there; two rows of one id both match it.
        # Members entered with another value (``replaced``) matched too.
        matched = len(members) - len(entered_at) + len(replaced_at)
        if matched != len(synced) - len(exited_at) or has_repeated(entered):
            raise RepeatedIds
    exited = _take(synced, exited_at)
    if len(held) and len(exited):
        keep = ~exited.isin(list(held))
        exited, exited_at = exited[keep], exited_at[keep]
    changed = len(replaced_at)
    previous = None
    if values is not None:
        before = np.concatenate([replaced_at, exited_at])
        previous = pd.Series(
            pd.array(values[1].take(pa.array(before)), dtype="string[pyarrow]"),
            index=_take(synced, before),
        )
    # State members who stay with the same value, held users included.
    unchanged = len(synced) - len(exited) - changed
    resend, sent = _sent(rows, entered_at, full=full)
    return Plan(entered, exited, resend, unchanged, sent, changed=changed, previous=previous)


def _sent(
    rows: pd.DataFrame, entered_at: np.ndarray, *, full: bool
) -> tuple[pd.Index, pd.DataFrame]:
    """A plan's ``resend`` (with ``full``, the members who do not enter) and ``sent`` (the rows
    of the entered, then of the re-sent), from the snapshot's ``rows`` and the entered's
    positions in them."""
    if full and not len(entered_at):
        # Every member is re-sent, in the snapshot's order: its ids and rows are the plan's as
        # they are. Taken, they were copies of the whole snapshot beside it (at 2.5M members the
        # highest point of a --full's memory).
        return rows.index, rows
    members = rows.index
    sent_rows = entered_at
    resend: pd.Index = _EMPTY
    if full:
        keep = np.ones(len(members), dtype=bool)
        keep[entered_at] = False
        resend_at = np.flatnonzero(keep)
        resend = _take(members, resend_at)
        sent_rows = np.concatenate([entered_at, resend_at])
    if not rows.columns.is_unique:  # two columns of one name: pandas' own take keeps both
        return resend, rows.iloc[sent_rows]
    columns = {name: _take(rows[name], sent_rows).array for name in rows.columns}
    return resend, pd.DataFrame(columns, index=_take(members, sent_rows))


def _take(values: _Values, positions: np.ndarray) -> _Values:
    """``values.take(positions)``, without joining the chunks of Arrow-backed values first.

    pandas hands a chunked Arrow array to ``pyarrow.compute.take``, which concatenates every
    chunk to take a few rows: a snapshot read in 4 chunks paid 4.5 ms per take of 5,000 of
    500,000 ids, 20x the take itself, and growing with the audience. Here each chunk gives its
    own rows (``positions`` in any order: they are taken chunk by chunk, then put back).
    """
    array = values.array
    if not isinstance(array, pd.arrays.ArrowExtensionArray):
        return values.take(positions)
    chunked = pa.chunked_array(array.__arrow_array__())
    if chunked.num_chunks <= 1:
        return values.take(positions)
    starts = np.cumsum([0] + [len(chunk) for chunk in chunked.chunks])
    chunk_of = np.searchsorted(starts, positions, side="right") - 1
    order = np.argsort(chunk_of, kind="stable")
    by_chunk = positions[order]
    bounds = np.searchsorted(chunk_of[order], np.arange(chunked.num_chunks + 1))
    taken = pa.concat_arrays(
        [
            chunk.take(pa.array(by_chunk[bounds[k] : bounds[k + 1]] - starts[k]))
            for k, chunk in enumerate(chunked.chunks)
        ]
    )
    if not (np.diff(order) > 0).all():  # back to the order of ``positions``
        taken = taken.take(pa.array(np.argsort(order)))
    result = type(array)(taken)
    if isinstance(values, pd.Index):
        return pd.Index(result, name=values.name)
    return pd.Series(result, name=values.name)


def _anti_joins(
    members: pd.Index, synced: pd.Index, values: tuple[pa.Array, pa.Array] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of ``members`` not in ``synced`` (or, with ``values``, whose value differs),
    of ``synced`` not in ``members``, and of ``synced`` whose value a member replaces."""
    # Positions instead of ids keep the input order (a parallel join returns rows in any order)
    # and let pandas slice its own arrays without converting strings back. One full outer join
    # builds one hash table where two anti-joins build two: 0.26 s instead of 0.42 s for 2.5M.
    differs = " OR m.v <> s.v" if values is not None else ""
    with scratch() as con:
        con.register("m", _positions_table(members, None if values is None else values[0]))
        con.register("s", _positions_table(synced, None if values is None else values[1]))
        unmatched = con.sql(
            "SELECT m.i AS entered, s.i AS exited, "
            "CASE WHEN m.i IS NOT NULL THEN s.i END AS replaced FROM m FULL JOIN s USING (u) "
            f"WHERE m.i IS NULL OR s.i IS NULL{differs}"
        ).to_arrow_table()
    entered = unmatched.column("entered").drop_null().to_numpy()
    exited = pc.if_else(unmatched.column("entered").is_null(), unmatched.column("exited"), None)
    found = (entered, exited.drop_null().to_numpy(), unmatched.column("replaced").drop_null())
    return tuple(  # type: ignore[return-value]
        np.sort(np.asarray(side)).astype(np.int64, copy=False) for side in found
    )


def _positions_table(ids: pd.Index, values: pa.Array | None = None) -> pa.Table:
    columns = {"u": arrow_text(ids), "i": pa.array(np.arange(len(ids), dtype=np.int64))}
    if values is not None:
        columns["v"] = values
    return pa.table(columns)
