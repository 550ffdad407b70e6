"""A test-only destination: the JSONL destination, slowed down per user.

The jsonl destination is too fast to stop or kill in the middle of a run; this one is the same
destination with its ``pace`` hook sleeping ``delay`` seconds per user. It is registered only
in processes started through ``tests/cli_with_test_destinations.py``, never in the package.
"""

from __future__ import annotations

import asyncio
import time

from audience_sync.destinations.jsonl import JsonlDestination, JsonlSettings


class SlowSettings(JsonlSettings):
    delay: float = 0.01
    """Seconds spent per user, as a remote API's latency would."""
    stall_after: int | None = None
    """After this many users, one request hangs for ``stall`` seconds (a stuck API call);
    ``<path>.stalled`` is created when it starts hanging, so a test knows when to act, and
    creating ``<path>.release`` ends the hang early, so a test decides when it goes on."""
    stall: float = 0.0


class SlowJsonlDestination(JsonlDestination):
    kind = "slow_jsonl"
    settings_model = SlowSettings
    settings: SlowSettings

    async def pace(self, n: int) -> None:
        await asyncio.sleep(self.settings.delay)
        if n == self.settings.stall_after:
            self.path.with_name(self.path.name + ".stalled").touch()
            release = self.path.with_name(self.path.name + ".release")
            deadline = time.monotonic() + self.settings.stall
            while time.monotonic() < deadline and not release.exists():
                await asyncio.sleep(0.05)
