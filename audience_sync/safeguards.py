"""Safeguards: refuse a snapshot that looks broken before anything is sent.

A pure check over one audience's plan, its snapshot's size and age, and the configured limits;
the engine calls it right after planning and records a refused audience run as ``failed``.
An empty snapshot, one that would set too many current members to ``false``, or a stale one is
far more often a broken export than a real change, and undoing a wiped audience in Crisp is slow.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from audience_sync.config import AudienceConfig, SafeguardConfig
from audience_sync.diff import Plan
from audience_sync.durations import format_duration
from audience_sync.errors import SafeguardError, StateMissing
from audience_sync.model import Snapshot

__all__ = ["Limits", "check", "check_initial_sync", "check_snapshot", "limits_for"]


@dataclass(frozen=True, slots=True)
class Limits:
    """The safeguards that apply to one audience (its own settings over ``[safeguards]``)."""

    max_exit_ratio: float
    allow_empty: bool
    max_snapshot_age: timedelta | None


def limits_for(audience: AudienceConfig, defaults: SafeguardConfig) -> Limits:
    return Limits(
        max_exit_ratio=(
            audience.max_exit_ratio
            if audience.max_exit_ratio is not None
            else defaults.max_exit_ratio
        ),
        allow_empty=audience.allow_empty
        if audience.allow_empty is not None
        else defaults.allow_empty,
        max_snapshot_age=audience.max_snapshot_age or defaults.max_snapshot_age,
    )


def check(
    audience: AudienceConfig,
    the_plan: Plan,
    *,
    source: str,
    members: int,
    synced: int,
    taken_at: datetime | None,
    now: datetime,
    limits: Limits,
) -> None:
    """Raise ``SafeguardError`` saying why the snapshot is refused and how to override it.

    ``members`` is the snapshot's member count, ``synced`` the state's current member count.
    """
    force = f"`audience-sync run --audience {audience.name!r} --force`"
    if members == 0 and synced > 0 and not limits.allow_empty:
        raise SafeguardError(
            f"audience {audience.name!r}: snapshot {source} has no members, but {synced} users "
            f"are members now; syncing it would set all of them to false, so nothing was sent. "
            f"If the audience really is empty, run {force} or set allow_empty = true for it."
        )
    exited = len(the_plan.exited)
    if synced > 0 and members > 0 and exited / synced > limits.max_exit_ratio:
        raise SafeguardError(
            f"audience {audience.name!r}: snapshot {source} would set {exited} of {synced} "
            f"current members ({exited / synced:.0%}) to false, more than max_exit_ratio "
            f"{limits.max_exit_ratio:g} allows, so nothing was sent. Check the export; if the "
            f"change is real, run {force} or raise max_exit_ratio for this audience."
        )
    if limits.max_snapshot_age is None:
        return
    if taken_at is None:
        raise SafeguardError(
            f"audience {audience.name!r}: max_snapshot_age is set but the age of {source} is "
            "unknown; add a `snapshot_at` column to the query (or unset max_snapshot_age)"
        )
    age = now - taken_at
    if age > limits.max_snapshot_age:
        raise SafeguardError(
            f"audience {audience.name!r}: snapshot {source} was taken at "
            f"{taken_at:%Y-%m-%d %H:%M:%S} UTC, {format_duration(age)} ago, older than "
            f"max_snapshot_age {format_duration(limits.max_snapshot_age)}, so nothing was sent. "
            f"Check that the export still runs, or run {force}."
        )


def check_snapshot(
    audience: AudienceConfig,
    the_plan: Plan,
    snapshot: Snapshot,
    defaults: SafeguardConfig,
    now: datetime,
) -> None:
    """``check`` for one planned audience, as both a run and a dry run apply it."""
    check(
        audience,
        the_plan,
        source=snapshot.source,
        # Counted from the plan: a pushed-down diff loads only the entered members' rows.
        members=len(the_plan.entered) + the_plan.unchanged,
        synced=the_plan.unchanged + len(the_plan.exited),  # the state's members
        taken_at=snapshot.taken_at,
        now=now,
        limits=limits_for(audience, defaults),
    )


def check_initial_sync(
    *, destination: str, evidence: str | None, memberships: int, limit: int
) -> None:
    """Raise ``StateMissing`` when a run from a state that holds nothing for ``destination``
    would send more than ``limit`` memberships to a destination that shows earlier syncs.

    ``evidence`` says what shows them (None: nothing does). That is what a state database
    that moved or was lost looks like, and re-sending every member can cost days of quota.
    """
    if evidence is None or memberships <= limit:
        return
    raise StateMissing(
        f"the state database holds nothing for destination {destination!r}, but it was synced "
        f"before ({evidence}); this run would be an initial sync of {memberships:,} "
        f"memberships, more than [safeguards] max_initial_sync = {limit:,}, so nothing was sent. "
        "If the state database moved or was lost, point [state] url at it (a relative SQLite "
        "path is relative to the config file's folder). If this really is a first sync, run "
        "`audience-sync run --initial`."
    )
