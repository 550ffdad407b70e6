"""Prometheus metrics of the runs ``serve`` makes: off unless ``[service] metrics_textfile`` or
``metrics_port`` is set.

Counters live in the service process; a textfile is rewritten atomically after each run for
node_exporter's textfile collector, and the port serves the same registry over HTTP (on
``metrics_host``, 127.0.0.1 unless set). Gauges read from the state after each run say what an
operator watches for: the retry queue, the users left pending and today's requests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client import write_to_textfile as _write_textfile

from audience_sync.config import ServiceConfig
from audience_sync.model import RunStatus
from audience_sync.result import SyncResult

__all__ = ["RunMetrics"]


class RunMetrics:
    """Runs by status, changes delivered and failed, and the last run's duration per audience."""

    def __init__(self, service: ServiceConfig) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created: noise
        self.textfile = service.metrics_textfile
        self.port = service.metrics_port
        self.host = service.metrics_host
        self.server: Any = None
        self.registry = CollectorRegistry()
        labels = ["destination", "audience"]
        self.runs = Counter(
            "audience_sync_runs",
            "Audience runs by final status.",
            [*labels, "status"],
            registry=self.registry,
        )
        self.delivered = Counter(
            "audience_sync_changes_delivered",
            "Membership changes the destination confirmed.",
            labels,
            registry=self.registry,
        )
        self.failed = Counter(
            "audience_sync_changes_failed",
            "Membership changes that failed or were skipped (waiting for retry).",
            labels,
            registry=self.registry,
        )
        self.duration = Gauge(
            "audience_sync_last_run_duration_seconds",
            "Wall time of the audience's last run.",
            labels,
            registry=self.registry,
        )
        self.finished = Gauge(
            "audience_sync_last_run_finished_timestamp_seconds",
            "When the audience's last run ended (Unix time).",
            labels,
            registry=self.registry,
        )

        self.retry_queue = Gauge(
            "audience_sync_retry_queue_users",
            "Users waiting in the audience's retry queue (failed or skipped, retried next run).",
            labels,
            registry=self.registry,
        )
        self.pending = Gauge(
            "audience_sync_pending_users",
            "Users the audience's last run left pending (quota, stop): sent by the next run.",
            labels,
            registry=self.registry,
        )
        self.requests_today = Gauge(
            "audience_sync_requests_today",
            "Requests counted today (UTC) against the destination's daily budget.",
            ["destination"],
            registry=self.registry,
        )

    @property
    def enabled(self) -> bool:
        return self.textfile is not None or self.port is not None

    def start(self) -> None:
        if self.port is not None:
            self.server, _ = start_http_server(self.port, addr=self.host, registry=self.registry)

    def observe(
        self,
        result: SyncResult,
        duration: float,
        finished: float,
        *,
        retry_queue: Mapping[str, int],
        requests_today: Mapping[str, int],
    ) -> None:
        """Count one ``sync`` call's audiences, set the gauges read from the state after it
        (``retry_queue`` by audience key, ``requests_today`` by destination) and rewrite the
        textfile."""
        for destination, used in requests_today.items():
            self.requests_today.labels(destination).set(used)
        for r in result.audiences:
            labels = (result.destination, r.audience.trait_key)
            self.retry_queue.labels(*labels).set(retry_queue.get(r.audience.trait_key, 0))
            self.pending.labels(*labels).set(r.counts.get("pending", 0))
            self.runs.labels(*labels, r.status.value).inc()
            self.delivered.labels(*labels).inc(r.counts.get("delivered", 0))
            self.failed.labels(*labels).inc(r.counts.get("failed", 0) + r.counts.get("skipped", 0))
            self._timed(labels, duration, finished)
        self._write()

    def observe_crash(
        self, destination: str, audience: str, duration: float, finished: float
    ) -> None:
        """Count a run that raised instead of returning a result (e.g. an unusable database)."""
        self.runs.labels(destination, audience, RunStatus.FAILED.value).inc()
        self._timed((destination, audience), duration, finished)
        self._write()

    def _timed(self, labels: tuple[str, str], duration: float, finished: float) -> None:
        self.duration.labels(*labels).set(duration)
        self.finished.labels(*labels).set(finished)

    def _write(self) -> None:
        if self.textfile is not None:
            self.textfile.parent.mkdir(parents=True, exist_ok=True)
            _write_textfile(str(self.textfile), self.registry)
