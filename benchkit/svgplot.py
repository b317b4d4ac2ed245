"""Per-run charts as small hand-written SVG files: a line chart and a bar chart.

Why not matplotlib here: every tracked run logs two charts, and drawing them with matplotlib costs
50–100 ms per run (figure, text layout, PNG encoding), several percent of a short run
(benchmarks/bench_sweep.py). These SVGs take well under a millisecond, are a few kilobytes, and
MLflow's UI shows them like PNGs. Study figures (benchkit.analysis) still use matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

# matplotlib's tab10: the same colours as the study figures
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")
FONT = 'font-family="DejaVu Sans, Arial, sans-serif"'


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """About ``target`` round tick values (1, 2 or 5 × 10^k apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    count = int(math.ceil((hi - first) / step - 1e-9)) + 1
    return [round(first + i * step, 12) for i in range(count)]


def _fmt(v: float) -> str:
    return f"{v:.6g}"


class _Frame:
    """Maps data coordinates to the plot area of a ``width`` × ``height`` SVG."""

    def __init__(self, width: int, height: int, x: tuple[float, float], y: tuple[float, float],
                 margin: tuple[int, int, int, int]):
        self.width, self.height = width, height
        self.left, self.right, self.top, self.bottom = margin
        self.x0, self.x1 = x
        self.y0, self.y1 = y

    def px(self, x: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return self.left + (x - self.x0) / span * (self.width - self.left - self.right)

    def py(self, y: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return self.height - self.bottom - (y - self.y0) / span * (self.height - self.top - self.bottom)


def _svg(width: int, height: int, body: list[str], title: str | None) -> str:
    head = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" {FONT} font-size="11">',
            f'<rect width="{width}" height="{height}" fill="white"/>']
    if title:
        head.append(f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" font-size="12">{escape(title)}</text>')
    return "\n".join([*head, *body, "</svg>"]) + "\n"


def _y_axis(f: _Frame, ticks: Sequence[float], label: str) -> list[str]:
    out = []
    for t in ticks:
        y = f.py(t)
        out.append(f'<line x1="{f.left}" x2="{f.width - f.right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{f.left - 5}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    mid = (f.top + f.height - f.bottom) / 2
    out.append(f'<text x="12" y="{mid:.1f}" text-anchor="middle" transform="rotate(-90 12 {mid:.1f})">'
               f'{escape(label)}</text>')
    out.append(f'<rect x="{f.left}" y="{f.top}" width="{f.width - f.left - f.right}" '
               f'height="{f.height - f.top - f.bottom}" fill="none" stroke="#333"/>')
    return out


def line_chart(series: Mapping[str, Sequence[tuple[float, float]]], *, xlabel: str, ylabel: str,
               title: str | None = None, width: int = 480, height: int = 280) -> str:
    """One polyline with markers per series (``name -> [(x, y), ...]``), legend at the lower right."""
    points = [(x, y) for pts in series.values() for x, y in pts if math.isfinite(x) and math.isfinite(y)]
    xs, ys = [p[0] for p in points] or [0.0, 1.0], [p[1] for p in points] or [0.0, 1.0]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    f = _Frame(width, height, (xt[0], xt[-1]), (yt[0], yt[-1]), (56, 12, 26 if title else 10, 38))
    body = _y_axis(f, yt, ylabel)
    for t in xt:
        body.append(f'<text x="{f.px(t):.1f}" y="{height - f.bottom + 14}" text-anchor="middle">{_fmt(t)}</text>')
    body.append(f'<text x="{(f.left + width - f.right) / 2:.1f}" y="{height - 6}" text-anchor="middle">'
                f'{escape(xlabel)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        good = [(f.px(x), f.py(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
        if not good:
            continue
        body.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                    + " ".join(f"{x:.1f},{y:.1f}" for x, y in good) + '"/>')
        body += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>' for x, y in good]
        ly = height - f.bottom - 10 - 14 * (len(series) - 1 - i)
        lx = width - f.right - 110
        body.append(f'<line x1="{lx}" x2="{lx + 16}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" stroke-width="2"/>')
        body.append(f'<text x="{lx + 20}" y="{ly}">{escape(name)}</text>')
    return _svg(width, height, body, title)


ROW = 16  # px per bar: above the 11 px label font, so labels never overlap however many bars
CHAR = 6.2  # px per character of an 11 px label, roughly (DejaVu Sans)
MAX_LABEL = 40  # characters; longer labels keep their end ("…layer4.2.conv3")


def bar_chart(labels: Sequence[str], values: Sequence[float], *, ylabel: str, title: str | None = None,
              ymax: float | None = None, width: int = 560) -> str:
    """Horizontal bars, one row per label from top to bottom, with the values at the bar ends.

    The chart grows downward by ``ROW`` px per bar and keeps its width, so 54 layers of a ResNet read as
    well as 3 of LeNet (side by side they became a strip that MLflow's viewer shrank to a blur).
    ``ylabel`` names the value axis (horizontal here), ``ymax`` its end (default: the largest value).
    """
    names = [str(s) if len(str(s)) <= MAX_LABEL else "…" + str(s)[-(MAX_LABEL - 1):] for s in labels]
    top = max([v for v in values if math.isfinite(v)] or [1.0])
    xt = nice_ticks(0.0, ymax if ymax is not None else top)
    left = 12 + int(CHAR * max((len(n) for n in names), default=1))
    head = 26 if title else 10
    height = head + ROW * len(names) + 40
    right = 40  # room for the value right of a full-length bar
    f = _Frame(width, height, (0.0, xt[-1]), (float(len(names)), 0.0), (left, right, head, 40))
    body = []
    for t in xt:
        x = f.px(t)
        body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{f.top}" y2="{height - f.bottom}" stroke="#ddd"/>')
        body.append(f'<text x="{x:.1f}" y="{height - f.bottom + 14}" text-anchor="middle">{_fmt(t)}</text>')
    body.append(f'<text x="{(left + width - right) / 2:.1f}" y="{height - 8}" text-anchor="middle">'
                f'{escape(ylabel)}</text>')
    body.append(f'<rect x="{left}" y="{f.top}" width="{width - left - right}" height="{height - f.top - f.bottom}" '
                'fill="none" stroke="#333"/>')
    for i, (name, v) in enumerate(zip(names, values)):
        y0, mid = f.py(i) + 0.15 * ROW, f.py(i + 0.5)
        if math.isfinite(v):
            x1 = f.px(v)
            body.append(f'<rect x="{left}" y="{y0:.1f}" width="{x1 - left:.1f}" height="{0.7 * ROW:.1f}" '
                        f'fill="{COLORS[0]}"/>')
            body.append(f'<text x="{x1 + 3:.1f}" y="{mid + 3:.1f}" font-size="9">{v:.3g}</text>')
        body.append(f'<text x="{left - 5}" y="{mid + 4:.1f}" text-anchor="end">{escape(name)}</text>')
    return _svg(width, height, body, title)
