"""Retiring an audience: ``false`` (or a cleared value) for every member the state holds.

For an audience or computed trait removed from the config, whose trait would otherwise stay
on the profiles for good. A retire is a run of the engine's pipeline (``engine._Run``) whose
plan is "every member exits", recorded in ``sync_runs`` with mode ``retire``; once every exit
is confirmed, the audience's state is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from audience_sync.config import AudienceConfig, ComputedTraitConfig, Config, sqlite_path
from audience_sync.destinations import Destination
from audience_sync.engine import _Run
from audience_sync.errors import ConfigError, NotFound
from audience_sync.model import RunMode, RunStatus, SyncKind, Trigger
from audience_sync.planning import SAMPLE_SIZE
from audience_sync.progress import Progress
from audience_sync.result import AudienceResult, SyncResult
from audience_sync.runtime import open_resources, ready
from audience_sync.state import StateStore
from audience_sync.state.store import COUNTERS, Clock, utc_now

__all__ = ["retire"]

log = logging.getLogger("audience_sync")


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
