"""Durations as people write them in config and on the command line: ``90d``, ``2h``, ``1h30m``.

Used by interval schedules, the lock lease, the safeguards' snapshot age and ``history prune``.
"""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["format_duration", "parse_duration"]

_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_PART = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")


def parse_duration(text: str) -> timedelta:
    """``"1h30m"`` -> ``timedelta(hours=1, minutes=30)``; ``ValueError`` says what is accepted."""
    compact = text.strip().lower().replace(" ", "")
    parts = _PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(
            f"{text!r} is not a duration; write a number and a unit (s, m, h, d, w), "
            "e.g. '30s', '2h', '1h30m', '90d'"
        )
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"{text!r}: a duration must be longer than zero")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """A short human form, largest units first: ``timedelta(hours=26)`` -> ``"1d2h"``."""
    seconds = int(value.total_seconds())
    if seconds <= 0:
        return "0s"
    text = ""
    for unit, size in _UNITS.items():
        if unit == "w":
            continue
        amount, seconds = divmod(seconds, size)
        if amount:
            text += f"{amount}{unit}"
    return text
