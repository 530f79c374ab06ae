"""The run report's two kinds of plot (histograms; points against curves) as small SVG documents.

Why not matplotlib, which the rest of the project plots with: the report is written at the end of every `infer`, inside
its wall clock, and matplotlib's import and first render cost about 2 s on 2 cores (6 % of a 1,000-image run); these
plots need bars, dots, lines and tick labels, which SVG draws in milliseconds and any browser renders offline."""

from __future__ import annotations

import html

import numpy as np

WIDTH, HEIGHT = 360, 240
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 48, 12, 12, 40
BAR_COLOR, POINT_COLOR = "#4477aa", "#4477aa"


def _ticks(low: float, high: float, count: int = 5) -> np.ndarray:
    """Round tick values (1, 2 or 5 × a power of ten apart) inside [low, high]."""
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return np.array([low])
    raw_step = (high - low) / count
    power = 10 ** np.floor(np.log10(raw_step))
    step = min((factor * power for factor in (1, 2, 5, 10) if factor * power >= raw_step), default=10 * power)
    return np.arange(np.ceil(low / step) * step, high + step * 1e-9, step)


class _Frame:
    """Maps data coordinates to SVG pixels inside the margins, and draws the axes with their ticks and labels."""

    def __init__(self, x_range, y_range, width=WIDTH, height=HEIGHT):
        self.x_low, self.x_high = x_range
        self.y_low, self.y_high = y_range
        self.width, self.height = width, height
        self.parts: list[str] = []

    def x(self, value):
        return MARGIN_LEFT + (np.asarray(value, float) - self.x_low) / (self.x_high - self.x_low or 1) * (self.width - MARGIN_LEFT - MARGIN_RIGHT)

    def y(self, value):
        return self.height - MARGIN_BOTTOM - (np.asarray(value, float) - self.y_low) / (self.y_high - self.y_low or 1) * (self.height - MARGIN_TOP - MARGIN_BOTTOM)

    def axes(self, x_label: str, y_label: str) -> None:
        bottom, left = self.height - MARGIN_BOTTOM, MARGIN_LEFT
        self.parts.append(f"<path d='M{left},{MARGIN_TOP}V{bottom}H{self.width - MARGIN_RIGHT}' stroke='#333' fill='none'/>")
        for value in _ticks(self.x_low, self.x_high):
            position = self.x(value)
            self.parts.append(f"<path d='M{position:.1f},{bottom}v4' stroke='#333'/><text x='{position:.1f}' y='{bottom + 15}' text-anchor='middle'>{value:g}</text>")
        for value in _ticks(self.y_low, self.y_high):
            position = self.y(value)
            self.parts.append(f"<path d='M{left},{position:.1f}h-4' stroke='#333'/><text x='{left - 6}' y='{position + 4:.1f}' text-anchor='end'>{value:g}</text>")
        self.parts.append(f"<text x='{(left + self.width - MARGIN_RIGHT) / 2:.0f}' y='{self.height - 6}' text-anchor='middle'>{html.escape(x_label)}</text>")
        self.parts.append(f"<text transform='translate(12,{(MARGIN_TOP + bottom) / 2:.0f}) rotate(-90)' text-anchor='middle'>{html.escape(y_label)}</text>")

    def svg(self) -> str:
        return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{self.width}' height='{self.height}' viewBox='0 0 {self.width} {self.height}' "
                f"font-family='sans-serif' font-size='11'>{''.join(self.parts)}</svg>")


def histogram(values: np.ndarray, x_label: str, bins: int = 30) -> str:
    """Counts per bin as bars; the y axis counts images."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    counts, edges = np.histogram(values, bins=bins) if len(values) else (np.zeros(1), np.array([0.0, 1.0]))
    frame = _Frame((edges[0], edges[-1]), (0, max(1, counts.max()) * 1.05))
    for count, left, right in zip(counts, edges[:-1], edges[1:]):
        if count:
            top = frame.y(count)
            frame.parts.append(f"<rect x='{frame.x(left):.1f}' y='{top:.1f}' width='{max(frame.x(right) - frame.x(left) - 0.5, 0.5):.1f}' "
                               f"height='{frame.y(0) - top:.1f}' fill='{BAR_COLOR}'/>")
    frame.axes(x_label, "images")
    return frame.svg()


def points_with_curves(x, y, curves: list[tuple[str, np.ndarray, np.ndarray, str]], x_label: str, y_label: str,
                       max_points: int = 2000, width: int = 560, height: int = 340) -> str:
    """Points (x, y) over labelled curves [(label, x, y, colour)]. Past `max_points` the points are binned on a 60 × 40
    grid and each occupied cell is shaded by its count, so the SVG stays small at any number of rows."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    all_x = np.concatenate([x, *[curve[1] for curve in curves]])
    all_y = np.concatenate([y, *[curve[2][np.isfinite(curve[2])] for curve in curves]])
    pad_y = 0.05 * (np.nanmax(all_y) - np.nanmin(all_y) or 1)
    frame = _Frame((np.nanmin(all_x), np.nanmax(all_x)), (np.nanmin(all_y) - pad_y, np.nanmax(all_y) + pad_y), width, height)
    if len(x) > max_points:
        counts, x_edges, y_edges = np.histogram2d(x, y, bins=(60, 40), range=((frame.x_low, frame.x_high), (frame.y_low, frame.y_high)))
        for (column, row) in zip(*np.nonzero(counts)):
            shade = 0.25 + 0.75 * np.log1p(counts[column, row]) / np.log1p(counts.max())
            left, top = frame.x(x_edges[column]), frame.y(y_edges[row + 1])
            frame.parts.append(f"<rect x='{left:.1f}' y='{top:.1f}' width='{frame.x(x_edges[column + 1]) - left:.1f}' "
                               f"height='{frame.y(y_edges[row]) - top:.1f}' fill='{POINT_COLOR}' fill-opacity='{shade:.2f}'/>")
    else:
        frame.parts.extend(f"<circle cx='{px:.1f}' cy='{py:.1f}' r='2.5' fill='{POINT_COLOR}'/>" for px, py in zip(frame.x(x), frame.y(y)))
    for index, (label, curve_x, curve_y, color) in enumerate(curves):
        finite = np.isfinite(curve_y)
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in zip(frame.x(curve_x[finite]), frame.y(curve_y[finite])))
        frame.parts.append(f"<polyline points='{path}' fill='none' stroke='{color}' stroke-width='1.5'/>")
        frame.parts.append(f"<text x='{MARGIN_LEFT + 8}' y='{MARGIN_TOP + 12 + 14 * index}' fill='{color}'>{html.escape(label)}</text>")
    frame.axes(x_label, y_label)
    return frame.svg()
