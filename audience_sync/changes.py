"""The run's changes, between the diff and the destination.

All audiences of a run are planned first; this stage turns their plans into one table of
changes, one row per (user, audience), sorted by user so that each user's changes across
audiences are adjacent (a destination sends them as one update). It settles what the retry
queue says about them (a re-sent change keeps its first ``messageId``; a permanent failure is
held until the user's data changes) and hands the changes out in ``ChangeBatch``es, with each
user's identity and each change's Segment ``messageId``.

Everything per change is vectorised (Arrow, NumPy, DuckDB's ``sha1``): a run with 1% churn on
20M memberships has 400,000 changes, and a Python loop over them costs seconds.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from audience_sync.arrowtext import large_text
from audience_sync.diff import Plan
from audience_sync.messageids import message_ids
from audience_sync.model import (
    BATCH_SCHEMA,
    IDENTITY_TRAITS,
    ChangeBatch,
    DeliveryStatus,
    Identity,
    input_hash,
)
from audience_sync.scratch import scratch

if TYPE_CHECKING:
    import duckdb

__all__ = ["SPILL_CHANGES", "AudienceChanges", "ChangeSpool", "RunChanges"]

#: Changes a run keeps in memory; past this many, its changes are spilled to a DuckDB file in
#: a temporary directory and streamed from there sorted by user, so a run's memory stays
#: bounded whatever its size (an initial sync or a ``--full`` of 20M memberships). Both ways
#: give the same batches; below it a run skips the file.
SPILL_CHANGES = 250_000
#: DuckDB's memory for sorting spilled changes (it sorts out of core past it).
SPILL_MEMORY = "256MB"
#: DuckDB's memory while audiences are still being added (and planned, beside it). DuckDB keeps
#: a table's blocks cached up to its limit, written or not: at 256MB the file's cache grew by
#: ~25 MB per audience of 2.5M changes and stood under the next audience's planning (175 MB
#: more after 8 of them); at 64MB it stays flat, and inserting is no slower.
SPILL_ADD_MEMORY = "64MB"
#: Rows read from the spilled, sorted changes at a time.
SPILL_READ_ROWS = 65_536


@dataclass(frozen=True, slots=True)
class AudienceChanges:
    """One audience's part of a run.

    ``identities`` holds the identity traits the snapshot gives (a subset of
    ``IDENTITY_TRAITS``), one row per user the plan sends ``true``: ``plan.entered``, then
    ``plan.resend``, in that order; for a ``computed`` trait also each one's ``value`` (JSON),
    and its exited users are sent ``null``. ``retry`` is the retry queue, indexed by user id.
    Once the audience is in a ``ChangeSpool``, ``plan`` and ``identities`` are not read again.
    """

    key: str
    name: str
    run_id: int
    plan: Plan
    identities: pd.DataFrame
    retry: pd.DataFrame
    computed: bool = False


class ChangeSpool:
    """The run's changes, added audience by audience as each is planned.

    Kept in memory (as Arrow tables) until there are more than ``spill_at``; then in a DuckDB
    file in a temporary directory of its own (under ``directory``, by default the system's:
    ``TMPDIR``), removed by ``close`` (and, should the run not get there, when the spool is
    garbage collected; a killed process leaves only a file nobody reads).
    """

    def __init__(self, *, spill_at: int | None = None, directory: str | None = None) -> None:
        self.spill_at = SPILL_CHANGES if spill_at is None else spill_at
        self.directory = directory
        self.rows = 0
        self.audiences = 0
        self.parts: list[pa.Table] = []
        self.con: duckdb.DuckDBPyConnection | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def spilled(self) -> bool:
        return self.con is not None

    def add(self, audience: AudienceChanges) -> None:
        """Add the next audience's changes (audiences are numbered in the order added)."""
        parts = _audience_rows(self.audiences, audience)
        self.audiences += 1
        self.rows += sum(p.num_rows for p in parts)
        if self.con is None and self.rows > self.spill_at:
            parts, self.parts = self.parts + parts, []
            self.con = self._open()
        if self.con is None:
            self.parts += parts
            return
        for part in parts:
            self.con.register("part", part)
            try:
                self.con.sql("INSERT INTO changes SELECT * FROM part")
            finally:
                self.con.unregister("part")
        del parts
        # Arrow's allocator keeps freed memory for reuse; hand it back, so the next audience's
        # planning starts from the same low mark instead of stacking on this one's.
        pa.default_memory_pool().release_unused()

    def _open(self) -> duckdb.DuckDBPyConnection:
        import duckdb  # imported when used: a run with no change never loads it

        self._dir = tempfile.TemporaryDirectory(prefix="audience-sync-changes-", dir=self.directory)
        folder = Path(self._dir.name)
        con = duckdb.connect(str(folder / "changes.duckdb"))
        con.sql(f"SET memory_limit = '{SPILL_ADD_MEMORY}'")  # SPILL_MEMORY once all are in
        con.sql(f"SET temp_directory = '{folder / 'sort'}'")
        con.sql("SET preserve_insertion_order = false")  # rows are read back sorted
        columns = ", ".join(f'"{f.name}" {_DUCKDB_TYPES[f.type]}' for f in _CHANGES_SCHEMA)
        con.sql(f"CREATE TABLE changes ({columns})")
        return con

    def close(self) -> None:
        """Remove the spilled changes, if any (idempotent)."""
        if self.con is not None:
            self.con.close()
            self.con = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
        self.parts = []


class RunChanges:
    """Every change of one run, sorted by user, handed out in batches of whole users.

    Built once all audiences are planned, from a ``ChangeSpool`` they were added to (without
    one, ``audiences``' plans are read here). A change whose user waits in the retry queue after
    a permanent failure (``retryable`` false) is *held*, not sent, while the user's data is what
    failed, unless ``retry_failed``; ``held`` counts them per audience. ``resent[i]`` holds the
    users of audience ``i`` whose change is a ``--full`` re-send, for the batches handed out and
    not yet recorded: the ledger takes them out as it records them (so it adds no member twice).
    """

    def __init__(
        self,
        destination: str,
        audiences: Sequence[AudienceChanges],
        *,
        retry_failed: bool,
        spool: ChangeSpool | None = None,
    ) -> None:
        if spool is None:
            spool = ChangeSpool()
            for a in audiences:
                spool.add(a)
        self._spool = spool
        self.held = [0] * len(audiences)
        self.resent: list[set[str]] = [set() for _ in audiences]
        self._table: pa.Table | None = None
        self._settled = False  # spilled: whether the ``settled`` table holds anything
        if spool.con is None:
            table = _sorted_changes(spool.parts)
            spool.parts = []  # only the sorted table is kept
            planned_users = len(_user_ends(table.column("user_id")))
            held, kept = self._settle_retries(table, audiences, retry_failed)
            if kept is not None:
                table = table.append_column("retry_message_id", kept)
            if held.any():
                table = table.filter(pa.array(~held))
            self._table = table
            self._user_ends = _user_ends(table.column("user_id"))
            self.changes = table.num_rows
            self.users = len(self._user_ends)
        else:
            planned_users, self.changes, self.users = self._settle_spilled(
                spool.con, audiences, retry_failed
            )
        #: Users none of whose changes are sent (all held).
        self.held_users = planned_users - self.users
        # Per audience: the key of its message ids is prefix + user_id + suffix[value].
        self._prefixes = pa.array([f"{destination}\x1f{a.key}\x1f" for a in audiences], pa.string())
        self._suffixes = pa.array(
            [f"\x1f{value}\x1f{a.run_id}" for a in audiences for value in (False, True)],
            pa.string(),
        )
        self._keys = pa.array([a.key for a in audiences], pa.string())
        self._names = pa.array([a.name for a in audiences], pa.string())

    def _settle_spilled(
        self,
        con: duckdb.DuckDBPyConnection,
        audiences: Sequence[AudienceChanges],
        retry_failed: bool,
    ) -> tuple[int, int, int]:
        """Settle the retry queue against spilled changes: only the queued users' changes are
        read (and their identities shared); what is held or keeps its message id goes into a
        ``settled`` table the batches' query joins. Returns planned users, changes, users."""
        # Every audience is in: the sort and the settling get their memory.
        con.sql(f"SET memory_limit = '{SPILL_MEMORY}'")
        queued = [a.retry.index for a in audiences if not a.retry.empty]
        # A queued user's identity is shared over all their rows before any is held (as in
        # memory): a held row's email still goes out with the user's other changes.
        traits = "".join(f", {t} VARCHAR" for t in IDENTITY_TRAITS)
        con.sql(
            "CREATE OR REPLACE TABLE settled (user_id VARCHAR, audience INTEGER, "
            f"held BOOLEAN, retry_message_id VARCHAR{traits})"
        )
        held_rows = held_users = 0
        if queued:
            con.register("queued", pa.table({"user_id": large_text(*queued)}))
            try:
                picked = con.sql(
                    "SELECT * FROM changes WHERE user_id IN (SELECT user_id FROM queued) "
                    "ORDER BY user_id, audience"
                ).to_arrow_table()
            finally:
                con.unregister("queued")
            picked = _share_identities(picked.cast(_CHANGES_SCHEMA))
            held, kept = self._settle_retries(picked, audiences, retry_failed)
            settled = pa.table(
                {
                    "user_id": picked.column("user_id"),
                    "audience": picked.column("audience"),
                    "held": pa.array(held),
                    "retry_message_id": kept
                    if kept is not None
                    else pa.nulls(picked.num_rows, pa.string()),
                    **{t: picked.column(t) for t in IDENTITY_TRAITS},
                }
            )
            ends = _user_ends(picked.column("user_id"))
            if len(ends):
                all_held = np.logical_and.reduceat(held, np.concatenate([[0], ends[:-1]]))
                held_users = int(all_held.sum())
            held_rows = int(held.sum())
            self._settled = held_rows > 0 or kept is not None
            con.register("settled_rows", settled)
            try:
                con.sql("INSERT INTO settled SELECT * FROM settled_rows")
            finally:
                con.unregister("settled_rows")
        [(total, planned_users)] = con.sql(
            "SELECT count(*), count(DISTINCT user_id) FROM changes"
        ).fetchall()
        return int(planned_users), int(total) - held_rows, int(planned_users) - held_users

    def _settle_retries(
        self, table: pa.Table, audiences: Sequence[AudienceChanges], retry_failed: bool
    ) -> tuple[np.ndarray, pa.Array | None]:
        """Which rows of ``table`` are held, and the ``retry_message_id`` column for re-sent
        changes that keep theirs (None when none does).

        Only the changes of queued users are looked at one by one (the queue holds the users a
        destination refused: usually few, 100,000s after an outage); the rest are only matched
        against the queue, in bulk.
        """
        held = np.zeros(table.num_rows, dtype=bool)
        kept_ids: dict[int, str] = {}
        audience = table.column("audience").to_numpy()
        for i, a in enumerate(audiences):
            if a.retry.empty:
                continue
            queued = pc.is_in(table.column("user_id"), value_set=pa.array(a.retry.index.array))
            rows = np.flatnonzero(queued.to_numpy(zero_copy_only=False) & (audience == i))
            if not len(rows):
                continue
            picked = table.take(pa.array(rows))
            users = picked.column("user_id").to_pylist()
            entries = a.retry.reindex(users)
            columns = zip(
                rows.tolist(),
                picked.column("value").to_pylist(),
                picked.column("data").to_pylist(),
                *(picked.column(t).to_pylist() for t in IDENTITY_TRAITS),
                entries["message_id"].tolist(),
                entries["retryable"].tolist(),
                entries["status"].tolist(),
                entries["input_hash"].tolist(),
                strict=True,
            )
            for r, value, data, *traits, first_id, retryable, status, fingerprint in columns:
                permanent = not retryable and status == DeliveryStatus.FAILED.value
                # Held while the user's data is what failed; retried once it changes.
                if (
                    permanent
                    and not retry_failed
                    and fingerprint == input_hash(value, Identity(*traits), data)
                ):
                    held[r] = True
                    self.held[i] += 1
                else:
                    kept_ids[r] = str(first_id)
        if not kept_ids:
            return held, None
        column: list[str | None] = [None] * table.num_rows
        for r, first_id in kept_ids.items():
            column[r] = first_id
        return held, pa.array(column, pa.string())

    def batches(self, users: int) -> Iterator[ChangeBatch]:
        """The changes in batches of at most ``users`` users each (a user is never split)."""
        if self.users == 0:
            return
        with scratch() as con:
            for rows, count in self._user_slices(users):
                yield self._batch(rows, count, con)

    def _user_slices(self, users: int) -> Iterator[tuple[pa.Table, int]]:
        """The changes, sorted, in slices of ``users`` whole users (fewer in the last)."""
        if self._table is not None:
            for first in range(0, self.users, users):
                last = min(first + users, self.users)
                # Users first..last-1 are the rows from where user first-1 ends to where user
                # last-1 ends (``_user_ends`` holds each user's end, exclusive).
                start = int(self._user_ends[first - 1]) if first else 0
                end = int(self._user_ends[last - 1])
                yield self._table.slice(start, end - start), last - first
            return
        yield from self._spilled_slices(users)

    def _spilled_slices(self, users: int) -> Iterator[tuple[pa.Table, int]]:
        """Spilled changes sorted by DuckDB (out of core), read a record batch at a time and cut
        at user boundaries: the rows of a user a read ends in wait for the next read."""
        con = self._spool.con
        assert con is not None
        # A settled (queued) user's rows take the identity shared before held rows went.
        columns = ", ".join(
            f"CASE WHEN s.user_id IS NULL THEN c.{f.name} ELSE s.{f.name} END AS {f.name}"
            if f.name in IDENTITY_TRAITS
            else f"c.{f.name}"
            for f in _CHANGES_SCHEMA
        )
        query = (
            f"SELECT {columns}, s.retry_message_id FROM changes c LEFT JOIN settled s "
            "ON c.user_id = s.user_id AND c.audience = s.audience "
            "WHERE s.held IS NOT TRUE ORDER BY c.user_id, c.audience"
            if self._settled
            else "SELECT *, NULL::VARCHAR AS retry_message_id FROM changes "
            "ORDER BY user_id, audience"
        )
        relation = con.sql(query)
        # Newer DuckDB (2.x here) names it to_arrow_reader and deprecates fetch_arrow_reader,
        # the name older releases (the declared floor, 1.0) have.
        read = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
        reader = read(SPILL_READ_ROWS)
        schema = _CHANGES_SCHEMA.append(pa.field("retry_message_id", pa.string()))
        waiting = schema.empty_table()
        for batch in reader:
            waiting = pa.concat_tables(
                [waiting, pa.Table.from_batches([batch]).cast(schema)]
            ).combine_chunks()
            ends = _user_ends(waiting.column("user_id"))
            # The last user may go on in the next read: only the users before it are whole.
            while len(ends) - 1 >= users:
                end = int(ends[users - 1])
                yield _share_identities(waiting.slice(0, end)), users
                waiting = waiting.slice(end)
                ends = ends[users:] - end
        ends = _user_ends(waiting.column("user_id"))
        start = 0
        for first in range(0, len(ends), users):
            last = min(first + users, len(ends))
            end = int(ends[last - 1])
            yield _share_identities(waiting.slice(start, end - start)), last - first
            start = end

    def _batch(self, rows: pa.Table, users: int, con: duckdb.DuckDBPyConnection) -> ChangeBatch:
        audience = rows.column("audience").combine_chunks()
        value = rows.column("value").combine_chunks()
        user_id = rows.column("user_id").cast(pa.string()).combine_chunks()
        resend = rows.column("resend").combine_chunks()
        if resend.true_count:  # the ledger adds these users as members already
            flagged = pc.filter(pa.table({"a": audience, "u": user_id}), resend)
            for a, u in zip(
                flagged.column("a").to_pylist(), flagged.column("u").to_pylist(), strict=True
            ):
                self.resent[a].add(u)
        # A change's key is prefix[audience] + user_id + suffix[2 * audience + value]: the
        # suffixes are laid out per audience as (False, True), so 2 * audience + value picks
        # the right one, and three takes and one join build every key without a Python loop.
        suffix_at = pc.add(pc.multiply(audience, 2), pc.cast(value, pa.int32()))
        keys = pc.binary_join_element_wise(
            self._prefixes.take(audience), user_id, self._suffixes.take(suffix_at), ""
        )
        ids = message_ids(keys, con)
        if "retry_message_id" in rows.column_names:
            ids = pc.coalesce(rows.column("retry_message_id").combine_chunks(), ids)
        columns = {
            "user_id": user_id,
            "audience_key": pa.DictionaryArray.from_arrays(audience, self._keys),
            "audience_name": pa.DictionaryArray.from_arrays(audience, self._names),
            "value": value,
            "message_id": ids,
            **{t: rows.column(t).cast(pa.string()).combine_chunks() for t in IDENTITY_TRAITS},
            "data": rows.column("data").cast(pa.string()).combine_chunks(),
        }
        return ChangeBatch(pa.Table.from_pydict(columns, schema=BATCH_SCHEMA), users)


_CHANGES_SCHEMA = pa.schema(
    [
        ("user_id", pa.large_string()),
        ("audience", pa.int32()),
        ("value", pa.bool_()),
        ("resend", pa.bool_()),
        *((t, pa.large_string()) for t in IDENTITY_TRAITS),
        ("data", pa.large_string()),
    ]
)
_DUCKDB_TYPES = {pa.large_string(): "VARCHAR", pa.int32(): "INTEGER", pa.bool_(): "BOOLEAN"}


def _audience_rows(i: int, a: AudienceChanges) -> list[pa.Table]:
    """Audience ``i``'s changes as rows of ``_CHANGES_SCHEMA`` (its sends, then its exits)."""
    parts = []
    p = a.plan
    sends = len(p.entered) + len(p.resend)
    for ids, value, identities in (
        (large_text(p.entered, p.resend), True, a.identities),
        (large_text(p.exited), False, None),
    ):
        n = len(ids)
        if n == 0:
            continue
        assert identities is None or len(identities) == sends
        resend = np.zeros(n, dtype=bool)
        if value:
            resend[len(p.entered) :] = True
        columns = {
            "user_id": ids,
            "audience": pa.array(np.full(n, i, dtype=np.int32)),
            "value": pa.array(np.full(n, value)),
            "resend": pa.array(resend),
        }
        for t in IDENTITY_TRAITS:
            if identities is not None and t in identities.columns:
                columns[t] = pa.array(identities[t].array).cast(pa.large_string())
            else:
                columns[t] = pa.nulls(n, pa.large_string())
        if not a.computed:
            columns["data"] = pa.nulls(n, pa.large_string())
        elif identities is not None:
            columns["data"] = pa.array(identities["value"].array).cast(pa.large_string())
        else:  # a computed trait's exited users: their value is cleared
            columns["data"] = pa.repeat(pa.scalar("null", pa.large_string()), n)
        parts.append(pa.table(columns, schema=_CHANGES_SCHEMA))
    return parts


def _sorted_changes(parts: Sequence[pa.Table]) -> pa.Table:
    """One row per change (``user_id``, ``audience``, ``value``, identity traits, ``data``),
    sorted by user and then audience; a user's identity is on each of their rows, each trait
    from the first audience (in config order) whose snapshot has it."""
    if not parts:
        return _CHANGES_SCHEMA.empty_table()
    table = pa.concat_tables(parts).combine_chunks()
    order = pc.sort_indices(table, [("user_id", "ascending"), ("audience", "ascending")])
    table = table.take(order)
    return _share_identities(table)


def _user_ends(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Row positions where each user's rows end (``ids`` sorted by user)."""
    n = len(ids)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # Row i + 1 starts a new user where it differs from row i: compare the ids shifted by one,
    # and each such i + 1 is where the previous user ends; the last user ends at n.
    changed = pc.not_equal(ids.slice(1), ids.slice(0, n - 1))
    return np.append(np.flatnonzero(changed.to_numpy(zero_copy_only=False)) + 1, n)


def _share_identities(table: pa.Table) -> pa.Table:
    """Give every row of a user the user's identity: per trait, the first non-null value among
    the user's rows (rows are in audience order). Exited rows carry none of their own."""
    ends = _user_ends(table.column("user_id"))
    if len(ends) == table.num_rows:  # one row per user: nothing to share
        return table
    starts = np.concatenate([[0], ends[:-1]])
    # group[row] is the row's user number: user u's number repeated once per row it has.
    group = np.repeat(np.arange(len(ends)), np.diff(np.concatenate([[0], ends])))
    n = table.num_rows
    for t in IDENTITY_TRAITS:
        column = table.column(t).combine_chunks()
        if column.null_count == n:
            continue  # no row knows it
        # Even when every row knows it, a user's audiences may disagree: the first one wins
        # (whether a column has a null elsewhere in the run or in this batch must not matter).
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        # Each row's own position where it has the trait, else n: a sentinel above every
        # position. minimum.reduceat takes the minimum over each user's rows (starts[u] up to
        # starts[u + 1]), i.e. the user's first row with the trait, or n when none has it;
        # [group] copies it to each of the user's rows. n becomes a null index (mask), which
        # ``take`` turns into a null value.
        first_valid = np.minimum.reduceat(np.where(valid, np.arange(n), n), starts)[group]
        picked = pa.array(first_valid, mask=first_valid == n)
        table = table.set_column(table.schema.get_field_index(t), t, column.take(picked))
    return table
