"""The loss curve of a job page as inline SVG, from its ``history.jsonl``: pure.

Instance loss and prior loss (with prior preservation) on the left axis, the learning rate
on the right one, step along the bottom. No script, no style attribute: the page's CSP
allows neither, and presentation attributes need no permission.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

from dreambooth.api.history import Point

WIDTH, HEIGHT = 760, 280
LEFT, RIGHT, TOP, BOTTOM = 56, 64, 34, 40


@dataclass(frozen=True)
class Series:
    name: str
    css: str  # class of the line: its colour is in gallery.css
    values: list[tuple[int, float]]
    axis: str  # "left" or "right"


def series_of(points: list[Point]) -> list[Series]:
    out = [Series("instance loss", "loss", [(p.step, p.instance_loss) for p in points], "left")]
    prior = [(p.step, p.prior_loss) for p in points if p.prior_loss is not None]
    if prior:
        out.append(Series("prior loss", "prior", prior, "left"))
    out.append(Series("learning rate", "lr", [(p.step, p.lr) for p in points], "right"))
    return out


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round numbers covering ``low``..``high``."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _range(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    if high == low:
        low, high = low - (abs(low) or 1) * 0.05, high + (abs(high) or 1) * 0.05
    return min(low, 0.0) if low >= 0 and low < (high - low) else low, high


def _label(value: float) -> str:
    return f"{value:.3g}"


def loss_curve(points: list[Point], *, width: int = WIDTH, height: int = HEIGHT) -> str:
    """The SVG (an empty-state message when there is no history yet)."""
    if not points:
        return (
            f'<svg class="curve" viewBox="0 0 {width} 60" role="img" aria-label="no history yet">'
            f'<text x="{width // 2}" y="34" text-anchor="middle" class="muted">'
            "no history.jsonl yet: the curve appears after the first checkpoint or sample</text></svg>"
        )
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM
    steps = [p.step for p in points]
    x_low, x_high = min(steps), max(steps)
    x_high = x_high if x_high > x_low else x_low + 1
    all_series = series_of(points)
    ranges = {
        axis: _range([v for s in all_series if s.axis == axis for _, v in s.values]) for axis in ("left", "right")
    }

    def x(step: float) -> float:
        return LEFT + (step - x_low) / (x_high - x_low) * plot_w

    def y(value: float, axis: str) -> float:
        low, high = ranges[axis]
        return TOP + plot_h - (value - low) / (high - low) * plot_h

    parts = [
        (
            f'<svg class="curve" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="loss and learning rate by step, steps {x_low} to {max(steps)}">'
        ),
        f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}"/>',
    ]
    for tick in nice_ticks(*ranges["left"]):
        ty = y(tick, "left")
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{ty:.1f}" y2="{ty:.1f}"/>'
            f'<text class="tick" x="{LEFT - 6}" y="{ty + 4:.1f}" text-anchor="end">{_label(tick)}</text>'
        )
    for tick in nice_ticks(*ranges["right"], count=4):
        ty = y(tick, "right")
        parts.append(f'<text class="tick lr" x="{LEFT + plot_w + 6}" y="{ty + 4:.1f}">{_label(tick)}</text>')
    for tick in nice_ticks(x_low, x_high, count=6):
        if tick == int(tick):
            tx = x(tick)
            parts.append(
                f'<text class="tick" x="{tx:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{int(tick)}</text>'
            )
    parts.append(f'<text class="axis" x="{LEFT + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle">step</text>')
    for s in all_series:
        coords = " ".join(f"{x(step):.1f},{y(v, s.axis):.1f}" for step, v in s.values if math.isfinite(v))
        parts.append(f'<polyline class="series {s.css}" points="{coords}"><title>{escape(s.name)}</title></polyline>')
    legend_x = LEFT + 8
    for i, s in enumerate(all_series):
        lx = legend_x + i * 130
        parts.append(
            f'<line class="series {s.css}" x1="{lx}" x2="{lx + 18}" y1="{TOP - 14}" y2="{TOP - 14}"/>'
            f'<text class="legend" x="{lx + 22}" y="{TOP - 10}">{escape(s.name)}</text>'
        )
    last = points[-1]
    parts.append(
        f'<text class="legend" x="{LEFT + plot_w}" y="{TOP - 10}" text-anchor="end">'
        f"step {last.step}: loss {last.loss:.4f}</text>"
    )
    parts.append("</svg>")
    return "".join(parts)
