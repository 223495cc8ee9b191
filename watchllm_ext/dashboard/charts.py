"""Charts drawn as SVG on the server: no chart library to fetch, nothing to build, works
offline and renders before any script runs.

Series colours come from two palettes, one per theme, each checked against its background
for WCAG's 3:1 contrast of graphics (tests/test_dashboard.py computes the ratios, and reads
them back from the page in Chromium). Every chart also carries its numbers as a table
(the page shows it under "Data"), for screen readers and for copying.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from markupsafe import Markup, escape

# Backgrounds of the chart panels (dashboard.css: --panel) and the series colours on them.
LIGHT_BACKGROUND = "#ffffff"
DARK_BACKGROUND = "#1b1f24"
LIGHT_PALETTE = (
    "#1f5fbf",  # blue
    "#c0392b",  # red
    "#1e7d4f",  # green
    "#8e44ad",  # purple
    "#a35200",  # orange
    "#0e7c86",  # teal
    "#6b5b00",  # olive
    "#c2185b",  # pink
)
DARK_PALETTE = (
    "#6ea8fe",
    "#ff7b72",
    "#56d364",
    "#d2a8ff",
    "#ffa657",
    "#39c5cf",
    "#e3b341",
    "#f778ba",
)

WIDTH = 640
HEIGHT = 200
_LEFT = 56
_RIGHT = 12
_TOP = 10
_BOTTOM = 26


def _channel(c: int) -> float:
    s = c / 255
    return s / 12.92 if s <= 0.03928 else ((s + 0.055) / 1.055) ** 2.4


def luminance(hex_colour: str) -> float:
    """WCAG 2 relative luminance of '#rrggbb'."""
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return 0.2126 * _channel(r) + 0.7152 * _channel(g) + 0.0722 * _channel(b)


def contrast(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two colours (1 to 21)."""
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def palette_css() -> str:
    """The series classes for both themes, from the palettes above (one source of truth)."""
    light = "".join(f".s{i}{{--c:{c}}}" for i, c in enumerate(LIGHT_PALETTE))
    dark = "".join(f".s{i}{{--c:{c}}}" for i, c in enumerate(DARK_PALETTE))
    return f"{light}@media (prefers-color-scheme: dark){{{dark}}}"


@dataclass
class Series:
    name: str
    values: list[float]


def _nice_max(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above value (axis top)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def _time_label(t: datetime, zone: ZoneInfo, span_s: float) -> str:
    local = t.astimezone(zone)
    if span_s <= 86_400 * 1.01:
        return local.strftime("%H:%M")
    return local.strftime("%d %b %H:%M") if span_s <= 86_400 * 7.01 else local.strftime("%d %b")


def line_chart(
    title: str,
    times: Sequence[datetime],
    series: Sequence[Series],
    tz: str,
    fmt: Callable[[float], str],
) -> Markup:
    """One SVG line chart (a line per series) with its axes, legend and an aria label."""
    n = len(times)
    zone = ZoneInfo(tz)
    top = _nice_max(max((v for s in series for v in s.values), default=0.0))
    plot_w = WIDTH - _LEFT - _RIGHT
    plot_h = HEIGHT - _TOP - _BOTTOM

    def x(i: int) -> float:
        return _LEFT + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(v: float) -> float:
        return _TOP + plot_h * (1 - v / top)

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img"'
        f' aria-label="{escape(title)}" preserveAspectRatio="xMidYMid meet">',
        f"<title>{escape(title)}</title>",
    ]
    for k in range(3):  # grid lines and the y axis labels: 0, half, top (round numbers)
        v = top * k / 2
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y(v):.1f}"'
            f' y2="{y(v):.1f}"/><text class="axis" x="{_LEFT - 6}" y="{y(v) + 4:.1f}"'
            f' text-anchor="end">{escape(fmt(v))}</text>'
        )
    if n:
        span_s = (times[-1] - times[0]).total_seconds()
        for i, anchor in ((0, "start"), (n // 2, "middle"), (n - 1, "end")):
            parts.append(
                f'<text class="axis" x="{x(i):.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}">'
                f"{escape(_time_label(times[i], zone, span_s))}</text>"
            )
    for k, s in enumerate(series):
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(s.values))
        css = f"s{k % len(LIGHT_PALETTE)}"
        if n == 1:
            parts.append(
                f'<circle class="line {css}" cx="{x(0):.1f}" cy="{y(s.values[0]):.1f}" r="3"/>'
            )
        else:
            parts.append(
                f'<polyline class="line {css}" data-series="{escape(s.name)}" points="{points}"/>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))


def legend(series: Sequence[Series]) -> list[tuple[str, str]]:
    """(css class, name) of each series, for the legend under a chart."""
    return [(f"s{k % len(LIGHT_PALETTE)}", s.name) for k, s in enumerate(series)]


def bar(value: float, total: float) -> float:
    """A share in percent, for the waterfall and the model bars (0 when total is 0)."""
    return 0.0 if total <= 0 else max(0.0, min(100.0, 100.0 * value / total))
