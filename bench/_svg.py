"""A hand-made SVG plot: horizontal bars per figure, and line charts for timelines.

No plotting dependency: the figures are simple, and the file must stay readable
in a diff. Each panel is stacked under the previous one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

WIDTH = 960
LABEL_W = 300
RIGHT_PAD = 90
BAR_H = 18
BAR_GAP = 6
TITLE_H = 28
AXIS_H = 30
PANEL_GAP = 26
LINE_H = 230

OURS = "#2b6cb0"
OURS_LIGHT = "#63a4e8"
PEER = "#dd8452"
PEER_LIGHT = "#f0b48c"
RAW = "#8c8c8c"
SERIES = ["#8c8c8c", "#dd8452", "#b07aa1", "#55a868", "#2b6cb0", "#63a4e8", "#937860"]


@dataclass
class Bars:
    title: str
    unit: str
    bars: Sequence[tuple[str, float | None]]
    targets: Sequence[tuple[float, str]] = ()
    origin: float = 0.0
    """Where bars start (1.0 for ratios: a bar shows the excess over the baseline)."""
    log: bool = False
    value_format: str = "{:.3g}"
    kind: str = "bars"


@dataclass
class Lines:
    title: str
    x_label: str
    y_label: str
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]]
    bands: Sequence[tuple[float, float, str]] = ()
    """Shaded x-ranges with a label (an outage)."""
    marks: Sequence[tuple[float, str]] = field(default_factory=list)
    """Vertical lines with a label."""
    kind: str = "lines"


def color_for(label: str) -> str:
    light = "OTel" in label or "budget only" in label
    if label.startswith(("@resilient", "ResilientEngine", "run_transaction")):
        return OURS_LIGHT if light else OURS
    if label.startswith(("raw", "no retry")):
        return RAW
    return PEER_LIGHT if light else PEER


def _num(value: float) -> str:
    return f"{value:.1f}"


def _ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw_step = span / count
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = min(
        (m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw_step),
        default=10 * magnitude,
    )
    first = math.ceil(lo / step) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _fmt_tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.3g}"
    return f"{value:g}"


def _bars(panel: Bars, top: float) -> tuple[list[str], float]:
    out: list[str] = []
    plot_x0, plot_x1 = LABEL_W, WIDTH - RIGHT_PAD
    out.append(f'<text x="10" y="{_num(top + 18)}" class="title">{escape(panel.title)}</text>')
    labels_h = 12 * len(panel.targets)
    y0 = top + TITLE_H + labels_h
    values = [v for _, v in panel.bars if v is not None]
    candidates = [*values, *(t for t, _ in panel.targets), panel.origin]
    if panel.log:
        floor = min((v for v in candidates if v > 0), default=1.0)
        lo = 10 ** math.floor(math.log10(floor))
        hi = 10 ** math.ceil(math.log10(max([*candidates, lo * 10])))

        def x_of(v: float) -> float:
            v = max(v, lo)
            return plot_x0 + (math.log10(v) - math.log10(lo)) / (
                math.log10(hi) - math.log10(lo)
            ) * (plot_x1 - plot_x0)

        ticks = [10**e for e in range(round(math.log10(lo)), round(math.log10(hi)) + 1)]
        start = lo
    else:
        lo = min(candidates)
        hi = max(candidates)
        pad = (hi - lo) * 0.08 or max(abs(hi) * 0.05, 0.01)
        lo = lo - pad if lo < panel.origin else lo
        hi = hi + pad

        def x_of(v: float) -> float:
            return plot_x0 + (v - lo) / (hi - lo) * (plot_x1 - plot_x0)

        ticks = _ticks(lo, hi)
        start = panel.origin
    height = len(panel.bars) * (BAR_H + BAR_GAP)
    for tick in ticks:
        x = x_of(tick)
        out.append(
            f'<line x1="{_num(x)}" y1="{_num(y0)}" x2="{_num(x)}" y2="{_num(y0 + height)}" '
            'class="grid"/>'
        )
        out.append(
            f'<text x="{_num(x)}" y="{_num(y0 + height + 14)}" class="tick" '
            f'text-anchor="middle">{escape(_fmt_tick(tick))}</text>'
        )
    out.append(
        f'<text x="{plot_x1}" y="{_num(y0 + height + 27)}" class="tick" '
        f'text-anchor="end">{escape(panel.unit)}{" (log scale)" if panel.log else ""}</text>'
    )
    for i, (label, value) in enumerate(panel.bars):
        y = y0 + i * (BAR_H + BAR_GAP)
        out.append(
            f'<text x="{LABEL_W - 8}" y="{_num(y + BAR_H - 5)}" class="label" '
            f'text-anchor="end">{escape(label)}</text>'
        )
        if value is None:
            out.append(
                f'<text x="{plot_x0 + 4}" y="{_num(y + BAR_H - 5)}" class="value">'
                "not measured</text>"
            )
            continue
        a, b = sorted((x_of(start), x_of(value)))
        out.append(
            f'<rect x="{_num(a)}" y="{_num(y)}" width="{_num(max(b - a, 1.0))}" '
            f'height="{BAR_H}" fill="{color_for(label)}"/>'
        )
        out.append(
            f'<text x="{_num(max(b, x_of(start)) + 4)}" y="{_num(y + BAR_H - 5)}" '
            f'class="value">{escape(panel.value_format.format(value))}</text>'
        )
    # Target labels go in rows of their own above the bars, one line each.
    for index, (value, text) in enumerate(panel.targets):
        x = x_of(value)
        label_y = y0 - labels_h + 12 * index + 8
        out.append(
            f'<line x1="{_num(x)}" y1="{_num(label_y + 2)}" x2="{_num(x)}" '
            f'y2="{_num(y0 + height)}" class="target"/>'
        )
        out.append(
            f'<text x="{_num(x + 3)}" y="{_num(label_y)}" class="target-label">'
            f"{escape(text)}</text>"
        )
    return out, TITLE_H + labels_h + height + AXIS_H + 6


def _lines(panel: Lines, top: float) -> tuple[list[str], float]:
    out: list[str] = []
    plot_x0, plot_x1 = 70, WIDTH - 250
    y_top = top + TITLE_H + 6
    y_bottom = y_top + LINE_H
    out.append(f'<text x="10" y="{_num(top + 18)}" class="title">{escape(panel.title)}</text>')
    xs = [x for _, points in panel.series for x, _ in points] or [0.0, 1.0]
    ys = [y for _, points in panel.series for _, y in points] or [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    y_lo, y_hi = 0.0, max(ys) * 1.1 or 1.0

    def px(x: float) -> float:
        return plot_x0 + (x - x_lo) / (x_hi - x_lo) * (plot_x1 - plot_x0)

    def py(y: float) -> float:
        return y_bottom - (y - y_lo) / (y_hi - y_lo) * (y_bottom - y_top)

    for x0, x1, text in panel.bands:
        out.append(
            f'<rect x="{_num(px(x0))}" y="{_num(y_top)}" width="{_num(px(x1) - px(x0))}" '
            f'height="{LINE_H}" class="band"/>'
        )
        out.append(
            f'<text x="{_num((px(x0) + px(x1)) / 2)}" y="{_num(y_top + 14)}" class="tick" '
            f'text-anchor="middle">{escape(text)}</text>'
        )
    for tick in _ticks(y_lo, y_hi, 5):
        out.append(
            f'<line x1="{plot_x0}" y1="{_num(py(tick))}" x2="{plot_x1}" y2="{_num(py(tick))}" '
            'class="grid"/>'
        )
        out.append(
            f'<text x="{plot_x0 - 6}" y="{_num(py(tick) + 4)}" class="tick" '
            f'text-anchor="end">{escape(_fmt_tick(tick))}</text>'
        )
    for tick in _ticks(x_lo, x_hi, 10):
        out.append(
            f'<text x="{_num(px(tick))}" y="{_num(y_bottom + 14)}" class="tick" '
            f'text-anchor="middle">{escape(_fmt_tick(tick))}</text>'
        )
    out.append(
        f'<text x="{plot_x1}" y="{_num(y_bottom + 28)}" class="tick" text-anchor="end">'
        f"{escape(panel.x_label)}</text>"
    )
    out.append(f'<text x="12" y="{_num(y_top - 4)}" class="tick">{escape(panel.y_label)}</text>')
    for x, text in panel.marks:
        out.append(
            f'<line x1="{_num(px(x))}" y1="{_num(y_top)}" x2="{_num(px(x))}" '
            f'y2="{_num(y_bottom)}" class="target"/>'
        )
        out.append(
            f'<text x="{_num(px(x) + 3)}" y="{_num(y_top + 28)}" class="target-label">'
            f"{escape(text)}</text>"
        )
    for i, (label, points) in enumerate(panel.series):
        color = SERIES[i % len(SERIES)]
        if points:
            path = " ".join(f"{_num(px(x))},{_num(py(y))}" for x, y in points)
            out.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6"/>'
            )
        ly = y_top + 10 + i * 18
        out.append(
            f'<line x1="{plot_x1 + 12}" y1="{_num(ly)}" x2="{plot_x1 + 32}" y2="{_num(ly)}" '
            f'stroke="{color}" stroke-width="3"/>'
        )
        out.append(
            f'<text x="{plot_x1 + 38}" y="{_num(ly + 4)}" class="label">{escape(label)}</text>'
        )
    return out, TITLE_H + 6 + LINE_H + AXIS_H + 6


STYLE = """
text { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; fill: #222; }
.title { font-size: 14px; font-weight: 600; }
.label { font-size: 12px; }
.value { font-size: 11px; fill: #333; }
.tick { font-size: 10px; fill: #666; }
.grid { stroke: #e3e3e3; stroke-width: 1; }
.target { stroke: #c53030; stroke-width: 1.2; stroke-dasharray: 4 3; }
.target-label { font-size: 10px; fill: #c53030; }
.band { fill: #fbe3e3; }
"""


def render(panels: Sequence[Bars | Lines], *, heading: str) -> str:
    """The whole plot as an SVG document."""
    body: list[str] = [f'<text x="10" y="22" class="title">{escape(heading)}</text>']
    top = 36.0
    for panel in panels:
        parts, height = _bars(panel, top) if isinstance(panel, Bars) else _lines(panel, top)
        body.extend(parts)
        top += height + PANEL_GAP
    total = math.ceil(top)
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{total}" '
            f'viewBox="0 0 {WIDTH} {total}">',
            f"<style>{STYLE}</style>",
            f'<rect x="0" y="0" width="{WIDTH}" height="{total}" fill="#ffffff"/>',
            *body,
            "</svg>",
            "",
        ]
    )
