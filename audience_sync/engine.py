"""One sync run: the only module that calls the stages, in order.

lock -> settle what a crashed run left -> load and plan (``planning.py``) -> safeguards ->
deliver -> record.

All audiences of a run are planned first, then their changes are merged per user, so a
destination can send one update per user however many audiences changed for them. Outcomes are
committed as the destination confirms them; the state never moves for a change that was not
confirmed, and a run stopped at any point leaves the rest pending for the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import sqlalchemy as sa

from audience_sync.config import AudienceConfig, Config
from audience_sync.destinations import Destination, destination_class
from audience_sync.diff import Plan
from audience_sync.errors import (
    AlreadyRunning,
    AudienceSyncError,
    CredentialsError,
    DestinationError,
    QuotaExhausted,
    SafeguardError,
    SnapshotError,
    StateError,
)
from audience_sync.model import (
    IDENTITY_TRAITS,
    Change,
    DeliveryStatus,
    Identity,
    Outcome,
    RejectedRow,
    RunMode,
    RunStatus,
    Snapshot,
    Trigger,
    UserUpdate,
)
from audience_sync.planning import (
    SAMPLE_SIZE,
    identity_rows,
    load_and_plan,
    plan_all,
    plan_counts,
    run_mode,
)
from audience_sync.result import AudienceResult, SyncResult
from audience_sync.safeguards import check as check_safeguards
from audience_sync.safeguards import limits_for
from audience_sync.state import Applied, AudienceRef, Lease, RunLock, StateStore, connect, upgrade
from audience_sync.state.store import Clock, holder_id, schema_is_current, utc_now

__all__ = ["AudienceResult", "SyncResult", "open_destination", "sync"]

log = logging.getLogger("audience_sync")

#: Namespace of the deterministic Segment ``messageId`` of a change.
MESSAGE_NAMESPACE = uuid.UUID("6f1c3a52-3c1e-4bd4-9a8e-5d2b7f0c9e11")
_NAMESPACE_SHA1 = hashlib.sha1(MESSAGE_NAMESPACE.bytes, usedforsecurity=False)
#: Changes whose identities are looked up together (one vectorised lookup per audience).
IDENTITY_CHUNK = 50_000
# Shared by every user the snapshot says nothing about (e.g. all who exited).
_NO_IDENTITY = Identity()

Progress = Callable[[int, int], None]


def open_destination(config: Config, state: sa.Engine) -> Destination:
    """The configured destination, ready to be entered (``async with``)."""
    cls = destination_class(config.destination.type)
    return cls(
        config.destination.settings,
        name=config.destination.name,
        state=state,
        config_dir=config.config_dir,
    )


def message_id(key: str) -> str:
    """``str(uuid.uuid5(MESSAGE_NAMESPACE, key))``, without building UUID objects (hot path)."""
    sha = _NAMESPACE_SHA1.copy()  # the namespace's bytes hashed once, not per change
    sha.update(key.encode())
    digest = bytearray(sha.digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def input_hash(value: bool, identity: Identity) -> str:
    """Fingerprint of what a change sends: a held failure is retried once it changes."""
    text = "\x1f".join([str(value), *(getattr(identity, k) or "" for k in IDENTITY_TRAITS)])
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


@dataclass(slots=True)
class _AudienceRun:
    """The engine's working state for one audience during a run."""

    config: AudienceConfig
    ref: AudienceRef
    lease: Lease
    run_id: int
    mode: RunMode
    members: pd.DataFrame
    plan: Plan
    retry: pd.DataFrame
    counts: dict[str, int]
    rejected: tuple[RejectedRow, ...]
    held_failed: int = 0
    resend: set[str] = field(default_factory=set)
    retry_ids: set[str] = field(default_factory=set)
    batch: Applied | None = None

    def applied(self) -> Applied:
        if self.batch is None:
            self.batch = Applied(self.ref.id, self.run_id)
        return self.batch


class _Run:
    """One call of ``sync``: plans, delivery and the commits in between."""

    def __init__(
        self,
        config: Config,
        store: StateStore,
        lock: RunLock,
        destination: Destination,
        *,
        full: bool,
        retry_failed: bool,
        trigger: Trigger,
        progress: Progress | None,
        should_stop: Callable[[], bool],
        force: bool = False,
        wait: float = 0.0,
    ) -> None:
        self.config = config
        self.store = store
        self.lock = lock
        self.destination = destination
        self.full = full
        self.retry_failed = retry_failed
        self.trigger = trigger
        self.progress = progress
        self.should_stop = should_stop
        self.force = force
        self.wait = wait
        self.runs: list[_AudienceRun] = []
        self.by_key: dict[str, _AudienceRun] = {}
        self.done = 0
        self.held_users = 0

    # -- planning --------------------------------------------------------------------------

    def prepare(self, audience: AudienceConfig) -> AudienceResult | None:
        """Lock, start the run row, load and plan one audience; a result when it cannot go on."""
        dest = self.destination.name
        ref = self.store.audience(dest, audience.trait_key, audience.name)
        mode = run_mode(self.store, ref.id, full=self.full)
        try:
            lease = self._acquire(ref)
        except AlreadyRunning as exc:
            log.warning("audience=%s status=locked %s", audience.trait_key, exc)
            return AudienceResult(
                audience, RunStatus.FAILED, mode, error=str(exc), error_type=AlreadyRunning
            )
        # We hold the lock, so any run still marked running died without finishing.
        if self.store.mark_interrupted(
            ref.id, reason="the process running it stopped (crash or kill)"
        ):
            log.warning(
                "audience=%s marked an earlier unfinished run interrupted", audience.trait_key
            )
        run_id = self.store.start_run(ref, mode=mode.value, trigger=self.trigger.value)
        self.lock.attach_run(lease, run_id)
        log.info("audience=%s run=%d mode=%s started", audience.trait_key, run_id, mode.value)
        started = time.perf_counter()
        try:
            snapshot, the_plan = load_and_plan(audience, self.store, ref.id, full=self.full)
        except SnapshotError as exc:
            self.store.finish_run(run_id, RunStatus.FAILED, str(exc))
            self.lock.release([lease])
            log.error("audience=%s run=%d status=failed %s", audience.trait_key, run_id, exc)
            return AudienceResult(
                audience, RunStatus.FAILED, mode, run_id, error=str(exc), error_type=SnapshotError
            )
        log.info(
            "audience=%s run=%d planned in %.2fs: entered=%d exited=%d resend=%d unchanged=%d",
            audience.trait_key,
            run_id,
            time.perf_counter() - started,
            len(the_plan.entered),
            len(the_plan.exited),
            len(the_plan.resend),
            the_plan.unchanged,
        )
        synced = the_plan.unchanged + len(the_plan.exited)  # the state's members
        refused = self._guard(audience, mode, run_id, lease, snapshot, synced, the_plan)
        if refused is not None:
            return refused
        counts = plan_counts(snapshot, the_plan) | {
            "delivered": 0,
            "failed": 0,
            "skipped": 0,
            "pending": the_plan.sends,
        }
        self.store.update_run(run_id, **counts)
        run = _AudienceRun(
            audience,
            ref,
            lease,
            run_id,
            mode,
            identity_rows(snapshot.members, the_plan),
            the_plan,
            self.store.retry_queue(ref.id),
            counts,
            snapshot.rejected,
            resend=set(the_plan.resend) if len(the_plan.resend) else set(),
        )
        self._settle_retry_queue(run)
        self.runs.append(run)
        self.by_key[run.ref.key] = run
        for r in snapshot.rejected[:SAMPLE_SIZE]:
            log.warning(
                "audience=%s source=%s row=%d user_id=%s rejected: %s",
                audience.trait_key,
                snapshot.source,
                r.row,
                r.user_id,
                r.reason,
            )
        return None

    def _acquire(self, ref: AudienceRef) -> Lease:
        """Take the audience's run lock, waiting up to ``wait`` seconds for another run."""
        deadline = time.monotonic() + self.wait
        waiting = False
        while True:
            try:
                return self.lock.acquire(ref, holder_id())
            except AlreadyRunning as exc:
                left = deadline - time.monotonic()
                if left <= 0 or self.should_stop():
                    raise
                if not waiting:
                    log.info("audience=%s waiting up to %.0fs: %s", ref.key, left, exc)
                    waiting = True
            # Keep the leases this run already holds alive while it waits for this one.
            self.lock.renew([r.lease for r in self.runs])
            time.sleep(min(0.25, max(deadline - time.monotonic(), 0.0)))

    def _guard(
        self,
        audience: AudienceConfig,
        mode: RunMode,
        run_id: int,
        lease: Lease,
        snapshot: Snapshot,
        synced: int,
        the_plan: Plan,
    ) -> AudienceResult | None:
        """Apply the safeguards; a refused audience's run is recorded failed and sends nothing."""
        if self.force:
            return None
        try:
            check_safeguards(
                audience,
                the_plan,
                source=snapshot.source,
                # Counted from the plan: a pushed-down diff loads only the entered members' rows.
                members=len(the_plan.entered) + the_plan.unchanged,
                synced=synced,
                taken_at=snapshot.taken_at,
                now=self.store.clock(),
                limits=limits_for(audience, self.config.safeguards),
            )
        except SafeguardError as exc:
            counts = plan_counts(snapshot, the_plan)
            self.store.finish_run(run_id, RunStatus.FAILED, str(exc), **counts)
            self.lock.release([lease])
            log.error("audience=%s run=%d status=failed %s", audience.trait_key, run_id, exc)
            return AudienceResult(
                audience, RunStatus.FAILED, mode, run_id, counts, str(exc), SafeguardError
            )
        return None

    def _settle_retry_queue(self, run: _AudienceRun) -> None:
        """Drop retry rows the plan no longer needs; note the ones a permanent error holds."""
        retry = run.retry
        if retry.empty:
            return
        planned = pd.concat(
            [
                pd.Series(True, index=run.plan.entered),
                pd.Series(True, index=run.plan.resend),
                pd.Series(False, index=run.plan.exited),
            ]
        )
        planned = planned[~planned.index.duplicated()]
        wanted = planned.reindex(retry.index)
        stale = retry.index[wanted.isna() | (wanted != retry["value"])]
        if len(stale):
            self.store.drop_retries(run.ref.id, list(stale))
        run.retry = retry.drop(index=stale)
        run.retry_ids = set(run.retry.index)

    # -- building per-user updates -----------------------------------------------------------

    def _changes_frame(self) -> pd.DataFrame:
        parts = []
        for index, run in enumerate(self.runs):
            for ids, value in (
                (run.plan.entered, True),
                (run.plan.resend, True),
                (run.plan.exited, False),
            ):
                if len(ids):
                    parts.append(pd.DataFrame({"user_id": ids, "run": index, "value": value}))
        if not parts:
            return pd.DataFrame({"user_id": [], "run": [], "value": []})
        frame = pd.concat(parts, ignore_index=True)
        # Sorting by user groups each user's changes across audiences into one update.
        return frame.sort_values(["user_id", "run"], kind="stable", ignore_index=True)

    def _identities(self, frame: pd.DataFrame) -> dict[str, Identity]:
        """Each user's identity in a chunk of the changes frame, from the audiences they changed
        in (the first audience that knows a trait wins): one vectorised lookup per audience."""
        traits = {
            k: pd.Series(pd.NA, index=frame.index, dtype="string[pyarrow]") for k in IDENTITY_TRAITS
        }
        for i, rows in frame.groupby("run", sort=False).groups.items():
            members = self.runs[int(str(i))].members
            known = [k for k in IDENTITY_TRAITS if k in members.columns]
            if not known:
                continue
            found = members[known].reindex(pd.Index(frame.loc[rows, "user_id"]))
            for k in known:
                traits[k].loc[rows] = found[k].to_numpy()
        table = pd.DataFrame({"user_id": frame["user_id"], **traits})
        first = table.groupby("user_id", sort=False).first()  # first non-missing, in run order
        # Plain Python lists: iterating Arrow-backed columns value by value is slow.
        columns = [pa.Array.from_pandas(first[k]).to_pylist() for k in IDENTITY_TRAITS]
        unknown = [None] * len(IDENTITY_TRAITS)
        return {
            str(user_id): _NO_IDENTITY if row == unknown else Identity(*row)
            for user_id, *row in zip(first.index.tolist(), *columns, strict=True)
        }

    def _message_id(self, run: _AudienceRun, user_id: str, value: bool) -> str:
        # A re-sent change keeps its first attempt's id, so downstream dedup can drop it.
        if user_id in run.retry_ids:
            return str(run.retry.at[user_id, "message_id"])
        prefix, if_false, if_true = _message_key_parts(self.destination.name, run)
        return message_id(f"{prefix}{user_id}{if_true if value else if_false}")

    def updates(self, frame: pd.DataFrame) -> Iterator[UserUpdate]:
        """Per-user updates, lazily; a held permanent failure is not re-sent."""
        # Plain Python lists and per-run constants: this loop runs once per change.
        users: list[str] = frame["user_id"].tolist()
        run_index: list[int] = frame["run"].tolist()
        values: list[bool] = frame["value"].tolist()
        n = len(users)
        # Where each user's rows end (the frame is sorted by user), found in one vectorised pass.
        ids = frame["user_id"].to_numpy(dtype=object)
        ends = [*(np.flatnonzero(ids[1:] != ids[:-1]) + 1).tolist(), n] if n else []
        dest = self.destination.name
        per_run = [
            (run, run.ref.key, run.config.name, run.retry_ids, *_message_key_parts(dest, run))
            for run in self.runs
        ]
        start = 0
        identities: dict[str, Identity] = {}
        chunk_end = 0
        for end in ends:
            if self.should_stop():
                return
            if start >= chunk_end:
                chunk_end = _chunk_end(users, start, IDENTITY_CHUNK)
                identities = self._identities(frame.iloc[start:chunk_end])
            user_id = users[start]
            identity = identities[user_id]
            changes = []
            for i in range(start, end):
                run, key, name, retry_ids, prefix, if_false, if_true = per_run[run_index[i]]
                value = values[i]
                if user_id in retry_ids:  # rare: the retry queue's users
                    if self._held(run, user_id, value, identity):
                        continue
                    mid = self._message_id(run, user_id, value)
                else:
                    mid = message_id(f"{prefix}{user_id}{if_true if value else if_false}")
                changes.append(Change(key, name, value, mid))
            start = end
            if changes:
                yield UserUpdate(user_id, identity, tuple(changes))
            else:
                self.held_users += 1

    def _held(self, run: _AudienceRun, user_id: str, value: bool, identity: Identity) -> bool:
        if self.retry_failed or user_id not in run.retry_ids:
            return False
        row = run.retry.loc[user_id]
        if row["retryable"] or row["status"] != DeliveryStatus.FAILED.value:
            return False
        if row["input_hash"] != input_hash(value, identity):
            return False  # the user's data changed: worth another try
        run.held_failed += 1
        run.counts["pending"] -= 1
        return True

    # -- recording outcomes ------------------------------------------------------------------

    def record(self, update: UserUpdate, outcome: Outcome) -> None:
        for change in update.changes:
            run = self.by_key[change.audience_key]
            batch = run.applied()
            if self.config.state.change_log:
                batch.changes.append(
                    {
                        "user_id": update.user_id,
                        "trait_key": change.audience_key,
                        "value": change.value,
                        "outcome": outcome.status.value,
                        "reason": outcome.reason,
                    }
                )
            run.counts["pending"] -= 1
            if outcome.status is DeliveryStatus.DELIVERED:
                batch.delivered += 1
                run.counts["delivered"] += 1
                if not change.value:
                    batch.removed.append(update.user_id)
                elif update.user_id not in run.resend:
                    batch.added.append(update.user_id)
                if update.user_id in run.retry_ids:
                    batch.cleared.append(update.user_id)
                continue
            previous = run.retry.loc[update.user_id] if update.user_id in run.retry_ids else None
            if outcome.status is DeliveryStatus.FAILED:
                batch.failed += 1
                run.counts["failed"] += 1
            else:
                batch.skipped += 1
                run.counts["skipped"] += 1
            batch.pending.append(
                {
                    "user_id": update.user_id,
                    "value": change.value,
                    "status": outcome.status.value,
                    "reason": outcome.reason,
                    "status_code": outcome.status_code,
                    "retryable": outcome.retryable,
                    "input_hash": input_hash(change.value, update.identity),
                    "message_id": change.message_id,
                    "attempts": 1 if previous is None else int(str(previous["attempts"])) + 1,
                    "first_run_id": (
                        run.run_id if previous is None else int(str(previous["first_run_id"]))
                    ),
                    "last_run_id": run.run_id,
                    "first_at": self.store.clock() if previous is None else previous["first_at"],
                }
            )

    def _take_batches(self) -> list[Applied]:
        batches = [r.batch for r in self.runs if r.batch is not None]
        for r in self.runs:
            r.batch = None
        return batches

    def _apply(self, batches: list[Applied]) -> None:
        if batches:
            self.store.apply(
                batches, on_commit=lambda conn: self.lock.renew([r.lease for r in self.runs], conn)
            )

    def commit(self) -> None:
        self._apply(self._take_batches())

    async def commit_async(self) -> None:
        """Commit what was recorded so far in a worker thread, off the event loop."""
        batches = self._take_batches()
        if batches:
            await asyncio.to_thread(self._apply, batches)

    async def _commit_behind(self, running: asyncio.Task[None] | None) -> asyncio.Task[None]:
        """Commit the outcomes recorded so far in the background, after the previous commit.

        So the destination delivers the next batch while the database commits this one (double
        buffering): a run killed at any moment re-sends at most the batch being committed and the
        one being delivered, never what a finished commit recorded. A failed commit raises here.
        """
        if running is not None:
            await running
        running = asyncio.create_task(self.commit_async())
        # One turn of the loop starts the commit even for a destination that never awaits.
        await asyncio.sleep(0)
        return running

    # -- delivery ---------------------------------------------------------------------------

    async def deliver(self) -> tuple[RunStatus | None, str | None, type[AudienceSyncError] | None]:
        """Send every planned change; returns how delivery ended (None: it ran to the end)."""
        started = time.perf_counter()
        frame = self._changes_frame()
        total = frame["user_id"].nunique() if len(frame) else 0
        inflight: dict[str, UserUpdate] = {}

        def feed() -> Iterator[UserUpdate]:
            for update in self.updates(frame):
                inflight[update.user_id] = update
                yield update

        heartbeat = asyncio.create_task(self._heartbeat())
        watchdog = asyncio.create_task(self._stop_watchdog(asyncio.current_task()))
        committing: asyncio.Task[None] | None = None
        try:
            if total:
                async with (
                    self.destination as dest,
                    contextlib.aclosing(dest.deliver(feed())) as stream,
                ):
                    async for outcomes in stream:
                        for outcome in outcomes:
                            self.record(inflight.pop(outcome.user_id), outcome)
                        self.done += len(outcomes)
                        committing = await self._commit_behind(committing)
                        if self.progress is not None:
                            self.progress(self.done, total)
        except QuotaExhausted as exc:
            pending = max(total - self.done - self.held_users, 0)
            message = exc.describe(pending)
            log.warning("destination=%s %s", self.destination.name, message)
            return RunStatus.PARTIAL, message, None
        except CredentialsError as exc:
            return RunStatus.FAILED, str(exc), CredentialsError
        except DestinationError as exc:
            return RunStatus.FAILED, str(exc), DestinationError
        except (asyncio.CancelledError, KeyboardInterrupt):
            return RunStatus.INTERRUPTED, "stopped by a signal before the run finished", None
        finally:
            heartbeat.cancel()
            watchdog.cancel()
            failed_commit: BaseException | None = None
            if committing is not None:
                await asyncio.wait([committing])  # its thread finishes whatever happens
                if not committing.cancelled():
                    failed_commit = committing.exception()
            self.commit()  # whatever was confirmed is recorded, however delivery ended
            if total:
                log.info(
                    "destination=%s confirmed %d of %d users in %.2fs",
                    self.destination.name,
                    self.done,
                    total,
                    time.perf_counter() - started,
                )
            if failed_commit is not None:
                raise failed_commit
        if self.should_stop():
            return RunStatus.INTERRUPTED, "stopped by a signal before the run finished", None
        return None, None, None

    async def _stop_watchdog(self, delivery: asyncio.Task[Any] | None) -> None:
        """Once a stop is asked for, give in-flight requests ``stop_timeout``, then cancel them."""
        while not self.should_stop():
            await asyncio.sleep(0.05)
        self.destination.stop()  # queued users stay pending; in-flight requests finish
        timeout = self.config.service.stop_timeout.total_seconds()
        await asyncio.sleep(timeout)
        log.warning("in-flight deliveries still running %.0fs after the stop; cancelling", timeout)
        if delivery is not None:
            delivery.cancel()

    async def _heartbeat(self) -> None:
        interval = max(self.lock.ttl.total_seconds() / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.lock.renew, [r.lease for r in self.runs])
            except StateError as exc:
                # The next commit renews inside its transaction and stops the run on this.
                log.error("lock heartbeat: %s", exc)
                return

    def finish(
        self, ended: RunStatus | None, error: str | None, error_type: type[AudienceSyncError] | None
    ) -> list[AudienceResult]:
        results = []
        for run in self.runs:
            counts = run.counts
            counts["failed"] += run.held_failed
            status = ended or RunStatus.SUCCEEDED
            message = error
            if status is RunStatus.SUCCEEDED and (
                counts["failed"]
                or counts["skipped"]
                or counts["pending"]
                or counts["rejected_rows"]
            ):
                status = RunStatus.PARTIAL
                message = _partial_reason(counts, run.held_failed)
            self.store.finish_run(run.run_id, status, message, **counts)
            log.info(
                "audience=%s run=%d status=%s %s",
                run.ref.key,
                run.run_id,
                status.value,
                " ".join(f"{k}={v}" for k, v in counts.items()),
            )
            results.append(
                AudienceResult(
                    run.config,
                    status,
                    run.mode,
                    run.run_id,
                    dict(counts),
                    message,
                    error_type if status is RunStatus.FAILED else None,
                    run.rejected,
                )
            )
        self.lock.release([r.lease for r in self.runs])
        return results


def _message_key_parts(destination: str, run: _AudienceRun) -> tuple[str, str, str]:
    """A change's messageId derives from ``prefix + user_id + suffix`` (suffix: false, true)."""
    prefix = f"{destination}\x1f{run.ref.key}\x1f"
    return prefix, f"\x1f{False}\x1f{run.run_id}", f"\x1f{True}\x1f{run.run_id}"


def _chunk_end(users: Any, start: int, size: int) -> int:
    """End of the chunk from ``start``: about ``size`` rows, never splitting one user's rows."""
    end = min(start + size, len(users))
    while end < len(users) and users[end] == users[end - 1]:
        end += 1
    return end


def _partial_reason(counts: dict[str, int], held: int) -> str:
    parts = []
    if counts["rejected_rows"]:
        parts.append(f"{counts['rejected_rows']} snapshot rows rejected")
    if counts["failed"]:
        note = f" ({held} held after a permanent error; use --retry-failed)" if held else ""
        parts.append(f"{counts['failed']} users failed{note}")
    if counts["skipped"]:
        parts.append(f"{counts['skipped']} users skipped")
    if counts["pending"]:
        parts.append(f"{counts['pending']} changes pending")
    return "; ".join(parts) + "; see `audience-sync history --failed`"


def sync(
    config: Config,
    *,
    audiences: Sequence[str] = (),
    full: bool = False,
    dry_run: bool = False,
    retry_failed: bool = False,
    trigger: Trigger = Trigger.MANUAL,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    clock: Clock = utc_now,
    destination: Destination | None = None,
    force: bool = False,
    wait: float = 0.0,
) -> SyncResult:
    """Sync the selected audiences (all by default) to the configured destination.

    ``dry_run`` plans and reports without changing anything. ``destination`` replaces the
    configured one (tests inject a fault-injecting destination this way). ``force`` skips the
    safeguards; ``wait`` is how long to wait for another process's run of an audience to end.
    Once ``should_stop()`` is true no new change is sent, and in-flight ones get
    ``[service] stop_timeout`` to finish.
    """
    selected = config.select(audiences)
    engine = connect(config.state.url)
    try:
        dest = destination or open_destination(config, engine)
        if dry_run:
            if sa.inspect(engine).has_table("sync_audiences") and not schema_is_current(engine):
                raise StateError("the state database needs `audience-sync db upgrade` first")
            # Only a destination that prices a plan (Crisp: requests) pays for collecting it.
            prices = type(dest).describe_plan is not Destination.describe_plan
            changed: dict[str, Identity] | None = {} if prices else None
            planned = plan_all(config, engine, dest.name, selected, full, changed)
            updates = [UserUpdate(u, identity, ()) for u, identity in (changed or {}).items()]
            cost = dest.describe_plan(updates) if updates else {}
            return SyncResult(dest.name, True, planned, cost)
        dest.preflight()  # e.g. missing credentials: one clear error, before any state change
        if config.state.auto_migrate:
            upgrade(engine)
        elif not schema_is_current(engine):
            raise StateError(
                "the state database is not at the current schema version; "
                "run `audience-sync db upgrade` (or set [state] auto_migrate = true)"
            )
        store = StateStore(engine, clock)
        run = _Run(
            config,
            store,
            RunLock(engine, ttl=config.service.lock_ttl, clock=clock),
            dest,
            full=full,
            retry_failed=retry_failed,
            trigger=trigger,
            progress=progress,
            should_stop=should_stop,
            force=force,
            wait=wait,
        )
        results: list[AudienceResult] = []
        try:
            for audience in selected:
                early = run.prepare(audience)
                if early is not None:
                    results.append(early)
            ended, error, error_type = asyncio.run(run.deliver())
        except BaseException as exc:
            # Leave no run marked running and no lock held for an error we can see.
            message = (
                str(exc) if isinstance(exc, AudienceSyncError) else f"unexpected error: {exc!r}"
            )
            status = (
                RunStatus.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else RunStatus.FAILED
            )
            with contextlib.suppress(Exception):
                run.commit()  # what the destination confirmed is kept
            with contextlib.suppress(Exception):
                run.finish(
                    status, message, type(exc) if isinstance(exc, AudienceSyncError) else None
                )
            raise
        results.extend(run.finish(ended, error, error_type))
        order = {a.trait_key: i for i, a in enumerate(selected)}
        results.sort(key=lambda r: order[r.audience.trait_key])
        return SyncResult(dest.name, False, results)
    finally:
        engine.dispose()
