"""Bar charts as geometry: one ``Point`` (a stack of bars) per run or per day, scaled into a
fixed SVG view box. The templates draw them; nothing here knows HTML, so it stays testable.

Positive series stack up from the zero line and negative ones (members who exited) down from
it, the way run-history charts show added against removed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Bar", "Chart", "Point", "Series", "bar_chart"]

# Drawn about this size on screen, two charts side by side, so text keeps its size.
WIDTH = 560
HEIGHT = 170
LEFT, RIGHT, TOP, BOTTOM = 40, 28, 10, 22
_MAX_BAR = 26.0


@dataclass(frozen=True, slots=True)
class Series:
    """One quantity: its key in the values, its CSS class (the colour) and its legend label."""

    key: str
    css: str
    label: str
    down: bool = False


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    css: str


@dataclass(frozen=True, slots=True)
class Point:
    """One run (or day): its bars, a tooltip, where it links and its x-axis label."""

    bars: tuple[Bar, ...]
    title: str
    href: str | None
    label: str
    x: float
    width: float


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    series: tuple[Series, ...]
    points: tuple[Point, ...]
    ticks: tuple[tuple[float, str], ...]
    """(y, label) of the value axis."""
    zero: float
    limit: tuple[float, str] | None = None
    """(y, label) of a horizontal budget line."""
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = WIDTH - RIGHT
    plot_top: int = TOP
    plot_height: int = HEIGHT - TOP - BOTTOM
    labels: tuple[Point, ...] = field(default=())
    """The points whose label is drawn under the axis (a few, so they do not overlap)."""


def _nice(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^k at or above ``value`` (an axis maximum)."""
    if value <= 0:
        return 1.0
    magnitude: float = 10.0 ** math.floor(math.log10(value))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= value)


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"


def bar_chart(
    title: str,
    series: Sequence[Series],
    items: Sequence[tuple[dict[str, int], str, str | None, str]],
    *,
    limit: int | None = None,
    limit_label: str = "",
) -> Chart:
    """A chart of ``items``, each ``(values by series key, tooltip, href, axis label)``."""
    up = [sum(v.get(s.key, 0) for s in series if not s.down) for v, *_ in items]
    down = [sum(v.get(s.key, 0) for s in series if s.down) for v, *_ in items]
    top = _nice(max([*up, limit or 0, 0]))
    bottom = _nice(max(down)) if any(down) else 0.0
    plot_h = HEIGHT - TOP - BOTTOM
    scale = plot_h / (top + bottom)
    zero = TOP + top * scale
    slot = (WIDTH - LEFT - RIGHT) / max(len(items), 1)
    width = min(_MAX_BAR, max(slot * 0.7, 1.0))
    points = []
    for i, (values, tip, href, label) in enumerate(items):
        x = LEFT + i * slot + (slot - width) / 2
        bars: list[Bar] = []
        above, below = zero, zero
        for s in series:
            h = values.get(s.key, 0) * scale
            if h <= 0:
                continue
            if s.down:
                bars.append(Bar(x, below, width, h, s.css))
                below += h
            else:
                above -= h
                bars.append(Bar(x, above, width, h, s.css))
        points.append(Point(tuple(bars), tip, href, label, x, width))
    ticks = [(zero - t * top / 2 * scale, _fmt(t * top / 2)) for t in (0, 1, 2)]
    if bottom * scale >= 18:  # else its label would sit on the zero line's
        ticks.append((zero + bottom * scale, "-" + _fmt(bottom)))
    step = max(1, math.ceil(len(points) / 6))
    shown = tuple(points[i] for i in range(0, len(points), step))
    return Chart(
        title,
        tuple(series),
        tuple(points),
        tuple(ticks),
        zero,
        (zero - limit * scale, limit_label) if limit else None,
        labels=shown,
    )
