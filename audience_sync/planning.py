"""Planning one audience: load its snapshot and diff it against the synced state, in memory or
pushed down into the state database; and the dry run, which plans every audience and sends
nothing. The engine calls these; they send nothing and write nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa
import sqlalchemy as sa

from audience_sync import pushdown
from audience_sync.config import AudienceConfig, Config
from audience_sync.diff import Plan, RepeatedIds, plan
from audience_sync.errors import ConfigError, SafeguardError, SnapshotError, StateMissing
from audience_sync.model import Identity, RunMode, RunStatus, Snapshot, SyncKind
from audience_sync.result import AudienceResult
from audience_sync.safeguards import check_initial_sync, check_snapshot
from audience_sync.sources import RawSnapshot, read_snapshot
from audience_sync.state import StateStore
from audience_sync.state.audiences import kind_changed

__all__ = [
    "SAMPLE_SIZE",
    "collect_changed",
    "load_and_plan",
    "orphans",
    "plan_all",
    "plan_counts",
    "run_mode",
    "synced_before",
]

#: Changes shown per audience by a dry run (and rejected rows logged per audience).
SAMPLE_SIZE = 5


def run_mode(store: StateStore, audience_id: int | None, *, full: bool) -> RunMode:
    """Full when asked; incremental once a run of the audience has succeeded; else initial."""
    if full:
        return RunMode.FULL
    if audience_id is not None and store.has_succeeded(audience_id):
        return RunMode.INCREMENTAL
    return RunMode.INITIAL


def plan_counts(snapshot: Snapshot, the_plan: Plan) -> dict[str, int]:
    """The ``sync_runs`` counters a plan fixes before anything is sent."""
    return {
        "snapshot_rows": snapshot.rows,
        "rejected_rows": snapshot.rejected_count,
        "entered": len(the_plan.entered),
        "exited": len(the_plan.exited),
        "unchanged": the_plan.unchanged,
    }


def hold_exits(snapshot: Snapshot, the_plan: Plan) -> Plan:
    """The plan without its exits when the snapshot had rejected rows.

    A rejected row (an empty or unprintable ``user_id``) may be any member's: a user missing
    from such a snapshot has not been shown to leave, so nobody is sent ``false`` until a clean
    snapshot says so. The held users stay members in the state (counted ``unchanged``).
    """
    if not snapshot.rejected_count or not len(the_plan.exited):
        return the_plan
    held = len(the_plan.exited)
    return dataclasses.replace(
        the_plan,
        exited=the_plan.exited[:0],
        unchanged=the_plan.unchanged + held,
        exits_held=held,
    )


def load_and_plan(
    audience: AudienceConfig,
    store: StateStore,
    audience_id: int | None,
    *,
    full: bool,
    cached: Callable[[], pd.Index | None] | None = None,
    keep: Callable[[pd.Index], None] | None = None,
) -> tuple[Snapshot, Plan]:
    """Load and diff one audience, inside the state database when its query lives there.

    Either way the snapshot is read once and diffed once (in memory: validated and diffed
    again when an id repeats), and the result means the same: the plan carries the rows of the
    users it sends ``true`` (``Plan.sent``) and the snapshot its counts, rejected rows and age,
    its ``members`` emptied (nothing after planning needs them; the rows sent are in the plan).
    Exits are held while the snapshot has rejected rows (``hold_exits``).

    ``cached`` reads the state's members from elsewhere than the database (the member cache),
    or returns None when it cannot; the database is read then. ``keep`` is given the
    snapshot's member ids before they are dropped (to write the member cache).
    """
    snapshot, the_plan = _load_and_plan(
        audience, store, audience_id, full=full, cached=cached, keep=keep
    )
    return snapshot, hold_exits(snapshot, the_plan)


def _load_and_plan(
    audience: AudienceConfig,
    store: StateStore,
    audience_id: int | None,
    *,
    full: bool,
    cached: Callable[[], pd.Index | None] | None,
    keep: Callable[[pd.Index], None] | None,
) -> tuple[Snapshot, Plan]:
    if audience_id is not None and pushdown.applies(audience, store.engine):
        return pushdown.plan_in_database(store.engine, audience, audience_id, full=full)
    # A computed trait is diffed the same way, its values compared too (``synced_values``).
    synced_values: pa.Array | None = None
    synced: pd.Index
    if audience_id is None:
        synced = pd.Index([], dtype="string[pyarrow]", name="user_id")
        if audience.computed:
            synced_values = pa.array([], pa.large_string())
        raw, snapshot = _read(audience)
    else:
        # The state read (the database's work, or reading and hashing the member cache's file)
        # overlaps reading and validating the snapshot (validated after it, a 4M run's memory
        # grew by 8 MB an audience until the CLI capped malloc's arenas: docs/scale.md).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-read") as pool:
            if audience.computed:
                read_values = pool.submit(store.values, audience_id)
                raw, snapshot = _read(audience)
                synced, synced_values = read_values.result()
            else:
                members = pool.submit(_members, store, audience_id, cached)
                raw, snapshot = _read(audience)
                synced = members.result()
    try:
        the_plan = _diffed(snapshot, synced, synced_values, full=full, unique=False)
    except RepeatedIds:  # validated in full (repeats collapsed or held, as always), diffed again
        snapshot = raw.validate()
        the_plan = _diffed(snapshot, synced, synced_values, full=full, unique=True)
    del raw
    rows = snapshot.members
    if keep is not None:
        keep(rows.index)
    return dataclasses.replace(snapshot, members=rows.iloc[:0]), the_plan


def _read(audience: AudienceConfig) -> tuple[RawSnapshot, Snapshot]:
    """``audience``'s snapshot as read, and validated but for repeated ids.

    Repeated ids are left to the diff, which proves most ids unique from its own counts
    (``diff.plan(..., unique=False)``): validation looked for them by hashing and sorting every
    id, 0.02 s of CPU per 500,000 and 0.2 s per 2.5M.
    """
    raw = read_snapshot(audience)
    return raw, raw.validate(repeats=False)


def _diffed(
    snapshot: Snapshot,
    synced: pd.Index,
    synced_values: pa.Array | None,
    *,
    full: bool,
    unique: bool,
) -> Plan:
    """``snapshot`` diffed against the state; ``unique=False``: its repeated ids not looked
    for yet (``RepeatedIds`` if one repeats)."""
    rows = snapshot.members
    values = None
    if synced_values is not None:
        values = (pa.array(rows["value"].array), synced_values)
    return plan(rows, synced, full=full, held=snapshot.held, values=values, unique=unique)


def _members(
    store: StateStore, audience_id: int, cached: Callable[[], pd.Index | None] | None
) -> pd.Index:
    found = cached() if cached is not None else None
    return found if found is not None else store.members(audience_id)


def sample_changes(audience: AudienceConfig, p: Plan) -> list[dict[str, Any]]:
    """A few of the changes a plan sends, as ``{user_id, trait_key: value}`` (dry runs)."""
    key = audience.trait_key
    sample: list[dict[str, Any]] = []
    for ids, value in ((p.entered, True), (p.resend, True), (p.exited, False)):
        for u in ids[:SAMPLE_SIZE]:
            shown: Any = value
            if audience.computed:  # the value itself, or None for a clear
                shown = orjson.loads(str(p.sent["value"].get(u))) if value else None
            sample.append({"user_id": str(u), key: shown})
    return sample[: SAMPLE_SIZE * 2]


def collect_changed(changed: dict[str, Identity], p: Plan) -> None:
    """Each user a plan sends to, with the email the destination may need to create them."""
    for ids in (p.entered, p.resend):
        if "email" in p.sent.columns:
            emails = p.sent["email"].reindex(ids).tolist()
        else:
            emails = [None] * len(ids)
        for user_id, email in zip(ids.tolist(), emails, strict=True):
            if isinstance(email, str) or user_id not in changed:
                changed[str(user_id)] = Identity(email=email if isinstance(email, str) else None)
    for user_id in p.exited.tolist():
        changed.setdefault(str(user_id), Identity())


def plan_all(
    config: Config,
    store: StateStore,
    dest_name: str,
    audiences: Sequence[AudienceConfig],
    *,
    full: bool,
    changed: dict[str, Identity] | None,
    force: bool = False,
    evidence: str | None = None,
) -> list[AudienceResult]:
    """The dry run: plan every audience, send nothing, write nothing; ``changed`` (if given)
    collects the users the plans send to.

    The safeguards are applied as a run would (unless ``force``): a refused audience is
    ``failed`` with the reason, and ``evidence`` that the destination was synced before arms
    the guard against an initial sync from a lost state (``check_initial_sync``).
    """
    has_state = sa.inspect(store.engine).has_table("sync_audiences")
    results = []
    for audience in audiences:
        ref = store.find_audience(dest_name, audience.trait_key) if has_state else None
        mode = run_mode(store, ref.id if ref is not None else None, full=full)
        if ref is not None and ref.kind is not audience.kind:  # as a run refuses it
            error = kind_changed(dest_name, audience.trait_key, audience.name, ref.kind)
            results.append(
                AudienceResult(
                    audience, RunStatus.FAILED, mode, error=str(error), error_type=ConfigError
                )
            )
            continue
        try:
            snapshot, p = load_and_plan(
                audience, store, ref.id if ref is not None else None, full=full
            )
        except SnapshotError as exc:
            results.append(
                AudienceResult(
                    audience, RunStatus.FAILED, mode, error=str(exc), error_type=SnapshotError
                )
            )
            continue
        sample = sample_changes(audience, p)
        counts = plan_counts(snapshot, p) | {"pending": p.sends}
        result = AudienceResult(
            audience, RunStatus.SUCCEEDED, mode, None, counts, None, None, snapshot.rejected, sample
        )
        try:
            if not force:
                check_snapshot(audience, p, snapshot, config.safeguards, store.clock())
        except SafeguardError as exc:
            result.status, result.error, result.error_type = (
                RunStatus.FAILED,
                str(exc),
                SafeguardError,
            )
            result.sample = []  # a refused audience would send nothing
        else:
            if changed is not None:
                collect_changed(changed, p)
        results.append(result)
    planned = [r for r in results if r.error is None]
    try:
        check_initial_sync(
            destination=dest_name,
            evidence=evidence,
            memberships=sum(r.counts["entered"] for r in planned if r.mode is RunMode.INITIAL),
            limit=config.safeguards.max_initial_sync,
        )
    except StateMissing as exc:
        for r in planned:
            r.status, r.error, r.error_type = RunStatus.FAILED, str(exc), StateMissing
            r.sample = []
        if changed is not None:
            changed.clear()
    return results


def synced_before(
    config: Config, store: StateStore, destination: str, previous_sync: Callable[[], str | None]
) -> str | None:
    """Why the destination counts as synced before when the state holds nothing for it (the
    evidence the lost-state safeguard refuses an initial sync on); ``previous_sync`` asks the
    destination itself."""
    if not store.holds_nothing(destination):
        return None
    if config.safeguards.destination_synced_before:
        return "[safeguards] destination_synced_before = true"
    return previous_sync()


def orphans(config: Config, store: StateStore, destination: str) -> list[str]:
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
