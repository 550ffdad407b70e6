"""A test-only destination: the JSONL destination, slowed down per user.

The jsonl destination is too fast to stop or kill in the middle of a run, and the Crisp
destination is not on this branch; this one writes the same Identify lines but sleeps ``delay``
seconds per user and confirms every ``flush_every`` users. It is registered only in processes
started through ``tests/cli_with_test_destinations.py``, never in the package.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime

from audience_sync.destinations.jsonl import (
    JsonlDestination,
    JsonlSettings,
    encode_line,
    identify_message,
)
from audience_sync.model import Outcome, UserUpdate


class SlowSettings(JsonlSettings):
    delay: float = 0.01
    """Seconds spent per user, as a remote API's latency would."""
    stall_after: int | None = None
    """After this many users, one request hangs for ``stall`` seconds (a stuck API call);
    ``<path>.stalled`` is created when it starts hanging, so a test knows when to act."""
    stall: float = 0.0


class SlowJsonlDestination(JsonlDestination):
    kind = "slow_jsonl"
    settings_model = SlowSettings
    settings: SlowSettings

    async def deliver(self, updates: Iterable[UserUpdate]) -> AsyncIterator[list[Outcome]]:
        timestamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        lines: list[bytes] = []
        confirmed: list[Outcome] = []
        for n, update in enumerate(updates):
            await asyncio.sleep(self.settings.delay)
            if n == self.settings.stall_after:
                self.path.with_name(self.path.name + ".stalled").touch()
                await asyncio.sleep(self.settings.stall)
            for change in update.changes:
                message = identify_message(
                    update, change, space_id=self.settings.space_id, timestamp=timestamp
                )
                lines.append(encode_line(message))
            confirmed.append(Outcome.delivered(update.user_id))
            if len(confirmed) >= self.settings.flush_every:
                self._write(lines)
                yield confirmed
                lines, confirmed = [], []
        if confirmed:
            self._write(lines)
            yield confirmed
