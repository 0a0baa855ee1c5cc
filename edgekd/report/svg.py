"""Accuracy-vs-latency plot as a standalone SVG string (no plotting library), and its Pareto front."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), one per target.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
WIDTH, HEIGHT = 760, 460
LEFT, RIGHT, TOP, BOTTOM = 70, 200, 30, 60  # margins; the legend sits in the right one


@dataclass(frozen=True)
class Point:
    """One measured artifact: ``x`` latency (ms), ``y`` accuracy; ``group`` picks its colour and legend."""

    key: str  # short label drawn beside the circle (the row number of the report's table)
    label: str  # the tooltip
    group: str
    x: float
    y: float


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none faster-or-equal and at-least-as-accurate with
    one of the two strictly better (lower latency ``x``, higher accuracy ``y``); sorted by latency."""
    front = [
        i
        for i, (x, y) in enumerate(points)
        if not any(ox <= x and oy >= y and (ox < x or oy > y) for j, (ox, oy) in enumerate(points) if j != i)
    ]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _nice_step(span: float, count: int = 5) -> float:
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def _linear_ticks(low: float, high: float) -> tuple[float, float, list[float]]:
    """An axis range padded to round numbers, and its ticks."""
    if high - low < 1e-9:
        low, high = low - 0.05, high + 0.05
    step = _nice_step(high - low)
    start, stop = math.floor(low / step) * step, math.ceil(high / step) * step
    ticks = [start + i * step for i in range(round((stop - start) / step) + 1)]
    return start, stop, ticks


def _log_ticks(low: float, high: float) -> tuple[float, float, list[float]]:
    """Decades covering ``[low, high]``, with 2 and 5 between them when there are at most two decades."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    if last == first:
        last += 1
    mantissas = (1, 2, 5) if last - first <= 2 else (1,)
    ticks = [m * 10.0**e for e in range(first, last + 1) for m in mantissas if m * 10.0**e <= 10.0**last]
    return 10.0**first, 10.0**last, ticks


def _fmt(value: float) -> str:
    return f"{value:g}" if value == 0 or value >= 1e-3 else f"{value:.0e}"


def pareto_svg(points: Sequence[Point], title: str = "Accuracy vs latency (p50)") -> str:
    """The plot: one circle per point coloured by group, the Pareto front ringed and joined by a dashed
    line, axes with ticks and labels (latency on a log scale when it spans more than 20x), a legend.
    Without points, one line saying that nothing was measured."""
    if not points:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="60" font-family="sans-serif">'
            f'<text x="10" y="35">{escape(title)}: nothing was measured here.</text></svg>'
        )
    xs, ys = [p.x for p in points], [p.y for p in points]
    log_x = min(xs) > 0 and max(xs) / min(xs) > 20
    x_lo, x_hi, x_ticks = _log_ticks(min(xs), max(xs)) if log_x else _linear_ticks(0.0, max(xs))
    y_lo, y_hi, y_ticks = _linear_ticks(min(ys), max(ys))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(value: float) -> float:
        share = (
            (math.log10(value) - math.log10(x_lo)) / (math.log10(x_hi) - math.log10(x_lo))
            if log_x
            else (value - x_lo) / (x_hi - x_lo)
        )
        return LEFT + share * plot_w

    def sy(value: float) -> float:
        return TOP + (1 - (value - y_lo) / (y_hi - y_lo)) * plot_h

    groups = list(dict.fromkeys(p.group for p in points))
    colour = {group: PALETTE[i % len(PALETTE)] for i, group in enumerate(groups)}
    front = pareto_front([(p.x, p.y) for p in points])
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" font-family="sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        f'<text x="{LEFT}" y="{TOP - 10}" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for tick in x_ticks:
        x = sx(tick)
        out += [
            f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + plot_h}" stroke="#e5e5e5"/>',
            f'<text x="{x:.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">{_fmt(tick)}</text>',
        ]
    for tick in y_ticks:
        y = sy(tick)
        out += [
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" stroke="#e5e5e5"/>',
            f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{tick:.3g}</text>',
        ]
    scale = "log scale" if log_x else "linear scale"
    out += [
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333333"/>',
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 15}" text-anchor="middle">'
        f"latency p50 (ms, {scale}; lower is better)</text>",
        f'<text transform="translate(18 {TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">'
        "held-out accuracy (higher is better)</text>",
    ]
    if len(front) > 1:
        path = " ".join(f"{sx(points[i].x):.1f},{sy(points[i].y):.1f}" for i in front)
        out.append(
            f'<polyline class="pareto-front" points="{path}" fill="none" stroke="#333333" '
            'stroke-dasharray="5 4"/>'
        )
    for i, point in enumerate(points):
        on_front = i in front
        x, y = sx(point.x), sy(point.y)
        ring = ' stroke="#000000" stroke-width="2.5"' if on_front else ' stroke="#ffffff" stroke-width="1"'
        out += [
            f'<circle class="point{" front" if on_front else ""}" cx="{x:.1f}" cy="{y:.1f}" r="6" '
            f'fill="{colour[point.group]}"{ring}><title>{escape(point.label)}: p50 {point.x:.4g} ms, '
            f"accuracy {point.y:.4f}{' (Pareto front)' if on_front else ''}</title></circle>",
            # labels alternate above and below their circle so neighbours' labels do not overprint
            f'<text x="{x + 7:.1f}" y="{y - 8 if i % 2 == 0 else y + 16:.1f}" font-size="11">'
            f"{escape(point.key)}</text>",
        ]
    legend_x = LEFT + plot_w + 20
    for i, group in enumerate(groups):
        y = TOP + 10 + i * 20
        out += [
            f'<rect x="{legend_x}" y="{y - 9}" width="12" height="12" fill="{colour[group]}"/>',
            f'<text x="{legend_x + 18}" y="{y + 1}">{escape(group)}</text>',
        ]
    y = TOP + 10 + len(groups) * 20 + 10
    out += [
        f'<line x1="{legend_x}" y1="{y - 3}" x2="{legend_x + 12}" y2="{y - 3}" stroke="#333333" '
        'stroke-dasharray="5 4"/>',
        f'<text x="{legend_x + 18}" y="{y + 1}">Pareto front (ringed)</text>',
        "</svg>",
    ]
    return "\n".join(out)
