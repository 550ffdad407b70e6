"""One sync run: the only module that calls the stages, in order.

lock -> settle what a crashed run left -> load and plan (``planning.py``) -> safeguards ->
merge the changes per user (``changes.py``) -> deliver -> record.

All audiences of a run are planned first, then their changes are merged per user, so a
destination can send one update per user however many audiences changed for them; it takes
them as per-user updates or as column batches (``Destination.deliver_batches``). Outcomes are
committed as the destination confirms them; the state never moves for a change that was not
confirmed, and a run stopped at any point leaves the rest pending for the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import sqlalchemy as sa

from audience_sync.changes import AudienceChanges, RunChanges
from audience_sync.config import AudienceConfig, ComputedTraitConfig, Config, sqlite_path
from audience_sync.destinations import Destination
from audience_sync.diff import Plan
from audience_sync.errors import (
    AlreadyRunning,
    AudienceSyncError,
    ConfigError,
    CredentialsError,
    DestinationError,
    NotFound,
    QuotaExhausted,
    SafeguardError,
    SnapshotError,
    StateError,
    StateMissing,
)
from audience_sync.model import (
    ChangeBatch,
    Identity,
    RejectedRow,
    RunMode,
    RunStatus,
    Snapshot,
    SyncKind,
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
from audience_sync.progress import Progress
from audience_sync.result import AudienceResult, SyncResult
from audience_sync.runtime import open_destination, open_resources, prepare_schema, ready
from audience_sync.safeguards import check_initial_sync, check_snapshot
from audience_sync.sources.fingerprint import SourceFingerprint
from audience_sync.state import Applied, AudienceRef, Lease, RunLock, StateStore
from audience_sync.state.fingerprints import Confirmed, record
from audience_sync.state.ledger import AudienceLedger, Ledger
from audience_sync.state.store import COUNTERS, Clock, holder_id, schema_is_current, utc_now
from audience_sync.unchanged import confirmed_fact, fingerprint, matching, skipped_plan

__all__ = [
    "AudienceResult",
    "SyncResult",
    "open_destination",
    "prepare_schema",
    "retire",
    "sync",
]

log = logging.getLogger("audience_sync")

#: Commits running at once for a batch destination on PostgreSQL (SQLite takes one writer at
#: a time): each is a few bulk statements one server process works through on one core.
COMMITS_IN_FLIGHT = 2
#: Users per batch of changes prepared for a destination that takes updates one user at a time.
UPDATE_BATCH = 10_000

_NO_USERS = pd.Index([], dtype="string[pyarrow]", name="user_id")


@dataclass(slots=True)
class _AudienceRun:
    """The engine's working state for one audience during a run; ``ledger`` is its part of
    the outcome ledger (counters, retry queue, what the next commit writes)."""

    config: AudienceConfig
    ref: AudienceRef
    lease: Lease
    run_id: int
    mode: RunMode
    identities: pd.DataFrame
    plan: Plan
    ledger: AudienceLedger
    rejected: tuple[RejectedRow, ...]
    held_failed: int = 0
    unchanged: Confirmed | None = None
    """Stored as the audience's fingerprint if the run leaves the state equal to its snapshot."""

    @property
    def counts(self) -> dict[str, int]:
        return self.ledger.counts


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
        self.ledger = Ledger(store, change_log=config.state.change_log)
        self.done = 0
        # Commits at once: see _commit_behind. Per-user destinations are paced by a remote API,
        # never by the database, and their at-most-re-sent bound assumes one commit at a time.
        postgres = store.engine.dialect.name == "postgresql"
        parallel = postgres and destination.takes_batches
        self._commits_in_flight = COMMITS_IN_FLIGHT if parallel else 1

    # -- planning --------------------------------------------------------------------------

    def prepare(self, audience: AudienceConfig) -> AudienceResult | None:
        """Lock, start the run row, load and plan one audience; a result when it cannot go on."""
        dest = self.destination.name
        try:
            ref = self.store.audience(dest, audience.trait_key, audience.name, audience.kind)
        except ConfigError as exc:  # the key's state is of the other kind
            log.error("audience=%s status=failed %s", audience.trait_key, exc)
            mode = RunMode.FULL if self.full else RunMode.INCREMENTAL
            return AudienceResult(
                audience, RunStatus.FAILED, mode, error=str(exc), error_type=ConfigError
            )
        mode = run_mode(self.store, ref.id, full=self.full)
        now = fingerprint(audience) if self.config.state.skip_unchanged else None
        begun = self._begin(audience, ref, mode, now)
        if isinstance(begun, AudienceResult):
            return begun
        lease, run_id, same = begun
        if same is not None and now is not None:
            return self._skip(audience, ref, mode, lease, run_id, same, now)
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
        self.store.add_rejected(run_id, audience.trait_key, snapshot.rejected)
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
        refused = self._guard(audience, mode, run_id, lease, snapshot, the_plan)
        if refused is not None:
            return refused
        identities = identity_rows(snapshot.members, the_plan)
        fact = confirmed_fact(audience, now, run_id, snapshot, the_plan)
        self._enlist(
            audience,
            ref,
            lease,
            run_id,
            mode,
            identities,
            the_plan,
            snapshot.rejected,
            plan_counts(snapshot, the_plan),
        )
        self.runs[-1].unchanged = fact
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

    def prepare_retire(self, audience: AudienceConfig, ref: AudienceRef) -> AudienceResult | None:
        """Lock and start a retire run: ``false`` for every member the state holds."""
        begun = self._begin(audience, ref, RunMode.RETIRE)
        if isinstance(begun, AudienceResult):
            return begun
        lease, run_id, _ = begun
        previous = None
        if audience.computed:  # every value is cleared; the log keeps what it was
            members, values = self.store.values(ref.id)
            previous = pd.Series(pd.array(values, dtype="string[pyarrow]"), index=members)
        else:
            members = self.store.members(ref.id)
        the_plan = Plan(
            entered=_NO_USERS, exited=members, resend=_NO_USERS, unchanged=0, previous=previous
        )
        counts = dict.fromkeys(COUNTERS[:5], 0) | {"exited": len(members)}
        no_identities = pd.DataFrame(index=_NO_USERS)
        self._enlist(
            audience, ref, lease, run_id, RunMode.RETIRE, no_identities, the_plan, (), counts
        )
        return None

    def _begin(
        self,
        audience: AudienceConfig,
        ref: AudienceRef,
        mode: RunMode,
        now: SourceFingerprint | None = None,
    ) -> tuple[Lease, int, Confirmed | None] | AudienceResult:
        """Take the audience's lock and write its run row; a result when it is locked. With
        the snapshot's fingerprint ``now``: also whether the state is known to equal it."""
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
        # Read under the lock and before the run's row, whose transaction deletes it.
        same = matching(self.store, ref.id, audience, now, mode, self.config.safeguards)
        run_id = self.store.start_run(ref, mode=mode.value, trigger=self.trigger.value)
        self.lock.attach_run(lease, run_id)
        log.info("audience=%s run=%d mode=%s started", audience.trait_key, run_id, mode.value)
        return lease, run_id, same

    def _skip(
        self,
        audience: AudienceConfig,
        ref: AudienceRef,
        mode: RunMode,
        lease: Lease,
        run_id: int,
        same: Confirmed,
        now: SourceFingerprint,
    ) -> AudienceResult:
        """Record a run whose snapshot is unchanged since run ``same.run_id`` left the state
        equal to it: no state read, no diff, nothing to send (the safeguards still apply)."""
        snapshot, the_plan = skipped_plan(audience, same, now)
        refused = self._guard(audience, mode, run_id, lease, snapshot, the_plan)
        if refused is not None:
            return refused
        counts = plan_counts(snapshot, the_plan) | dict.fromkeys(COUNTERS[5:], 0)
        self.store.finish_run(
            run_id, RunStatus.SUCCEEDED, None, **counts, unchanged_since=same.run_id
        )
        record(self.store.engine, ref.id, same, self.store.clock())
        self.lock.release([lease])
        log.info(
            "audience=%s run=%d status=succeeded snapshot unchanged since run %d, not diffed: %s",
            audience.trait_key,
            run_id,
            same.run_id,
            " ".join(f"{k}={v}" for k, v in counts.items()),
        )
        return AudienceResult(audience, RunStatus.SUCCEEDED, mode, run_id, counts)

    def _enlist(
        self,
        audience: AudienceConfig,
        ref: AudienceRef,
        lease: Lease,
        run_id: int,
        mode: RunMode,
        identities: pd.DataFrame,
        the_plan: Plan,
        rejected: tuple[RejectedRow, ...],
        counts: dict[str, int],
    ) -> None:
        """Add a planned audience to the run: its counters start with every change pending, and
        retry rows its plan no longer needs are dropped."""
        counts |= {"delivered": 0, "failed": 0, "skipped": 0, "pending": the_plan.sends}
        self.store.update_run(run_id, **counts)
        ledger = AudienceLedger(
            ref.id,
            run_id,
            ref.key,
            audience.computed,
            counts,
            self.store.retry_queue(ref.id),
            resend=set(the_plan.resend) if len(the_plan.resend) else set(),
            previous_values=the_plan.previous,
        )
        ledger.settle_retries(
            self.store,
            the_plan.entered,
            the_plan.resend,
            the_plan.exited,
            identities["value"] if audience.computed and len(identities) else None,
        )
        run = _AudienceRun(
            audience, ref, lease, run_id, mode, identities, the_plan, ledger, rejected
        )
        self.runs.append(run)
        self.ledger.add(ledger)

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
        the_plan: Plan,
    ) -> AudienceResult | None:
        """Apply the safeguards; a refused audience's run is recorded failed and sends nothing."""
        if self.force:
            return None
        try:
            check_snapshot(audience, the_plan, snapshot, self.config.safeguards, self.store.clock())
        except SafeguardError as exc:
            counts = plan_counts(snapshot, the_plan)
            self.store.finish_run(run_id, RunStatus.FAILED, str(exc), **counts)
            self.lock.release([lease])
            log.error("audience=%s run=%d status=failed %s", audience.trait_key, run_id, exc)
            return AudienceResult(
                audience, RunStatus.FAILED, mode, run_id, counts, str(exc), SafeguardError
            )
        return None

    def guard_initial_sync(self, evidence: str | None) -> list[AudienceResult]:
        """Refuse every planned audience when the run looks like a lost state: an initial sync
        of more than ``max_initial_sync`` memberships to a destination synced before."""
        try:
            check_initial_sync(
                destination=self.destination.name,
                evidence=evidence,
                memberships=sum(
                    len(r.plan.entered) for r in self.runs if r.mode is RunMode.INITIAL
                ),
                limit=self.config.safeguards.max_initial_sync,
            )
        except StateMissing as exc:
            log.error("destination=%s refused: %s", self.destination.name, exc)
            results = []
            for run in self.runs:
                counts = {k: v for k, v in run.counts.items() if k in COUNTERS[:5]}
                self.store.finish_run(run.run_id, RunStatus.FAILED, str(exc), pending=0)
                results.append(
                    AudienceResult(
                        run.config,
                        RunStatus.FAILED,
                        run.mode,
                        run.run_id,
                        counts,
                        str(exc),
                        StateMissing,
                        run.rejected,
                    )
                )
            self.lock.release([r.lease for r in self.runs])
            self.runs.clear()
            self.ledger.clear()
            return results
        return []

    # -- the run's changes --------------------------------------------------------------------

    def changes(self) -> RunChanges:
        """Every planned change, merged per user; held permanent failures counted and left out."""
        changes = RunChanges(
            self.destination.name,
            [
                AudienceChanges(
                    run.ref.key,
                    run.config.name,
                    run.run_id,
                    run.plan,
                    run.identities,
                    run.ledger.retry,
                    run.config.computed,
                )
                for run in self.runs
            ],
            retry_failed=self.retry_failed,
        )
        for run, held in zip(self.runs, changes.held, strict=True):
            run.held_failed = held
            if held:  # counted failed now, so a killed run's row adds up too
                run.counts["pending"] -= held
                run.counts["failed"] += held
                self.store.update_run(
                    run.run_id, pending=run.counts["pending"], failed=run.counts["failed"]
                )
            run.identities = run.identities.iloc[:0]  # in the changes now; free the memory
        return changes

    # -- recording outcomes (state/ledger.py) ---------------------------------------------------

    def _apply(self, batches: list[Applied]) -> None:
        self.ledger.commit(
            batches, on_commit=lambda conn: self.lock.renew([r.lease for r in self.runs], conn)
        )

    def commit(self) -> None:
        self._apply(self.ledger.take())

    async def commit_async(self) -> None:
        """Commit what was recorded so far in a worker thread, off the event loop."""
        batches = self.ledger.take()
        if batches:
            await asyncio.to_thread(self._apply, batches)

    async def _commit_behind(self, running: list[asyncio.Task[None]]) -> None:
        """Commit the outcomes recorded so far in the background, beside earlier commits.

        So the destination delivers the next batch while the database commits this one, and a
        batch destination on PostgreSQL has up to ``COMMITS_IN_FLIGHT`` commits at once, on
        connections of their own (batches never share a user, so they may commit in any order;
        their counter updates queue on the run rows' locks, always taken in the same order). A
        run killed at any moment re-sends at most the batches being committed and the one being
        delivered, never what a finished commit recorded. A failed commit raises here.
        """
        if len(running) >= self._commits_in_flight:
            await running.pop(0)
        running.append(asyncio.create_task(self.commit_async()))
        # One turn of the loop starts the commit even for a destination that never awaits.
        await asyncio.sleep(0)

    # -- delivery ---------------------------------------------------------------------------

    async def deliver(self) -> tuple[RunStatus | None, str | None, type[AudienceSyncError] | None]:
        """Send every planned change; returns how delivery ended (None: it ran to the end)."""
        started = time.perf_counter()
        changes = self.changes()
        total = changes.users
        heartbeat = asyncio.create_task(self._heartbeat())
        watchdog = asyncio.create_task(self._stop_watchdog(asyncio.current_task()))
        committing: list[asyncio.Task[None]] = []
        if self.progress is not None:
            self.progress("delivering", None, 0, total)
        try:
            if total:
                async with (
                    self.destination as dest,
                    contextlib.aclosing(self._confirmed(dest, changes)) as confirmations,
                ):
                    async for users in confirmations:
                        self.done += users
                        await self._commit_behind(committing)
                        if self.progress is not None:
                            self.progress("delivering", None, self.done, total)
        except QuotaExhausted as exc:
            pending = max(total - self.done, 0)
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
            if committing:
                await asyncio.wait(committing)  # their threads finish whatever happens
                failures = [t.exception() for t in committing if not t.cancelled()]
                failed_commit = next((e for e in failures if e is not None), None)
            self.commit()  # whatever was confirmed is recorded, however delivery ended
            if total or changes.held_users:
                held = changes.held_users
                log.info(
                    "destination=%s confirmed %d of %d users in %.2fs%s",
                    self.destination.name,
                    self.done,
                    total,
                    time.perf_counter() - started,
                    f"; {held} held after a permanent failure (--retry-failed)" if held else "",
                )
            if failed_commit is not None:
                raise failed_commit
        if self.should_stop():
            return RunStatus.INTERRUPTED, "stopped by a signal before the run finished", None
        return None, None, None

    async def _confirmed(self, dest: Destination, changes: RunChanges) -> AsyncGenerator[int, None]:
        """Hand ``changes`` to ``dest`` in the shape it takes; record each confirmation as it
        comes and yield how many users it settled."""
        if dest.takes_batches:
            batches = self._batches(changes, dest.batch_users)
            async with contextlib.aclosing(dest.deliver_batches(batches)) as stream:
                async for confirmed in stream:
                    self.ledger.record_batch(confirmed)
                    yield confirmed.users
            return
        inflight: dict[str, UserUpdate] = {}

        def feed() -> Iterator[UserUpdate]:
            for batch in self._batches(changes, UPDATE_BATCH):
                for update in batch.updates():
                    if self.should_stop():
                        return
                    inflight[update.user_id] = update
                    yield update

        async with contextlib.aclosing(dest.deliver(feed())) as outcomes_stream:
            async for outcomes in outcomes_stream:
                for outcome in outcomes:
                    self.ledger.record(inflight.pop(outcome.user_id), outcome)
                yield len(outcomes)

    def _batches(self, changes: RunChanges, users: int) -> Iterator[ChangeBatch]:
        """The changes in batches of ``users`` users, until a stop is asked for."""
        for batch in changes.batches(users):
            if self.should_stop():
                return
            yield batch

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

    def complete(self) -> list[AudienceResult]:
        """Deliver every planned change and record how each audience's run ended."""
        try:
            ended, error, error_type = asyncio.run(self.deliver())
        except BaseException as exc:
            self.abort(exc)
            raise
        return self.finish(ended, error, error_type)

    def abort(self, exc: BaseException) -> None:
        """Leave no run marked running and no lock held for an error we can see."""
        message = str(exc) if isinstance(exc, AudienceSyncError) else f"unexpected error: {exc!r}"
        status = RunStatus.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else RunStatus.FAILED
        with contextlib.suppress(Exception):
            self.commit()  # what the destination confirmed is kept
        with contextlib.suppress(Exception):
            self.finish(status, message, type(exc) if isinstance(exc, AudienceSyncError) else None)

    def finish(
        self, ended: RunStatus | None, error: str | None, error_type: type[AudienceSyncError] | None
    ) -> list[AudienceResult]:
        results = []
        for run in self.runs:
            counts = run.counts
            status = ended or RunStatus.SUCCEEDED
            message = error
            if ended is RunStatus.PARTIAL and not counts["pending"]:
                # A quota stop ends the run for the audiences with changes left; one with
                # nothing left to send is as done as it would be without the stop.
                status, message = RunStatus.SUCCEEDED, None
            if status is RunStatus.SUCCEEDED and (
                counts["failed"]
                or counts["skipped"]
                or counts["pending"]
                or counts["rejected_rows"]
            ):
                status = RunStatus.PARTIAL
                message = _partial_reason(counts, run.run_id, run.held_failed, run.plan.exits_held)
            self.store.finish_run(run.run_id, status, message, **counts)
            if (
                run.unchanged is not None
                and status is RunStatus.SUCCEEDED
                and not any(counts[k] for k in ("failed", "skipped", "pending", "rejected_rows"))
            ):
                record(self.store.engine, run.ref.id, run.unchanged, self.store.clock())
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


def _partial_reason(counts: dict[str, int], run_id: int, held: int, exits_held: int) -> str:
    parts = []
    if counts["rejected_rows"]:
        held_note = (
            f" ({exits_held} exits held until a snapshot without rejected rows)"
            if exits_held
            else ""
        )
        parts.append(f"{counts['rejected_rows']} snapshot rows rejected{held_note}")
    if counts["failed"]:
        note = f" ({held} held after a permanent error; use --retry-failed)" if held else ""
        parts.append(f"{counts['failed']} users failed{note}")
    if counts["skipped"]:
        parts.append(f"{counts['skipped']} users skipped")
    if counts["pending"]:
        parts.append(f"{counts['pending']} changes pending")
    see = [f"`audience-sync history {run_id}`"] if counts["rejected_rows"] else []
    if counts["failed"] or counts["skipped"]:
        see.append("`audience-sync history --failed`")
    return "; ".join(parts) + (f"; see {' and '.join(see)}" if see else "")


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
    initial: bool = False,
    schema_checked: bool = False,
) -> SyncResult:
    """Sync the selected audiences (all by default) to the configured destination.

    ``dry_run`` plans and reports without changing anything (not even creating a missing
    SQLite file). ``destination`` replaces the configured one (tests inject a fault-injecting
    destination this way). ``force`` skips the safeguards; ``initial`` only the one against an
    initial sync from a lost state; ``wait`` is how long to wait for another process's run of
    an audience to end. Once ``should_stop()`` is true no new change is sent, and in-flight ones
    get ``[service] stop_timeout`` to finish. ``schema_checked``: the caller has already brought
    the state schema up to date (``serve`` does, once at start and on reload), so the run does
    not check it again.
    """
    selected = config.select(audiences)
    engine, dest = open_resources(config, destination, create=not dry_run)
    try:
        store = StateStore(engine, clock)
        if dry_run:
            if sa.inspect(engine).has_table("sync_audiences") and not schema_is_current(engine):
                raise StateError("the state database needs `audience-sync db upgrade` first")
            # Only a destination that prices a plan (Crisp: requests) pays for collecting it.
            changed: dict[str, Identity] | None = {} if dest.prices_plans else None
            planned = plan_all(
                config,
                store,
                dest.name,
                selected,
                full=full,
                changed=changed,
                force=force,
                evidence=None if force or initial else _previous_sync(config, store, dest),
            )
            updates = [UserUpdate(u, identity, ()) for u, identity in (changed or {}).items()]
            cost = dest.describe_plan(updates) if updates else {}
            return SyncResult(dest.name, True, planned, cost, _orphans(config, store, dest.name))
        ready(config, engine, dest, schema_checked=schema_checked)
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
        evidence = None if force or initial else _previous_sync(config, store, dest)
        orphans = _orphans(config, store, dest.name)
        for warning in orphans:
            log.warning("%s", warning)
        results: list[AudienceResult] = []
        try:
            for i, audience in enumerate(selected):
                if progress is not None:
                    progress("planning", audience.trait_key, i, len(selected))
                early = run.prepare(audience)
                if early is not None:
                    results.append(early)
            results.extend(run.guard_initial_sync(evidence))
        except BaseException as exc:
            run.abort(exc)
            raise
        results.extend(run.complete())
        order = {a.trait_key: i for i, a in enumerate(selected)}
        results.sort(key=lambda r: order[r.audience.trait_key])
        return SyncResult(dest.name, False, results, warnings=orphans)
    finally:
        engine.dispose()


def retire(
    config: Config,
    name: str,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    clock: Clock = utc_now,
    destination: Destination | None = None,
    wait: float = 0.0,
) -> SyncResult:
    """Send ``false`` to every user the state holds as a member of audience ``name`` (its name
    or key in the state, for the configured destination), then drop the audience's state.

    For an audience removed from the config, whose trait would otherwise stay ``true`` for
    good. Like a run it is recorded in ``sync_runs`` (mode ``retire``), spends the destination's
    quota and stops on ``should_stop``; re-running it finishes the job, sending only to the
    members not yet confirmed. Users held after a permanent error are tried again.
    """
    database = sqlite_path(config.state.url)
    if database is not None and not database.exists():
        raise NotFound(f"no state database at {database}, so no audience {name!r} to retire")
    engine, dest = open_resources(config, destination)
    try:
        store = StateStore(engine, clock)
        ref = store.find_audience(dest.name, name, by_name=True) if store.has_history() else None
        if ref is None:
            raise NotFound(
                f"no audience {name!r} (by name or key) in the state for destination "
                f"{dest.name!r}; `audience-sync history` lists the audiences it has run"
            )
        if any(a.trait_key == ref.key for a in config.audiences):
            raise ConfigError(
                f"{config.path}: audience {ref.name!r} ({ref.key}) is still configured; remove "
                "it from the config first, or the next run would sync it again"
            )
        if store.retire_done(ref.id):
            raise NotFound(
                f"audience {ref.name!r} ({ref.key}) has no members in the state for destination "
                f"{dest.name!r}: it was retired already, or never had any; nothing to send"
            )
        # The audience is no longer configured: it is known by its state's name and key only.
        kind = ComputedTraitConfig if ref.kind is SyncKind.TRAIT else AudienceConfig
        audience = kind.model_construct(name=ref.name, key=ref.key)
        if dry_run:
            members = store.members(ref.id)
            counts = dict.fromkeys(COUNTERS[:5], 0) | {"exited": len(members)}
            sample = [{"user_id": str(u), ref.key: False} for u in members[:SAMPLE_SIZE]]
            planned = AudienceResult(
                audience,
                RunStatus.SUCCEEDED,
                RunMode.RETIRE,
                None,
                counts | {"pending": len(members)},
                sample=sample,
            )
            return SyncResult(dest.name, True, [planned])
        ready(config, engine, dest)
        run = _Run(
            config,
            store,
            RunLock(engine, ttl=config.service.lock_ttl, clock=clock),
            dest,
            full=False,
            retry_failed=True,
            trigger=Trigger.MANUAL,
            progress=progress,
            should_stop=should_stop,
            wait=wait,
        )
        early = run.prepare_retire(audience, ref)
        if early is not None:
            return SyncResult(dest.name, False, [early])
        results = run.complete()
        if results[0].status is RunStatus.SUCCEEDED:
            store.drop_audience_state(ref.id)
            log.info("audience=%s retired: its state is dropped", ref.key)
        return SyncResult(dest.name, False, results)
    finally:
        engine.dispose()


def _previous_sync(config: Config, store: StateStore, dest: Destination) -> str | None:
    """Why the destination counts as synced before, when the state holds nothing for it."""
    if not store.holds_nothing(dest.name):
        return None
    if config.safeguards.destination_synced_before:
        return "[safeguards] destination_synced_before = true"
    return dest.previous_sync()


def _orphans(config: Config, store: StateStore, destination: str) -> list[str]:
    """A warning per audience the state holds members of but the config no longer lists."""
    configured = {a.trait_key for a in config.audiences}
    return [
        (
            f"computed trait {ref.name!r} ({ref.key}) has values in the state but is no longer "
            f"in {config.path}: its values stay on the profiles. `audience-sync retire "
            f"{ref.key}` clears them and drops its state."
            if ref.kind is SyncKind.TRAIT
            else f"audience {ref.name!r} ({ref.key}) has members in the state but is no longer "
            f"in {config.path}: its trait stays true on their profiles. `audience-sync retire "
            f"{ref.key}` sets it to false for them and drops its state."
        )
        for ref in store.with_members(destination)
        if ref.key not in configured
    ]
