"""The outcome ledger: what a destination confirmed, turned into state changes and committed.

The last stage of a run. The engine hands the ledger each outcome (``record``) or each batch a
destination confirmed whole (``record_batch``); the ledger keeps, per audience (or computed
trait) of the run, what the next commit writes (``Applied``: members to add or remove, trait
values to set, retry-queue rows, change-log rows, counters) and writes it in one transaction
per delivery batch (``commit``). So the state moves only for what was confirmed, and the
run's row always adds up: pending + delivered + failed + skipped = planned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from audience_sync.model import ChangeBatch, DeliveryStatus, Outcome, UserUpdate, input_hash
from audience_sync.state.store import Applied, StateStore

if TYPE_CHECKING:
    import pandas as pd
    import sqlalchemy as sa

__all__ = ["AudienceLedger", "Ledger"]


@dataclass(slots=True)
class AudienceLedger:
    """One audience's (or computed trait's) part of the ledger for one run.

    ``counts`` is the run row's counters (shared with the engine, which reports them);
    ``retry`` the audience's retry queue, indexed by user id; ``resend`` the users a full sync
    re-sends (already members: nothing to add), of the batches handed to the destination and
    not yet recorded (the engine's batches add them; recording takes them out, so the set stays
    as small as the batches in flight); ``previous`` a computed trait's values before the run of
    the users it replaces or clears (the change log's old values).
    """

    audience_id: int
    run_id: int
    key: str
    computed: bool
    counts: dict[str, int]
    retry: pd.DataFrame
    resend: set[str] = field(default_factory=set)
    previous_values: pd.Series | None = None
    retry_ids: set[str] = field(default_factory=set)
    batch: Applied | None = None
    _previous: dict[str, str] | None = None

    def previous(self) -> dict[str, str]:
        """``previous_values`` as a dict: looked up once per change, where a pandas lookup
        costs 50 us."""
        if self._previous is None:
            before = self.previous_values
            self._previous = (
                {}
                if before is None
                else dict(zip(before.index.tolist(), before.tolist(), strict=True))
            )
        return self._previous

    def applied(self) -> Applied:
        if self.batch is None:
            self.batch = Applied(self.audience_id, self.run_id, self.key)
        return self.batch

    def settle_retries(
        self,
        store: StateStore,
        entered: pd.Index,
        resend: pd.Index,
        exited: pd.Index,
        values: pd.Series | None,
    ) -> None:
        """Drop retry rows the plan no longer needs (the user moved on), before anything is
        sent. ``values``: a computed trait's values to send, by user id; a queued value that
        the snapshot no longer has is not sent either."""
        import pandas as pd

        retry = self.retry
        if retry.empty:
            return
        planned = pd.concat(
            [
                pd.Series(True, index=entered),
                pd.Series(True, index=resend),
                pd.Series(False, index=exited),
            ]
        )
        planned = planned[~planned.index.duplicated()]
        wanted = planned.reindex(retry.index)
        moved_on = wanted.isna() | (wanted != retry["value"])
        if self.computed:
            sent = values if values is not None else pd.Series(dtype=object)
            data = pd.concat([sent, pd.Series("null", index=exited)])
            data = data[~data.index.duplicated()].reindex(retry.index)
            moved_on |= data.isna() | (data.astype(object) != retry["data"].astype(object))
        stale = retry.index[moved_on]
        if len(stale):
            store.drop_retries(self.audience_id, list(stale))
        self.retry = retry.drop(index=stale)
        self.retry_ids = set(self.retry.index)

    def old_new(self, user_id: str, data: str | None) -> tuple[str | None, str | None]:
        """A computed trait's change-log values: the user's value before the run (None: had
        none) and the one sent (None: a clear)."""
        return self.previous().get(user_id), None if data is None or data == "null" else data


class Ledger:
    """The run's outcomes, per audience, until they are committed."""

    def __init__(self, store: StateStore, *, change_log: bool) -> None:
        self.store = store
        self.change_log = change_log
        self.audiences: dict[str, AudienceLedger] = {}

    def add(self, audience: AudienceLedger) -> None:
        self.audiences[audience.key] = audience

    def clear(self) -> None:
        self.audiences.clear()

    def record(self, update: UserUpdate, outcome: Outcome) -> None:
        """Record one user's outcome for every change of theirs in ``update``."""
        for change in update.changes:
            entry = self.audiences[change.audience_key]
            batch = entry.applied()
            counts = entry.counts
            # A computed trait's change: ``present`` says whether the user has a value after it.
            present = change.value is not None if change.computed else bool(change.value)
            data = change.json if change.computed else None
            if self.change_log:
                batch.changes.append(
                    update.user_id,
                    present,
                    outcome.status.value,
                    outcome.reason,
                    entry.old_new(update.user_id, data) if change.computed else None,
                )
            counts["pending"] -= 1
            resent = update.user_id in entry.resend
            if resent:
                entry.resend.discard(update.user_id)
            if outcome.status is DeliveryStatus.DELIVERED:
                batch.delivered += 1
                counts["delivered"] += 1
                if not present:
                    batch.removed.append(update.user_id)
                elif data is not None:
                    batch.values.append((update.user_id, data))
                elif not resent:
                    batch.added.append(update.user_id)
                if update.user_id in entry.retry_ids:
                    batch.cleared.append(update.user_id)
                continue
            previous = (
                entry.retry.loc[update.user_id] if update.user_id in entry.retry_ids else None
            )
            if outcome.status is DeliveryStatus.FAILED:
                batch.failed += 1
                counts["failed"] += 1
            else:
                batch.skipped += 1
                counts["skipped"] += 1
            batch.pending.append(
                {
                    "user_id": update.user_id,
                    "value": present,
                    "data": data,
                    "status": outcome.status.value,
                    "reason": outcome.reason,
                    "status_code": outcome.status_code,
                    "retryable": outcome.retryable,
                    "input_hash": input_hash(present, update.identity, data),
                    "message_id": change.message_id,
                    "attempts": 1 if previous is None else int(str(previous["attempts"])) + 1,
                    "first_run_id": (
                        entry.run_id if previous is None else int(str(previous["first_run_id"]))
                    ),
                    "last_run_id": entry.run_id,
                    "first_at": self.store.clock() if previous is None else previous["first_at"],
                }
            )

    def record_batch(self, confirmed: ChangeBatch) -> None:
        """Record a batch the destination confirmed whole: every change in it was delivered."""
        table = confirmed.table
        keys = table.column("audience_key").combine_chunks()
        at = keys.indices.to_numpy(zero_copy_only=False)
        values = table.column("value").to_numpy()
        user_ids = table.column("user_id")
        for index, key in enumerate(keys.dictionary.to_pylist()):
            rows = at == index
            count = int(rows.sum())
            if not count:
                continue
            entry = self.audiences[key]
            batch = entry.applied()
            users: list[str] = user_ids.filter(rows).to_pylist()
            sent: list[bool] = values[rows].tolist()
            if entry.computed:
                data: list[str] = table.column("data").filter(rows).to_pylist()
                if self.change_log:
                    olds, news = zip(
                        *(entry.old_new(u, d) for u, d in zip(users, data, strict=True)),
                        strict=True,
                    )
                    batch.changes.extend(
                        users, sent, DeliveryStatus.DELIVERED.value, (list(olds), list(news))
                    )
                batch.values.extend((u, d) for u, v, d in zip(users, sent, data, strict=True) if v)
            else:
                if self.change_log:
                    batch.changes.extend(users, sent, DeliveryStatus.DELIVERED.value)
                batch.added.extend(
                    u for u, v in zip(users, sent, strict=True) if v and u not in entry.resend
                )
                if entry.resend:
                    entry.resend.difference_update(users)
            batch.removed.extend(u for u, v in zip(users, sent, strict=True) if not v)
            if entry.retry_ids:
                batch.cleared.extend(u for u in users if u in entry.retry_ids)
            batch.delivered += count
            entry.counts["delivered"] += count
            entry.counts["pending"] -= count

    def take(self) -> list[Applied]:
        """What was recorded since the last call, to commit."""
        batches = [a.batch for a in self.audiences.values() if a.batch is not None]
        for a in self.audiences.values():
            a.batch = None
        return batches

    def commit(
        self, batches: Sequence[Applied], on_commit: Callable[[sa.Connection], Any] | None = None
    ) -> None:
        """Write ``batches`` in one transaction (``on_commit`` runs inside it, last)."""
        if batches:
            self.store.apply(batches, on_commit=on_commit)
