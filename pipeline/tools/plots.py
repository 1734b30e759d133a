"""Inline SVG for the tools' HTML pages (the style of `pipeline.report.html`: no script, no network).

- `latency_chart`: one horizontal bar per measured (model, EP) row at p50, with a whisker to p99 and a
  tick at p90, on one shared linear axis;
- `tradeoff_chart`: each variant of `compare` as a point (cost rank on x, the bar's metric on y), the bar
  as a dashed line, the chosen variant ringed;
- `page`: a self-contained HTML page around tables and plots.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

__all__ = ["latency_chart", "tradeoff_chart", "page", "table", "escape"]

_W = 760
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}.note{color:#666;font-size:.9em}svg{background:#fff;border:1px solid #eee;margin:.5em 0}
"""
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def escape(text) -> str:
    return html.escape(str(text), quote=True)


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    step = 10.0 ** math.floor(math.log10(value))
    for m in (1, 2, 2.5, 5, 10):
        if value <= step * m:
            return step * m
    return value


def latency_chart(rows: Sequence[tuple[str, float, float, float]], *, colour_of: dict[str, str] | None = None,
                  unit: str = "ms") -> str:
    """rows: (label, p50, p90, p99). Bars at p50, a whisker from p50 to p99, a tick at p90."""
    if not rows:
        return ""
    left, right, top, step = 320, 70, 12, 20
    height = top + step * len(rows) + 44
    hi = _nice_max(max(r[3] for r in rows))
    scale = (_W - left - right) / hi
    parts = []
    for i in range(6):  # grid and axis labels
        v = hi * i / 5
        x = left + v * scale
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{height - 36}" stroke="#eee"/>')
        parts.append(f'<text x="{x:.1f}" y="{height - 22}" text-anchor="middle" font-size="10">{v:g}</text>')
    for i, (label, p50, p90, p99) in enumerate(rows):
        y = top + step * i
        colour = (colour_of or {}).get(label.split(" | ")[-1], _COLOURS[i % len(_COLOURS)])
        tip = f"{label}: p50 {p50:.4g}, p90 {p90:.4g}, p99 {p99:.4g} {unit}"
        parts.append(f'<rect x="{left}" y="{y}" width="{p50 * scale:.1f}" height="13" fill="{colour}">'
                     f"<title>{escape(tip)}</title></rect>")
        mid = y + 6.5
        parts.append(f'<line x1="{left + p50 * scale:.1f}" y1="{mid}" x2="{left + p99 * scale:.1f}" y2="{mid}" stroke="#333"/>')
        parts.append(f'<line x1="{left + p90 * scale:.1f}" y1="{y + 2}" x2="{left + p90 * scale:.1f}" y2="{y + 11}" stroke="#333"/>')
        parts.append(f'<line x1="{left + p99 * scale:.1f}" y1="{y}" x2="{left + p99 * scale:.1f}" y2="{y + 13}" stroke="#333"/>')
        short = label if len(label) <= 56 else "..." + label[-53:]
        parts.append(f'<text x="{left - 6}" y="{y + 11}" text-anchor="end" font-size="10">{escape(short)}</text>')
        parts.append(f'<text x="{left + p99 * scale + 4:.1f}" y="{y + 11}" font-size="10">{p50:.3g}</text>')
    parts.append(f'<text x="{(left + _W - right) / 2:.0f}" y="{height - 6}" text-anchor="middle" font-size="12">'
                 f"latency ({escape(unit)}): bar p50, tick p90, whisker end p99</text>")
    return _svg(parts, height, "latency per model and execution provider")


def tradeoff_chart(points: Sequence[tuple[str, float, float | None, bool]], *, ylabel: str,
                   bar: float | None = None) -> str:
    """points: (label, cost rank, metric or None, chosen). x: variants in cost order; y: the metric."""
    measured = [p for p in points if p[2] is not None]
    if not measured:
        return ""
    left, right, top, bottom, height = 60, 20, 16, 70, 300
    ys = [p[2] for p in measured] + ([bar] if bar is not None else [])
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.1 or max(abs(y1) * 0.01, 0.5)
    y0, y1 = y0 - pad, y1 + pad
    n = len(points)
    xs = {i: left + (i + 0.5) * (_W - left - right) / n for i in range(n)}

    def y(v: float) -> float:
        return height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom)

    parts = [f'<rect x="{left}" y="{top}" width="{_W - left - right}" height="{height - top - bottom}" fill="none" stroke="#999"/>']
    for k in range(5):
        v = y0 + (y1 - y0) * k / 4
        parts.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{_W - right}" y2="{y(v):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 4}" y="{y(v) + 3:.1f}" text-anchor="end" font-size="10">{v:.4g}</text>')
    if bar is not None:
        parts.append(f'<line x1="{left}" y1="{y(bar):.1f}" x2="{_W - right}" y2="{y(bar):.1f}" stroke="#cf222e" '
                     'stroke-dasharray="5,4"/>')
    for i, (label, _, value, chosen) in enumerate(points):
        x = xs[i]
        parts.append(f'<text x="{x:.1f}" y="{height - bottom + 14}" text-anchor="middle" font-size="10">{escape(label)}</text>')
        if value is None:
            parts.append(f'<text x="{x:.1f}" y="{(top + height - bottom) / 2:.1f}" text-anchor="middle" '
                         'font-size="10" fill="#999">not measured</text>')
            continue
        if chosen:
            parts.append(f'<circle cx="{x:.1f}" cy="{y(value):.1f}" r="9" fill="none" stroke="#111" stroke-width="1.5"/>')
        parts.append(f'<circle cx="{x:.1f}" cy="{y(value):.1f}" r="4" fill="{_COLOURS[i % len(_COLOURS)]}">'
                     f"<title>{escape(label)}: {value:.4g}</title></circle>")
    parts.append(f'<text x="{(left + _W - right) / 2:.0f}" y="{height - bottom + 34}" text-anchor="middle" font-size="12">'
                 "variants, cheapest first (NPU format order, then CPU latency, then size)</text>")
    parts.append(f'<text x="14" y="{(height - bottom + top) / 2:.1f}" text-anchor="middle" font-size="12" '
                 f'transform="rotate(-90 14 {(height - bottom + top) / 2:.1f})">{escape(ylabel)}</text>')
    return _svg(parts, height, f"{ylabel} against cost")


def _svg(parts: list[str], height: int, title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" viewBox="0 0 {_W} {height}" '
            f'role="img" aria-label="{escape(title)}">' + "".join(parts) + "</svg>")


def table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, sections: Sequence[str]) -> str:
    """A self-contained page; `sections` are HTML fragments (tables, SVG, paragraphs) in order."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{escape(title)}</h1>", *sections,
           "</body></html>"]
    return "\n".join(out) + "\n"
