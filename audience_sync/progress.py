"""Where a run is, for people: the engine reports its phase and counts to a ``Progress``
callback; ``ProgressLog`` turns them into a log line every few seconds when nobody watches a
terminal (cron, systemd, ``serve``), with the rate and the time left.

The engine calls ``progress(phase, audience, done, total)``: ``("planning", key, i, n)`` before
planning the i-th of n audiences, then ``("delivering", None, users, total)`` as users are
confirmed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from audience_sync.durations import format_duration

__all__ = ["Progress", "ProgressLog"]

Progress = Callable[[str, str | None, int, int | None], None]

log = logging.getLogger("audience_sync.progress")


class ProgressLog:
    """Keeps the latest report; ``running()`` logs ``line()`` every ``every`` seconds."""

    def __init__(self, every: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self.phase = "starting"
        self.audience: str | None = None
        self.done = 0
        self.total: int | None = None
        self._phase_started = clock()
        self._lock = threading.Lock()

    def __call__(self, phase: str, audience: str | None, done: int, total: int | None) -> None:
        with self._lock:
            if phase != self.phase:
                self._phase_started = self.clock()
            self.phase, self.audience, self.done, self.total = phase, audience, done, total

    def line(self) -> str:
        """``progress phase=delivering done=1200 total=5000 rate=40.0/s eta=1m35s``."""
        with self._lock:
            elapsed = max(self.clock() - self._phase_started, 1e-9)
            what = "audiences" if self.phase == "planning" else "users"
            parts = [f"progress phase={self.phase}"]
            if self.audience is not None:
                parts.append(f"audience={self.audience}")
            parts.append(f"{what}_done={self.done}")
            if self.total is not None:
                parts.append(f"{what}_total={self.total}")
            parts.append(f"elapsed={_seconds(elapsed)}")
            rate = self.done / elapsed
            if self.phase == "delivering":
                parts.append(f"rate={rate:.1f}/s")
                if self.total is not None and rate > 0:
                    parts.append(f"eta={_seconds((self.total - self.done) / rate)}")
            return " ".join(parts)

    @contextmanager
    def running(self) -> Iterator[ProgressLog]:
        """Log a line every ``every`` seconds (from a daemon thread) until the block ends."""
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(self.every):
                log.info("%s", self.line())

        thread = threading.Thread(target=tick, name="progress-log", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()


def _seconds(value: float) -> str:
    return format_duration(timedelta(seconds=value))
