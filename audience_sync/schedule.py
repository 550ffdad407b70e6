"""When each audience runs: its cron ``schedule`` or ``interval`` as an APScheduler trigger.

Shared by ``serve`` (which runs the triggers) and ``status`` (which tells when a run is due or
overdue), so both read a schedule the same way.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from audience_sync.config import AudienceConfig, ServiceConfig
from audience_sync.durations import format_duration

__all__ = ["describe", "due_after", "missed_run", "trigger"]

_TICK = timedelta(microseconds=1)


def trigger(
    audience: AudienceConfig, service: ServiceConfig, *, last_start: datetime | None = None
) -> BaseTrigger | None:
    """The audience's trigger; ``None`` when it has no schedule (it runs only by hand).

    An interval counts from the audience's last run, so a restart does not reset the clock.
    """
    if audience.schedule is not None:
        return CronTrigger.from_crontab(audience.schedule, timezone=service.timezone)
    if audience.interval is not None:
        return IntervalTrigger(
            seconds=audience.interval.total_seconds(),
            start_date=last_start,
            timezone=service.timezone,
        )
    return None


def describe(audience: AudienceConfig) -> str:
    if audience.schedule is not None:
        return audience.schedule
    if audience.interval is not None:
        return f"every {format_duration(audience.interval)}"
    return "manual"


def due_after(
    audience: AudienceConfig, service: ServiceConfig, last_start: datetime
) -> datetime | None:
    """The first scheduled time after a run that started at ``last_start``."""
    t = trigger(audience, service, last_start=last_start)
    if t is None:
        return None
    due: datetime | None = t.get_next_fire_time(None, last_start + _TICK)
    return due


def missed_run(
    audience: AudienceConfig, service: ServiceConfig, last_start: datetime | None, now: datetime
) -> datetime | None:
    """A scheduled time the audience missed (while the service was down) that is still within
    ``misfire_grace`` of ``now``; ``None`` when nothing is to be made up.

    Never-run audiences missed nothing: they start on their schedule.
    """
    if last_start is None:
        return None
    since = max(last_start, now - service.misfire_grace)
    t = trigger(audience, service, last_start=last_start)
    if t is None:
        return None
    missed: datetime | None = t.get_next_fire_time(None, since + _TICK)
    return missed if missed is not None and missed <= now else None
