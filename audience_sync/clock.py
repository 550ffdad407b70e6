"""The current time in UTC, and the type of a clock a test can replace it with.

Shared by the state and the destinations that keep rows of their own, so neither imports the
other for it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

__all__ = ["Clock", "utc_now"]

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)
