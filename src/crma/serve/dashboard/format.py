"""Template filters: numbers, times and heat-map colours as the dashboard prints them."""

from __future__ import annotations

import time

# viridis at 0, 0.25, 0.5, 0.75, 1 (the report's loss-matrix colour map)
VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def number(value: float | None) -> str:
    """Four decimals, or four significant digits for the very small and the large."""
    if value is None:
        return "–"
    return f"{value:.4g}" if value and not 1e-3 <= abs(value) < 1e4 else f"{value:.4f}"


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def when(stamp: int | str | None) -> str:
    """A Unix time or the manifest's ISO time, in UTC to the minute."""
    if not stamp:
        return "–"
    if isinstance(stamp, str):
        return stamp.replace("T", " ").removesuffix("Z")[:16] + " UTC"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stamp))


def heat(value: float | None, low: float, high: float) -> str:
    """The CSS colour of `value` on viridis between `low` and `high`; white text when dark."""
    if value is None:
        return "background:#f4f4f4;color:#999"
    x = 0.0 if high <= low else (value - low) / (high - low)
    x = min(1.0, max(0.0, x)) * (len(VIRIDIS) - 1)
    i = min(int(x), len(VIRIDIS) - 2)
    t = x - i
    r, g, b = (round(a + (c - a) * t) for a, c in zip(VIRIDIS[i], VIRIDIS[i + 1]))
    text = "#fff" if x < 2.2 else "#111"
    return f"background:rgb({r},{g},{b});color:{text}"


FILTERS = {
    "number": number,
    "percent": percent,
    "duration": duration,
    "when": when,
    "heat": heat,
}
