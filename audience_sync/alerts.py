"""Alerts for unattended runs: a Slack-compatible webhook and/or a command, told when a run
failed, went partial past ``[alerts] partial_failed_users``, was refused by a safeguard, was
stopped by the quota, or an audience is overdue (``serve``).

At most one alert per (destination, audience, condition) until the condition clears: the row in
``sync_alerts`` is the memory, shared by every process on the state database, and only the
process whose insert succeeds sends. A run that succeeds clears its audience's run conditions;
a run that starts clears ``overdue``. Sending never fails a sync: a problem is logged, without
the webhook URL (a secret), and the row is dropped so the next occurrence tries again.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import shlex
import socket
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from audience_sync.clock import Clock, utc_now
from audience_sync.config import AlertConfig, AudienceConfig, Config
from audience_sync.errors import AlreadyRunning, SafeguardError
from audience_sync.model import RunStatus
from audience_sync.result import AudienceResult, SyncResult
from audience_sync.runtime import open_state
from audience_sync.state.schema import sync_alerts

if TYPE_CHECKING:  # every run makes an Alerter; httpx loads only to send a webhook
    import httpx

    from audience_sync.history import StatusReport

__all__ = ["Alert", "Alerter", "Condition"]

log = logging.getLogger("audience_sync.alerts")


class Condition(enum.StrEnum):
    RUN_FAILED = "run_failed"
    RUN_PARTIAL = "run_partial"
    SAFEGUARD_REFUSED = "safeguard_refused"
    QUOTA_STOPPED = "quota_stopped"
    OVERDUE = "overdue"


#: What a finished run decides: it raises one of these, or none, and clears the others.
RUN_CONDITIONS = (
    Condition.RUN_FAILED,
    Condition.RUN_PARTIAL,
    Condition.SAFEGUARD_REFUSED,
    Condition.QUOTA_STOPPED,
)

_VERB = {
    Condition.RUN_FAILED: "run failed",
    Condition.RUN_PARTIAL: "run partial",
    Condition.SAFEGUARD_REFUSED: "snapshot refused by a safeguard",
    Condition.QUOTA_STOPPED: "stopped by the quota",
    Condition.OVERDUE: "overdue",
}


@dataclass(frozen=True, slots=True)
class Alert:
    condition: Condition
    destination: str
    audience: str
    audience_key: str
    message: str
    run_id: int | None = None
    pending: int | None = None

    def event(self, at: datetime) -> dict[str, Any]:
        """The JSON a command gets on stdin."""
        return {
            "event": self.condition.value,
            "destination": self.destination,
            "audience": self.audience,
            "audience_key": self.audience_key,
            "run_id": self.run_id,
            "message": self.message,
            "pending": self.pending,
            "at": at.isoformat(),
            "host": socket.gethostname(),
        }

    def text(self) -> str:
        """One line for a chat channel."""
        run = f" (run {self.run_id})" if self.run_id is not None else ""
        return (
            f"audience-sync: {self.audience} -> {self.destination}: "
            f"{_VERB[self.condition]}{run}: {self.message}"
        )


def condition_of(result: AudienceResult, settings: AlertConfig) -> Condition | None:
    """The condition a finished run raises (``None``: a healthy run, which clears them)."""
    counts = result.counts
    if result.status is RunStatus.FAILED:
        if result.error_type is SafeguardError:
            return Condition.SAFEGUARD_REFUSED
        return Condition.RUN_FAILED
    # QuotaExhausted ends the run partial with its message, which always starts "quota:".
    if result.status is RunStatus.PARTIAL and (result.error or "").startswith("quota:"):
        return Condition.QUOTA_STOPPED
    failed = counts.get("failed", 0) + counts.get("skipped", 0)
    if result.status is RunStatus.PARTIAL and failed >= settings.partial_failed_users:
        return Condition.RUN_PARTIAL
    return None


class Alerter:
    """Raises and clears the alerts of one config; every method swallows and logs its errors."""

    def __init__(
        self,
        config: Config,
        *,
        transport: httpx.BaseTransport | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.config = config
        self.settings = config.alerts
        self._transport = transport
        self.clock = clock

    def after_run(self, result: SyncResult) -> None:
        """Raise what ``result``'s audiences show, clear what they no longer show."""
        if not self.settings.enabled or result.dry_run:
            return
        raised: list[Alert] = []
        cleared: list[tuple[str, Iterable[Condition]]] = []
        for r in result.audiences:
            if r.status is RunStatus.INTERRUPTED or r.error_type is AlreadyRunning:
                continue  # says nothing about the audience's health
            key = r.audience.trait_key
            cleared.append((key, [Condition.OVERDUE]))  # it ran
            condition = condition_of(r, self.settings)
            cleared.append((key, [c for c in RUN_CONDITIONS if c is not condition]))
            if condition is not None:
                pending = r.counts.get("pending") if condition is Condition.QUOTA_STOPPED else None
                raised.append(
                    Alert(
                        condition,
                        result.destination,
                        r.audience.name,
                        key,
                        r.error or "",
                        r.run_id,
                        pending,
                    )
                )
        self._apply(raised, cleared)

    def failed(self, audiences: Iterable[AudienceConfig], error: Exception) -> None:
        """A run that raised before it had results (the state or destination unusable)."""
        if not self.settings.enabled or isinstance(error, AlreadyRunning):
            return
        dest = self.config.destination.name
        alerts = [
            Alert(Condition.RUN_FAILED, dest, a.name, a.trait_key, str(error)) for a in audiences
        ]
        self._apply(alerts, [])

    def overdue(self, report: StatusReport) -> None:
        """Raise ``overdue`` for the audiences ``report`` finds late; clear it for the others."""
        if not self.settings.enabled:
            return
        raised = [
            Alert(
                Condition.OVERDUE,
                report.destination,
                a.audience.name,
                a.audience.trait_key,
                next(p for p in a.problems if p.startswith("overdue")),
            )
            for a in report.audiences
            if a.overdue
        ]
        cleared = [(a.audience.trait_key, [Condition.OVERDUE]) for a in report.audiences]
        cleared = [(k, c) for k, c in cleared if k not in {a.audience_key for a in raised}]
        self._apply(raised, cleared)

    # -- the memory in sync_alerts ------------------------------------------------------------

    def _apply(
        self, raised: Sequence[Alert], cleared: Sequence[tuple[str, Iterable[Condition]]]
    ) -> None:
        with contextlib.ExitStack() as opened:
            engine: sa.Engine | None = None
            try:
                engine = opened.enter_context(open_state(self.config.state.url))
            except Exception as exc:
                log.error("alerts: cannot open the state database: %s", exc)
            for key, conditions in cleared:
                self._clear(engine, key, list(conditions))
            for alert in raised:
                if self._mark(engine, alert) and not self._send(alert):
                    self._clear(engine, alert.audience_key, [alert.condition])

    def _mark(self, engine: sa.Engine | None, alert: Alert) -> bool:
        """Record the alert; ``False`` when it is already raised (someone sent it)."""
        if engine is None:
            return True  # no memory to consult: better one alert too many than none
        row = {
            "destination": alert.destination,
            "audience_key": alert.audience_key,
            "condition": alert.condition.value,
            "raised_at": self.clock(),
            "run_id": alert.run_id,
            "message": alert.message,
        }
        try:
            with engine.begin() as conn:
                conn.execute(sync_alerts.insert().values(**row))
        except sa.exc.IntegrityError:
            return False
        except sa.exc.SQLAlchemyError as exc:
            log.error("alerts: cannot record %s: %s", alert.condition.value, exc)
        return True

    def _clear(self, engine: sa.Engine | None, key: str, conditions: list[Condition]) -> None:
        if engine is None or not conditions:
            return
        try:
            with engine.begin() as conn:
                conn.execute(
                    sync_alerts.delete().where(
                        sync_alerts.c.destination == self.config.destination.name,
                        sync_alerts.c.audience_key == key,
                        sync_alerts.c.condition.in_([c.value for c in conditions]),
                    )
                )
        except sa.exc.SQLAlchemyError as exc:
            log.error("alerts: cannot clear alerts of audience=%s: %s", key, exc)

    # -- delivery -----------------------------------------------------------------------------

    def _send(self, alert: Alert) -> bool:
        """Webhook and command; ``True`` when every configured one took the alert."""
        ok = True
        timeout = self.settings.timeout.total_seconds()
        if self.settings.webhook_url is not None:
            import httpx  # only here: a run with nothing to alert sends nothing

            try:
                with httpx.Client(timeout=timeout, transport=self._transport) as client:
                    response = client.post(self.settings.webhook_url, json={"text": alert.text()})
                if response.is_error:
                    ok = False
                    log.error(
                        "alerts: the webhook answered HTTP %d to %s for audience=%s",
                        response.status_code,
                        alert.condition.value,
                        alert.audience_key,
                    )
            except httpx.HTTPError as exc:
                ok = False
                # The exception's text may hold the URL, a secret: only its kind is logged.
                log.error("alerts: the webhook could not be reached (%s)", type(exc).__name__)
        if self.settings.command is not None:
            try:
                done = subprocess.run(
                    shlex.split(self.settings.command),
                    input=json.dumps(alert.event(self.clock())),
                    text=True,
                    capture_output=True,
                    timeout=timeout,
                    check=False,
                )
                if done.returncode != 0:
                    ok = False
                    log.error(
                        "alerts: command exited %d for %s: %s",
                        done.returncode,
                        alert.condition.value,
                        done.stderr.strip()[-500:],
                    )
            except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
                ok = False
                log.error("alerts: command failed: %s", exc)
        if ok:
            log.info("alerts: sent %s for audience=%s", alert.condition.value, alert.audience_key)
        return ok
