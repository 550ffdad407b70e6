"""Client-side pacing that backs off when Crisp says "too many requests" and recovers after.

Requests are spaced evenly at the current rate (no bursts, so a server-side per-second window is
not overrun). A 429/420 pauses *every* request (the limit is per token, not per connection):
for ``Retry-After`` seconds when Crisp sends it, else an exponential backoff with jitter that
starts short (a per-second window clears fast) and doubles while the answers keep coming. It
also lowers the rate (multiplicative decrease) and remembers the rate that was too fast: each
success wins the rate back quickly up to just under that mark, then only slowly beyond it, so
the client settles just below Crisp's limit instead of hitting it again and again.
``limited_for`` says how long rate limiting has lasted without a single success, which is how an
exhausted daily quota shows when Crisp does not say so.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

__all__ = ["AdaptiveRateLimiter"]


class AdaptiveRateLimiter:
    """Pace requests at up to ``ceiling`` per second; adapt to rate-limit answers."""

    decrease = 0.8
    """Rate multiplier on each rate-limit answer (outside an ongoing pause)."""
    margin = 0.95
    """Share of the rate that was limited, up to which the rate recovers fast."""
    increase = 0.02
    """Share of the ceiling regained per success, below that mark."""
    probe = 0.0002
    """Share of the ceiling regained per success, above that mark."""
    backoff_initial = 0.1
    backoff_max = 60.0

    def __init__(
        self,
        ceiling: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.ceiling = ceiling
        self.rate = ceiling
        self.floor = min(ceiling, max(ceiling / 50, 0.05))
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._next = 0.0
        self._pause_until = 0.0
        self._strikes = 0
        self._limited_since: float | None = None
        self._mark = ceiling
        self.rate_limited = 0
        """Rate-limit answers seen (for reports)."""

    async def acquire(self) -> None:
        """Wait for this request's slot: after any pause, and 1/rate after the previous one."""
        while True:
            now = self._clock()
            slot = max(now, self._next, self._pause_until)
            self._next = slot + 1.0 / self.rate
            if slot <= now:
                return
            await self._sleep(slot - now)
            if self._clock() >= self._pause_until:
                return
            # A rate-limit answer arrived while we waited: queue again behind the pause.

    def on_success(self) -> None:
        self._strikes = 0
        self._limited_since = None
        step = self.increase if self.rate < self._mark else self.probe
        self.rate = min(self.ceiling, self.rate + self.ceiling * step)

    def on_rate_limited(self, retry_after: float | None) -> float:
        """Pause everyone and slow down; returns the pause in seconds from now."""
        now = self._clock()
        self.rate_limited += 1
        if self._limited_since is None:
            self._limited_since = now
        if now >= self._pause_until:
            # One strike per pause: the answers of requests already in flight do not escalate.
            self._strikes += 1
            self._mark = max(self.floor, self.rate * self.margin)
            self.rate = max(self.floor, self.rate * self.decrease)
            if retry_after is not None:
                delay = retry_after
            else:
                exp = self.backoff_initial * 2 ** min(self._strikes - 1, 16)
                delay = min(self.backoff_max, exp) * (0.5 + self._rng() / 2)
            self._pause_until = now + delay
            self._next = max(self._next, self._pause_until)
        elif retry_after is not None:
            self._pause_until = max(self._pause_until, now + retry_after)
        return self._pause_until - now

    @property
    def limited_for(self) -> float:
        """Seconds since the first rate-limit answer with no success after it (0 if none)."""
        if self._limited_since is None:
            return 0.0
        return self._clock() - self._limited_since
