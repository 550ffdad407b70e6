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
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import sqlalchemy as sa

from audience_sync.changes import AudienceChanges, ChangeSpool, RunChanges
from audience_sync.config import AudienceConfig, Config
from audience_sync.delivery import COMMITS_IN_FLIGHT, Delivery, Ended
from audience_sync.destinations import Destination
from audience_sync.diff import Plan
from audience_sync.errors import (
    AlreadyRunning,
    AudienceSyncError,
    ConfigError,
    SafeguardError,
    SnapshotError,
    StateError,
    StateMissing,
)
from audience_sync.model import (
    Identity,
    RejectedRow,
    RunMode,
    RunStatus,
    Snapshot,
    Trigger,
    UserUpdate,
)
from audience_sync.planning import (
    SAMPLE_SIZE,
    load_and_plan,
    orphans,
    plan_all,
    plan_counts,
    run_mode,
    synced_before,
)
from audience_sync.progress import Progress
from audience_sync.result import AudienceResult, SyncResult, partial_reason
from audience_sync.runtime import open_destination, open_resources, prepare_schema, ready
from audience_sync.safeguards import check_initial_sync, check_snapshot
from audience_sync.sources.fingerprint import SourceFingerprint
from audience_sync.state import AudienceRef, Lease, RunLock, StateStore, fingerprints
from audience_sync.state.fingerprints import Confirmed, record
from audience_sync.state.ledger import AudienceLedger, Ledger
from audience_sync.state.membercache import MemberCache
from audience_sync.state.store import COUNTERS, Clock, holder_id, schema_is_current, utc_now
from audience_sync.unchanged import confirmed_fact, fingerprint, matching, skipped_plan

__all__ = [
    "AudienceResult",
    "SyncResult",
    "open_destination",
    "prepare_schema",
    "sync",
]

log = logging.getLogger("audience_sync")

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
        self.lock = lock = RunLock(store.engine, ttl=config.service.lock_ttl, clock=store.clock)
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
        # Each audience's changes, added as it is planned (on disk past a size: changes.py).
        self.spool = ChangeSpool()
        folder = config.state.member_cache_folder()
        self.member_cache = MemberCache(folder) if folder is not None else None
        # Commits at once for a batch destination: see Delivery._commit_behind. A per-user
        # destination's confirmations are committed before it is resumed (Delivery.run).
        postgres = store.engine.dialect.name == "postgresql"
        parallel = postgres and destination.takes_batches
        self.delivery = Delivery(
            destination,
            self.ledger,
            renew=lambda conn: lock.renew([r.lease for r in self.runs], conn),
            should_stop=should_stop,
            stop_timeout=config.service.stop_timeout.total_seconds(),
            heartbeat_every=max(lock.ttl.total_seconds() / 3, 0.05),
            commits_in_flight=COMMITS_IN_FLIGHT if parallel else 1,
            progress=progress,
        )

    # -- planning --------------------------------------------------------------------------

    def prepare(self, audience: AudienceConfig) -> AudienceResult | None:
        """Lock, start the run row, load and plan one audience; a result when it cannot go on."""
        dest = self.destination.name
        try:
            ref = self.store.audience(dest, audience.trait_key, audience.name, audience.kind)
        except ConfigError as exc:  # the key's state is of the other kind
            log.error("audience=%s status=failed %s", audience.trait_key, exc)
            other = self.store.find_audience(dest, audience.trait_key)  # as the dry run says
            mode = run_mode(self.store, other.id if other else None, full=self.full)
            return AudienceResult(
                audience, RunStatus.FAILED, mode, error=str(exc), error_type=ConfigError
            )
        mode = run_mode(self.store, ref.id, full=self.full)
        now = fingerprint(audience) if self.config.state.skip_unchanged else None
        begun = self._begin(audience, ref, mode, now)
        if isinstance(begun, AudienceResult):
            return begun
        lease, run_id, stored = begun
        same = matching(stored, audience, now, mode, self.config.safeguards)
        if same is not None and now is not None:
            return self._skip(audience, ref, mode, lease, run_id, same, now)
        # The member cache: read the state's members from the file the fingerprint row names,
        # and write this snapshot's, which the row this run may record will name.
        cache = self.member_cache if now is not None and not audience.computed else None
        cached = None
        if cache is not None and stored is not None and stored.members_cache is not None:
            cached = functools.partial(cache.read, ref.id, stored.members_cache, stored.members)
        written: list[str | None] = []

        def keep(ids: pd.Index) -> None:
            if cache is not None:
                written.append(cache.write(ref.id, ids))

        started = time.perf_counter()
        try:
            snapshot, the_plan = load_and_plan(
                audience, self.store, ref.id, full=self.full, cached=cached, keep=keep
            )
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
        identities = the_plan.sent  # the snapshot rows of the users it sends `true`
        fact = confirmed_fact(audience, now, run_id, snapshot, the_plan)
        if fact is not None and written and written[0] is not None:
            fact = dataclasses.replace(fact, members_cache=written[0])
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
        if self.member_cache is not None:  # a retired audience's members are never read again
            self.member_cache.prune(ref.id)
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
        the snapshot's fingerprint ``now``: also the state's fingerprint row, if any (what
        snapshot the state is known to equal, and the member cache's file)."""
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
        stored = fingerprints.confirmed(self.store.engine, ref.id) if now is not None else None
        run_id = self.store.start_run(ref, mode=mode.value, trigger=self.trigger.value)
        self.lock.attach_run(lease, run_id)
        log.info("audience=%s run=%d mode=%s started", audience.trait_key, run_id, mode.value)
        return lease, run_id, stored

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
            previous_values=the_plan.previous,
        )
        ledger.settle_retries(
            self.store,
            the_plan.entered,
            the_plan.resend,
            the_plan.exited,
            identities["value"] if audience.computed and len(identities) else None,
        )
        self.spool.add(
            AudienceChanges(
                ref.key,
                audience.name,
                run_id,
                the_plan,
                identities,
                ledger.retry,
                audience.computed,
            )
        )
        # The spool has the changes now: keep the plan's counts, not its ids.
        the_plan = dataclasses.replace(
            the_plan,
            entered=_NO_USERS,
            exited=_NO_USERS,
            resend=_NO_USERS,
            sent=_no_identities(),
            previous=None,
        )
        run = _AudienceRun(
            audience, ref, lease, run_id, mode, _no_identities(), the_plan, ledger, rejected
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
                    r.counts["entered"] for r in self.runs if r.mode is RunMode.INITIAL
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
            self.spool.close()
            self.spool = ChangeSpool()
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
            spool=self.spool,
        )
        for run, held, resent in zip(self.runs, changes.held, changes.resent, strict=True):
            run.ledger.resend = resent  # filled as batches go out, emptied as they are recorded
            run.held_failed = held
            if held:  # counted failed now, so a killed run's row adds up too
                run.counts["pending"] -= held
                run.counts["failed"] += held
                self.store.update_run(
                    run.run_id, pending=run.counts["pending"], failed=run.counts["failed"]
                )
        return changes

    def complete(self) -> list[AudienceResult]:
        """Deliver every planned change and record how each audience's run ended."""
        try:
            ended = asyncio.run(self.delivery.run(self.changes()))
        except BaseException as exc:
            self.abort(exc)
            raise
        return self.finish(ended)

    def abort(self, exc: BaseException) -> None:
        """Leave no run marked running and no lock held for an error we can see."""
        message = str(exc) if isinstance(exc, AudienceSyncError) else f"unexpected error: {exc!r}"
        status = RunStatus.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else RunStatus.FAILED
        self.spool.close()
        with contextlib.suppress(Exception):
            self.delivery.commit()  # what the destination confirmed is kept
        with contextlib.suppress(Exception):
            error_type = type(exc) if isinstance(exc, AudienceSyncError) else None
            self.finish(Ended(status, message, error_type))

    def finish(self, ended: Ended) -> list[AudienceResult]:
        """Record how each audience's run ended, release the locks; the results."""
        results = []
        for run in self.runs:
            counts = run.counts
            status = ended.status or RunStatus.SUCCEEDED
            message = ended.error
            if ended.status is RunStatus.PARTIAL and not counts["pending"]:
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
                message = partial_reason(counts, run.run_id, run.held_failed, run.plan.exits_held)
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
                    ended.error_type if status is RunStatus.FAILED else None,
                    run.rejected,
                )
            )
        self.lock.release([r.lease for r in self.runs])
        self.spool.close()
        return results


def _no_identities() -> pd.DataFrame:
    """An empty identity frame of its own (a slice of a real one would keep all its rows)."""
    return pd.DataFrame(index=_NO_USERS)


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
        if dry_run:  # it changes nothing, the schema included
            if sa.inspect(engine).has_table("sync_audiences") and not schema_is_current(engine):
                raise StateError("the state database needs `audience-sync db upgrade` first")
        else:
            ready(config, engine, dest, schema_checked=schema_checked)
        # Read with the schema current: what the lost-state guard goes on, and the warnings.
        evidence = (
            None
            if force or initial
            else synced_before(config, store, dest.name, dest.previous_sync)
        )
        warnings = orphans(config, store, dest.name)
        if dry_run:
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
                evidence=evidence,
            )
            updates = [UserUpdate(u, identity, ()) for u, identity in (changed or {}).items()]
            cost = dest.describe_plan(updates) if updates else {}
            return SyncResult(dest.name, True, planned, cost, warnings)
        run = _Run(
            config,
            store,
            dest,
            full=full,
            retry_failed=retry_failed,
            trigger=trigger,
            progress=progress,
            should_stop=should_stop,
            force=force,
            wait=wait,
        )
        for warning in warnings:
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
        return SyncResult(dest.name, False, results, warnings=warnings)
    finally:
        engine.dispose()
