"""``audience-sync serve``: run each audience on its schedule until told to stop.

A thin shell over ``engine.sync``: an APScheduler 3 ``BackgroundScheduler`` with one job per
audience (``max_instances=1``, ``coalesce``, ``misfire_grace_time``), signals handled in the main
thread. One run per audience across processes is the run lock's job (``state/lock.py``), not the
scheduler's: APScheduler 3 cannot share its job store between processes.

SIGTERM/SIGINT: no new runs; running ones stop pulling changes, finish in-flight requests (up to
``[service] stop_timeout``), commit and end ``interrupted``; then exit 0. A second signal exits
at once. SIGHUP: reload the config file; a bad one is logged and the running config kept.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import FrameType

import sqlalchemy as sa
from apscheduler.schedulers.background import BackgroundScheduler

from audience_sync.alerts import Alerter
from audience_sync.clock import Clock, utc_now
from audience_sync.config import AudienceConfig, Config, load_config
from audience_sync.destinations.budget import requests_used
from audience_sync.engine import sync
from audience_sync.errors import AudienceSyncError, ExitCode
from audience_sync.history import status
from audience_sync.metrics import RunMetrics
from audience_sync.model import Trigger
from audience_sync.progress import ProgressLog
from audience_sync.result import SyncResult
from audience_sync.runtime import open_state, prepared_state
from audience_sync.schedule import describe, missed_run, trigger
from audience_sync.state import StateStore

__all__ = ["Service"]

log = logging.getLogger("audience_sync.service")

#: Seconds between looks for overdue audiences (only with ``[alerts]`` configured).
OVERDUE_CHECK_EVERY = 60.0


def _timing(audience: AudienceConfig) -> tuple[str | None, float | None]:
    """What decides an audience's fire times (a change means rescheduling its job)."""
    interval = audience.interval.total_seconds() if audience.interval is not None else None
    return audience.schedule, interval


class Service:
    """The scheduler of one config file; ``run()`` blocks until a stop signal."""

    def __init__(self, config_path: Path, *, clock: Clock = utc_now) -> None:
        self.config_path = config_path
        self.clock = clock
        self.config = load_config(config_path)
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self._reload_requested = False
        self._signals = 0
        self._running: set[str] = set()
        self.scheduler = BackgroundScheduler(timezone=self.config.service.timezone)
        self.metrics = RunMetrics(self.config.service)

    # -- scheduling ---------------------------------------------------------------------------

    def _last_starts(self, config: Config) -> dict[str, datetime]:
        # The one schema check of this config: its runs, which may start at the same moment,
        # skip theirs.
        with prepared_state(config) as engine:
            store = StateStore(engine)
            keys = [a.trait_key for a in config.audiences]
            starts: dict[str, datetime] = {}
            for row in store.runs(
                destination=config.destination.name, audience_keys=keys, limit=len(keys) * 50
            ):
                starts.setdefault(row["audience_key"], row["started_at"])
            return starts

    def _apply_schedule(self, config: Config, previous: Config | None) -> None:
        """Add, reschedule and remove jobs so there is one per scheduled audience of ``config``."""
        now = self.clock()
        starts = self._last_starts(config)
        old = {a.trait_key: a for a in previous.audiences} if previous is not None else {}
        zone_changed = previous is not None and previous.service.timezone != config.service.timezone
        grace = int(config.service.misfire_grace.total_seconds())
        wanted = set()
        for audience in config.audiences:
            key = audience.trait_key
            t = trigger(audience, config.service, last_start=starts.get(key))
            if t is None:
                log.warning(
                    "audience=%s has no schedule or interval: not scheduled (run it by hand)", key
                )
                continue
            wanted.add(key)
            job = self.scheduler.get_job(key)
            if job is None:
                missed = missed_run(audience, config.service, starts.get(key), now)
                extra = {"next_run_time": now} if missed is not None else {}
                if missed is not None:
                    log.info(
                        "audience=%s missed its run of %s UTC: running it now",
                        key,
                        f"{missed:%Y-%m-%d %H:%M:%S}",
                    )
                self.scheduler.add_job(
                    self._run_audience,
                    t,
                    args=[key],
                    id=key,
                    name=audience.name,
                    max_instances=1,
                    coalesce=True,
                    misfire_grace_time=grace,
                    **extra,
                )
                if previous is not None:
                    log.info("audience=%s added (%s)", key, describe(audience))
                continue
            job.modify(name=audience.name, misfire_grace_time=grace)
            if zone_changed or _timing(old[key]) != _timing(audience):
                job.reschedule(t)
                log.info("audience=%s rescheduled (%s)", key, describe(audience))
        for job in self.scheduler.get_jobs():
            if job.id not in wanted:
                job.remove()
                log.info("audience=%s removed from the schedule", job.id)

    def _log_next_runs(self) -> None:
        for job in self.scheduler.get_jobs():
            audience = next(a for a in self.config.audiences if a.trait_key == job.id)
            log.info(
                "audience=%s schedule=%r next_run=%s",
                job.id,
                describe(audience),
                job.next_run_time.isoformat() if job.next_run_time else "-",
            )

    # -- one scheduled run --------------------------------------------------------------------

    def _run_audience(self, key: str) -> None:
        config = self.config  # a reload mid-run does not change this run
        self._running.add(key)  # before the stop check, so run() cannot miss this run
        if self.stopping.is_set() or key not in {a.trait_key for a in config.audiences}:
            self._running.discard(key)
            return
        started = time.monotonic()
        result: SyncResult | None = None
        try:
            with ProgressLog(config.service.progress_every.total_seconds()).running() as progress:
                result = sync(
                    config,
                    audiences=[key],
                    trigger=Trigger.SCHEDULE,
                    should_stop=self.stopping.is_set,
                    progress=progress,
                    schema_checked=True,
                )
        except AudienceSyncError as exc:
            log.error("audience=%s run failed: %s", key, exc)
            Alerter(config).failed(config.select([key]), exc)
        except Exception as exc:
            log.exception("audience=%s run failed with an unexpected error", key)
            Alerter(config).failed(config.select([key]), exc)
        finally:
            self._running.discard(key)
        if result is not None:
            Alerter(config).after_run(result)
        if self.metrics.enabled:
            self._observe(config, key, result, time.monotonic() - started)
        if result is None:
            return
        job = None if self.stopping.is_set() else self.scheduler.get_job(key)
        if job is not None and job.next_run_time is not None:
            log.info("audience=%s next_run=%s", key, job.next_run_time.isoformat())

    def _observe(
        self, config: Config, key: str, result: SyncResult | None, duration: float
    ) -> None:
        """Update the metrics after a run; a metrics problem is logged, never fails the run.

        A run that raised instead of returning a result still counts, as failed.
        """
        try:
            if result is None:
                self.metrics.observe_crash(config.destination.name, key, duration, time.time())
                return
            with open_state(config.state.url) as engine:
                keys = [a.trait_key for a in config.audiences]
                queue = StateStore(engine).retry_counts(config.destination.name, keys)
                used = requests_used(engine, self.clock().date())
            self.metrics.observe(
                result, duration, time.time(), retry_queue=queue, requests_today=used
            )
        except OSError as exc:
            log.error("cannot write metrics to %s: %s", self.metrics.textfile, exc)
        except (AudienceSyncError, sa.exc.SQLAlchemyError) as exc:
            log.error("cannot read the state for the metrics: %s", exc)

    def _alert_overdue(self) -> None:
        config = self.config
        try:
            with open_state(config.state.url) as engine:
                report = status(config, engine, now=self.clock())
        except (AudienceSyncError, sa.exc.SQLAlchemyError) as exc:
            log.error("cannot read the state to look for overdue audiences: %s", exc)
            return
        Alerter(config).overdue(report)

    # -- signals and the main loop --------------------------------------------------------------

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            # Confirmed changes are already committed or will be re-sent by the next run: the
            # state never moves ahead of the destination, so leaving now loses nothing.
            os.write(2, f"second {signal.Signals(signum).name}: exiting now\n".encode())
            os._exit(ExitCode.killed_by(signum))
        self.stopping.set()
        self._wake.set()

    def _on_hangup(self, _signum: int, _frame: FrameType | None) -> None:
        self._reload_requested = True
        self._wake.set()

    def reload(self) -> bool:
        """Re-read the config file; keep the running one when the new one is invalid."""
        try:
            new = load_config(self.config_path)
            # Rescheduling can fail (e.g. the state needs `db upgrade`): only then is the new
            # config the running one.
            self._apply_schedule(new, self.config)
            self.config = new
        except AudienceSyncError as exc:
            log.error("config reload rejected, still running the previous configuration: %s", exc)
            return False
        log.info("config reloaded from %s: %d audiences", self.config_path, len(new.audiences))
        self._log_next_runs()
        return True

    def run(self, *, ready: Callable[[], None] | None = None) -> ExitCode:
        """Schedule, then block until SIGTERM/SIGINT; returns the exit code."""
        handlers = {
            signal.SIGTERM: self._on_stop,
            signal.SIGINT: self._on_stop,
            signal.SIGHUP: self._on_hangup,
        }
        previous = {s: signal.signal(s, h) for s, h in handlers.items()}
        try:
            self._apply_schedule(self.config, None)
            self.metrics.start()
            self.scheduler.start()
            log.info(
                "serving %d audiences from %s (pid %d)",
                len(self.scheduler.get_jobs()),
                self.config_path,
                os.getpid(),
            )
            self._log_next_runs()
            if ready is not None:
                ready()
            next_overdue_check = 0.0
            while not self.stopping.is_set():
                self._wake.wait(1.0)
                self._wake.clear()
                if self.config.alerts.enabled and time.monotonic() >= next_overdue_check:
                    next_overdue_check = time.monotonic() + OVERDUE_CHECK_EVERY
                    self._alert_overdue()
                if self._reload_requested and not self.stopping.is_set():
                    self._reload_requested = False
                    self.reload()
            log.info(
                "stopping: no new runs; waiting for running audiences %s to commit "
                "(in-flight requests get up to %.0fs)",
                sorted(self._running) or "(none)",
                self.config.service.stop_timeout.total_seconds(),
            )
            # Not shutdown(wait=True): it holds the job store lock while it waits for the jobs.
            self.scheduler.shutdown(wait=False)
            while self._running:
                time.sleep(0.05)
            log.info("stopped")
            return ExitCode.OK
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
