"""The diff: compare a snapshot's members with the last synced state, as a pure function.

No I/O, no clock: ids in, a ``Plan`` out. ``entered`` get ``true``, ``exited`` get ``false``;
a full resync also re-sends ``true`` to every unchanged member (``resend``). The diff is one
full outer join in an in-memory DuckDB over the ids' Arrow buffers (zero copy): measured 5x
faster than pyarrow's ``is_in`` and 40x faster than ``pandas.Index.isin`` on millions of ids.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from audience_sync.arrowtext import arrow_text
from audience_sync.repeats import has_repeated

__all__ = ["Plan", "members_repeat", "plan"]

_EMPTY = pd.Index([], dtype="string[pyarrow]")


@dataclass(frozen=True, slots=True)
class Plan:
    """What one audience's run must send."""

    entered: pd.Index
    exited: pd.Index
    resend: pd.Index
    unchanged: int
    sent_rows: np.ndarray | None = field(default=None, compare=False, repr=False)
    """Positions in the diffed ``members`` of ``entered``, then ``resend`` (None when the plan
    was not made from an in-memory index, e.g. pushed down into the database)."""
    exits_held: int = 0
    """Users who left the snapshot but stay members this run (``planning.hold_exits``)."""

    @property
    def sends(self) -> int:
        """How many changes the plan sends (``true`` plus ``false``)."""
        return len(self.entered) + len(self.resend) + len(self.exited)


def plan(
    members: pd.Index,
    synced: pd.Index,
    *,
    full: bool = False,
    held: Collection[str] = (),
) -> Plan:
    """Diff ``members`` (this snapshot) against ``synced`` (the state's members).

    Both are unique user ids. ``held`` users (rejected snapshot rows) are neither entered nor
    exited: whatever the state says about them stands. With ``full``, unchanged members are
    re-sent as ``resend``. Results keep the order of their input.
    """
    if len(synced) == 0:  # an initial sync: everyone enters, nothing to join
        everyone = np.arange(len(members))
        return Plan(entered=members, exited=synced, resend=_EMPTY, unchanged=0, sent_rows=everyone)
    entered_at, exited_at = _anti_joins(members, synced)
    entered = members.take(entered_at)
    exited = synced.take(exited_at)
    if len(held) and len(exited):
        exited = exited[~exited.isin(list(held))]
    unchanged = len(synced) - len(exited)  # state members who stay, held users included
    sent_rows = entered_at
    if full:
        keep = np.ones(len(members), dtype=bool)
        keep[entered_at] = False
        resend_at = np.flatnonzero(keep)
        resend = members.take(resend_at)
        sent_rows = np.concatenate([entered_at, resend_at])
    else:
        resend = _EMPTY
    return Plan(entered, exited, resend, unchanged, sent_rows)


def members_repeat(members: pd.Index, synced: pd.Index, the_plan: Plan) -> bool:
    """Whether ``members`` repeats an id, from a plan made as if it did not (no ``held``).

    Saves hashing millions of ids a second time just for this check. Every member row that is
    not entered matched exactly one state row (state ids are unique), so those matches count
    distinct ids only when no matched id repeats; entered ids are checked directly.
    """
    if len(members) - len(the_plan.entered) != len(synced) - len(the_plan.exited):
        return True
    return has_repeated(the_plan.entered)


def _anti_joins(members: pd.Index, synced: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``members`` not in ``synced``, and of ``synced`` not in ``members``."""
    # Positions instead of ids keep the input order (a parallel join returns rows in any order)
    # and let pandas slice its own arrays without converting strings back. One full outer join
    # builds one hash table where two anti-joins build two: 0.26 s instead of 0.42 s for 2.5M.
    with duckdb.connect(":memory:") as con:
        con.register("m", _positions_table(members))
        con.register("s", _positions_table(synced))
        unmatched = con.sql(
            "SELECT m.i AS entered, s.i AS exited FROM m FULL JOIN s USING (u) "
            "WHERE m.i IS NULL OR s.i IS NULL"
        ).to_arrow_table()
    entered, exited = (
        np.sort(unmatched.column(side).drop_null().to_numpy()) for side in ("entered", "exited")
    )
    return entered.astype(np.int64, copy=False), exited.astype(np.int64, copy=False)


def _positions_table(ids: pd.Index) -> pa.Table:
    return pa.table({"u": arrow_text(ids), "i": pa.array(np.arange(len(ids), dtype=np.int64))})
