"""Bar charts drawn on the server as SVG: no script, no third-party origin, readable offline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

WIDTH, HEIGHT, PAD_LEFT, PAD_BOTTOM = 360, 150, 52, 18


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str  # the day, for the tooltip
    value: str  # formatted, for the tooltip


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    bars: list[Bar]
    top: str  # formatted axis maximum
    first_day: str
    last_day: str
    width: int = WIDTH
    height: int = HEIGHT
    pad_left: int = PAD_LEFT
    pad_bottom: int = PAD_BOTTOM


def bar_chart(title: str, days: Sequence[str], values: Sequence[float], fmt: Callable[[float], str]) -> Chart:
    """One bar per day, scaled to the largest value (an empty chart has a zero axis)."""
    top = max(values, default=0) or 1
    plot_w, plot_h = WIDTH - PAD_LEFT, HEIGHT - PAD_BOTTOM
    step = plot_w / max(len(values), 1)
    bars = []
    for i, (day, value) in enumerate(zip(days, values, strict=True)):
        h = plot_h * value / top
        bars.append(Bar(x=round(PAD_LEFT + i * step + 1, 2), y=round(plot_h - h, 2), width=round(step - 2, 2),
                        height=round(h, 2), label=day, value=fmt(value)))
    return Chart(title=title, bars=bars, top=fmt(max(values, default=0)), first_day=days[0] if days else "",
                 last_day=days[-1] if days else "")


def thousands(value: float) -> str:
    return f"{round(value):,}"


def money(value: float) -> str:
    """Micro-dollars as dollars with thousands separators: ``$1,234.56`` (cents below a dollar kept)."""
    dollars = value / 1_000_000
    return f"${dollars:,.2f}" if dollars >= 1 or dollars == 0 else f"${dollars:,.4f}"
