"""`report.html`: the artifact's report as one self-contained page (inline SVG and CSS, no script, no
network), readable offline and deterministic (same inputs, same bytes; no times or dates in it), so the
package stage hashes it like every other file.

Plots:
- per-layer SQNR along the graph (every quantized tensor, worst ones marked) and the worst 20 as bars;
- the fallback's accuracy against the share of MACs kept in int8, one point per evaluated config;
- histograms (log counts) of the worst layers' calibration activations, with the quantization range
  quantize chose drawn over them: what is clipped and how coarse the grid is.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np

from .markdown import accuracy_header, accuracy_rows, format_value  # one number format for report.md and report.html
from .outputs import GATE_HEADER, GUARD_HEADER, OUTPUT_HEADER, gate_rows, guard_rows, output_rows

__all__ = ["render_html", "worst_histograms", "histogram_series", "svg_scatter", "svg_bars", "svg_histogram"]

_W, _H = 720, 260
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 56, 16, 16, 40
_RUNG_COLORS = {"baseline": "#444", "a16": "#1f77b4", "a16w8": "#2ca02c", "bf16": "#ff7f0e", "cpu": "#d62728"}
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}.pass{color:#1a7f37}.fail{color:#cf222e;font-weight:bold}.note{color:#666;font-size:.9em}
svg{background:#fff;border:1px solid #eee;margin:.5em 0}code{font-size:.85em}
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _num(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}"


class _Axes:
    """Linear mapping of data to an SVG plot area with ticks."""

    def __init__(self, x0, x1, y0, y1, *, width=_W, height=_H):
        self.x0, self.x1 = x0, (x1 if x1 > x0 else x0 + 1)
        self.y0, self.y1 = y0, (y1 if y1 > y0 else y0 + 1)
        self.width, self.height = width, height

    def x(self, v) -> float:
        return _PAD_L + (v - self.x0) / (self.x1 - self.x0) * (self.width - _PAD_L - _PAD_R)

    def y(self, v) -> float:
        return self.height - _PAD_B - (v - self.y0) / (self.y1 - self.y0) * (self.height - _PAD_T - _PAD_B)

    def frame(self, xlabel: str, ylabel: str, *, xticks=None, yticks=None) -> list[str]:
        parts = [
            f'<rect x="{_PAD_L}" y="{_PAD_T}" width="{self.width - _PAD_L - _PAD_R}" '
            f'height="{self.height - _PAD_T - _PAD_B}" fill="none" stroke="#999"/>',
            f'<text x="{(self.width + _PAD_L) / 2:.1f}" y="{self.height - 6}" text-anchor="middle" '
            f'font-size="12">{_e(xlabel)}</text>',
            f'<text x="14" y="{(self.height - _PAD_B + _PAD_T) / 2:.1f}" text-anchor="middle" font-size="12" '
            f'transform="rotate(-90 14 {(self.height - _PAD_B + _PAD_T) / 2:.1f})">{_e(ylabel)}</text>',
        ]
        for v in xticks if xticks is not None else _ticks(self.x0, self.x1):
            parts.append(f'<line x1="{self.x(v):.1f}" y1="{self.height - _PAD_B}" x2="{self.x(v):.1f}" '
                         f'y2="{self.height - _PAD_B + 4}" stroke="#999"/>')
            parts.append(f'<text x="{self.x(v):.1f}" y="{self.height - _PAD_B + 16}" text-anchor="middle" '
                         f'font-size="10">{_tick_label(v)}</text>')
        for v in yticks if yticks is not None else _ticks(self.y0, self.y1):
            parts.append(f'<line x1="{_PAD_L - 4}" y1="{self.y(v):.1f}" x2="{self.width - _PAD_R}" y2="{self.y(v):.1f}" '
                         'stroke="#eee"/>')
            parts.append(f'<text x="{_PAD_L - 6}" y="{self.y(v) + 3:.1f}" text-anchor="end" font-size="10">'
                         f'{_tick_label(v)}</text>')
        return parts


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    if span <= 0 or not math.isfinite(span):
        return [lo]
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [round(start + i * step, 10) for i in range(int((hi - start) / step + 1e-9) + 1)]


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.0e}"
    return f"{v:g}"


def _svg(parts: list[str], *, width=_W, height=_H, title="") -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">' + "".join(parts) + "</svg>")


def svg_scatter(points: Sequence[tuple[float, float, str, str]], *, xlabel: str, ylabel: str, title: str,
                hline: float | None = None, xlim=None, ylim=None, rings: Sequence[int] = ()) -> str:
    """Points (x, y, colour, tooltip); a dashed horizontal line (a gate threshold); rings around some."""
    if not points:
        return ""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points] + ([hline] if hline is not None else [])
    x0, x1 = xlim or (min(xs), max(xs))
    y0, y1 = ylim or (min(ys), max(ys))
    pad = (y1 - y0) * 0.05 or 0.5
    xpad = 0.0 if xlim else (x1 - x0) * 0.02 or 0.5
    ax = _Axes(x0 - xpad, x1 + xpad, y0 - pad, y1 + pad)
    parts = ax.frame(xlabel, ylabel)
    if hline is not None:
        parts.append(f'<line x1="{_PAD_L}" y1="{ax.y(hline):.1f}" x2="{_W - _PAD_R}" y2="{ax.y(hline):.1f}" '
                     'stroke="#cf222e" stroke-dasharray="5,4"/>')
    for i in rings:
        x, y = points[i][0], points[i][1]
        parts.append(f'<circle cx="{ax.x(x):.1f}" cy="{ax.y(y):.1f}" r="8" fill="none" stroke="#111" stroke-width="1.5"/>')
    for x, y, colour, tip in points:
        parts.append(f'<circle cx="{ax.x(x):.1f}" cy="{ax.y(y):.1f}" r="3.5" fill="{colour}">'
                     f"<title>{_e(tip)}</title></circle>")
    return _svg(parts, title=title)


def svg_bars(rows: Sequence[tuple[str, float, str]], *, xlabel: str, title: str) -> str:
    """Horizontal bars (label, value, colour), in the given order."""
    if not rows:
        return ""
    height = 24 + 18 * len(rows) + 40
    left = 330
    lo = min(0.0, min(v for _, v, _ in rows))
    hi = max(v for _, v, _ in rows) or 1.0
    scale = (_W - left - 48) / (hi - lo)  # room for the value after the longest bar
    parts = []
    for i, (label, value, colour) in enumerate(rows):
        y = 16 + 18 * i
        x = left + (min(value, 0) - lo) * scale
        parts.append(f'<rect x="{x:.1f}" y="{y}" width="{abs(value) * scale:.1f}" height="13" fill="{colour}">'
                     f"<title>{_e(label)}: {_num(value)}</title></rect>")
        short = label if len(label) <= 52 else "..." + label[-49:]
        parts.append(f'<text x="{left - 6}" y="{y + 11}" text-anchor="end" font-size="10">{_e(short)}</text>')
        parts.append(f'<text x="{x + abs(value) * scale + 4:.1f}" y="{y + 11}" font-size="10">{_num(value, 1)}</text>')
    parts.append(f'<text x="{(left + _W) / 2:.0f}" y="{height - 8}" text-anchor="middle" font-size="12">{_e(xlabel)}</text>')
    return _svg(parts, height=height, title=title)


def histogram_series(stats, *, bins: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """(edges, counts) of a `TensorStats` histogram, rebinned to `bins` over the occupied range."""
    nz = np.flatnonzero(stats.hist)
    if nz.size == 0:
        return np.array([stats.min, stats.max]), np.zeros(1)
    edges = stats.edges()
    lo, hi = edges[nz[0]], edges[nz[-1] + 1]
    centres = (edges[:-1] + edges[1:]) / 2
    target = np.linspace(lo, hi, bins + 1)
    counts, _ = np.histogram(centres[nz], bins=target, weights=stats.hist[nz].astype(np.float64))
    return target, counts


def svg_histogram(edges: np.ndarray, counts: np.ndarray, *, lo: float, hi: float, title: str,
                  bits: int | None = None) -> str:
    """Log10(count + 1) bars, with the quantization range [lo, hi] as two vertical lines."""
    width, height = 350, 190
    x0, x1 = min(float(edges[0]), lo), max(float(edges[-1]), hi)
    y = np.log10(counts + 1)
    ax = _Axes(x0, x1, 0, max(float(y.max()), 1.0), width=width, height=height)
    parts = ax.frame("value", "log10(count+1)", xticks=_ticks(x0, x1, 4), yticks=_ticks(0, ax.y1, 3))
    for left, right, v in zip(edges[:-1], edges[1:], y):
        if v <= 0:
            continue
        parts.append(f'<rect x="{ax.x(left):.1f}" y="{ax.y(v):.1f}" width="{max(ax.x(right) - ax.x(left), 0.5):.1f}" '
                     f'height="{ax.y(0) - ax.y(v):.1f}" fill="#6a8fc7"/>')
    for v in (lo, hi):
        parts.append(f'<line x1="{ax.x(v):.1f}" y1="{_PAD_T}" x2="{ax.x(v):.1f}" y2="{height - _PAD_B}" '
                     'stroke="#cf222e" stroke-width="1.5"/>')
    label = f"range [{lo:.3g}, {hi:.3g}]" + (f", {bits} bits" if bits else "")
    parts.append(f'<text x="{width - _PAD_R}" y="{_PAD_T + 12}" text-anchor="end" font-size="10">{_e(label)}</text>')
    return _svg(parts, width=width, height=height, title=title)


# ------------------------------------------------------------------------------------ page


def render_html(
    *,
    manifest: dict,
    metrics: dict,
    layer_errors: dict | None = None,
    fallback: dict | None = None,
    transforms: dict | None = None,
    histograms: Sequence[dict] = (),
) -> str:
    """The page. `histograms`: [{tensor, edges, counts, lo, hi, bits, sqnr_db}] for the worst layers."""
    title = f"{manifest['name']}: {manifest['format'].upper()} for {manifest['target']}"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    if manifest.get("description"):
        out.append(f"<p>{_e(manifest['description'])}</p>")
    out += _accuracy(manifest, metrics)
    if transforms:
        out += _transforms(transforms)
    if layer_errors and layer_errors.get("layers"):
        out += _layers(layer_errors)
    if fallback:
        out += _fallback(fallback, manifest.get("gates", []))
    if histograms:
        out += _histograms(histograms)
    out += _placement(manifest)
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _accuracy(manifest: dict, metrics: dict) -> list[str]:
    rows = [(_e(a), _e(b), _e(c)) for a, b, c in accuracy_rows(metrics)]
    out = ["<h2>Accuracy</h2>",
           f"<p>Validated on {_e(metrics.get('samples'))} held-out samples ({_e(metrics.get('task'))}). "
           f"NPU column: {_e(metrics.get('numerics', ''))}. CPU EP: onnxruntime's fused kernels.</p>",
           _table(accuracy_header(metrics), rows)]
    cell = lambda c: '<span class="fail">FAIL</span>' if c == "**FAIL**" else _e(c.replace("**", ""))  # noqa: E731
    if manifest.get("gates"):
        out += ["<h2>Gates</h2>", _table(GATE_HEADER, [tuple(map(cell, r)) for r in gate_rows(manifest["gates"])])]
    out += ["<h2>Outputs</h2>", _table(OUTPUT_HEADER, [tuple(map(cell, r)) for r in output_rows(metrics)])]
    if guard_rows(manifest.get("range_guard")):
        out += ["<h2>Range guard</h2>", _table(GUARD_HEADER, [tuple(map(_e, r)) for r in guard_rows(manifest["range_guard"])])]
    return out


def _transforms(transforms: dict) -> list[str]:
    out = ["<h2>Accuracy transforms</h2>"]
    for name, part in sorted(transforms.items()):
        applied, skipped = part.get("applied", []), part.get("skipped", [])
        out.append(f"<p><b>{_e(name.replace('_', ' '))}</b>: applied to {len(applied)}, skipped {len(skipped)}"
                   + (f" (statistics from {part['samples']} calibration samples)" if part.get("samples") else "")
                   + ".</p>")
        if name == "smoothquant" and applied:
            rows = [(f"<code>{_e(a['tensor'])}</code>", _e(a["folded_into"]),
                     f"{a['act_range_before']:.3g} &rarr; {a['act_range_after']:.3g}",
                     f"{a['weight_range_before']:.3g} &rarr; {a['weight_range_after']:.3g}") for a in applied]
            out.append(_table(("input smoothed", "1/s folded into", "activation max", "weight max"), rows))
        if skipped:
            reasons: dict[str, int] = {}
            for s in skipped:
                reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
            out.append('<p class="note">Skipped: ' + "; ".join(f"{_e(r)} ({n})" for r, n in sorted(reasons.items()))
                       + "</p>")
    return out


def _layers(report: dict) -> list[str]:
    layers = report["layers"]
    worst = layers[:20]
    worst_names = {w["tensor"] for w in layers[:10]}
    ordered = sorted(layers, key=lambda x: (x.get("order", 0), x["tensor"]))
    points = [(float(i), l["sqnr_db"], "#cf222e" if l["tensor"] in worst_names else "#1f77b4",
               f"{l['tensor']} ({l['op_type']}): {l['sqnr_db']:.1f} dB") for i, l in enumerate(ordered)]
    out = ["<h2>Per-layer error</h2>",
           f"<p>SQNR of each quantized tensor against the float graph, accumulated up to that point "
           f"(NPU-emulated, {report.get('samples')} validation samples, float model "
           f"<code>{_e(report.get('float_model', ''))}</code>). Red: the 10 worst.</p>",
           svg_scatter(points, xlabel="quantized tensor, in graph order", ylabel="SQNR (dB)",
                       title="per-layer SQNR"),
           svg_bars([(l["tensor"], l["sqnr_db"], "#cf222e") for l in worst], xlabel="SQNR (dB), worst 20",
                    title="worst layers")]
    rows = [(str(i + 1), f"<code>{_e(l['tensor'])}</code>", _e(l["op_type"]), _num(l["sqnr_db"]),
             format_value(l["cosine"]), _e(l.get("note", ""))) for i, l in enumerate(layers[:15])]
    out.append(_table(("#", "tensor", "op", "SQNR (dB)", "cosine", "note"), rows))
    return out


_RUNG_AXES = {  # x of each rung's curve: the share that rung gives up
    "a16": ("MACs still in int8 (%)", lambda sh: 100 * sh["mac_share_int8"]),
    "a16w8": ("MACs still in int8 (%)", lambda sh: 100 * sh["mac_share_int8"]),
    "bf16": ("MACs moved to BF16 (%)", lambda sh: 100 * sh["macs_bf16"] / sh["macs_total"] if sh.get("macs_total") else 0),
    "cpu": ("MACs moved to the CPU (%)", lambda sh: 100 * (1 - sh["mac_share_npu"])),
}


def _fallback(fallback: dict, gates: Sequence[dict]) -> list[str]:
    points = fallback.get("points", [])
    out = ["<h2>Accuracy-aware fallback</h2>",
           "<p>Each point: one configuration the search quantized and scored on the held-out calibration split "
           "(never the validation set); one plot per rung, x the share that rung gives up, the dashed line the "
           "gate, the chosen configuration circled. Colours: "
           + ", ".join(f'<span style="color:{c}">{r}</span>' for r, c in _RUNG_COLORS.items()) + ".</p>"]
    metric = _curve_metric(points)
    threshold = next((g["min"] for g in gates if g["metric"] == metric and g.get("min") is not None), None)
    chosen = fallback.get("chosen")
    previous = [p for p in points if p["rung"] == "baseline" and metric in p["metrics"]]
    for rung, (xlabel, xof) in _RUNG_AXES.items():
        scored = previous[-1:] + [p for p in points if p["rung"] == rung and metric in p["metrics"]]
        if len(scored) < 2:
            continue
        pts = [(xof(p["shares"]), p["metrics"][metric], _RUNG_COLORS.get(p["rung"], "#444"),
                f"{p['rung']} +{p['units']}: {metric} {p['metrics'][metric]:.4f}, int8 MACs "
                f"{100 * p['shares']['mac_share_int8']:.1f}%, NPU MACs {100 * p['shares']['mac_share_npu']:.1f}%")
               for p in scored]
        rings = [i for i, p in enumerate(scored) if chosen and p["rung"] == chosen["rung"]
                 and p["units"] == chosen["units"]]
        out.append(f"<p><b>{_e(rung)}</b></p>" + svg_scatter(
            pts, xlabel=xlabel, ylabel=f"held-out {metric}", title=f"fallback curve {rung}", hline=threshold,
            xlim=(0.0, 100.0), rings=rings[-1:]))
        # The next rung starts from where this one stopped (its longest prefix).
        last = max((p for p in scored if p["rung"] == rung), key=lambda p: p["units"])
        previous = [last]
    rows = [(_e(p["rung"]), str(p["units"]), *(format_value(p["metrics"].get(m)) for m in _metric_columns(points)),
             f"{100 * p['shares']['mac_share_int8']:.1f}", f"{100 * p['shares']['mac_share_npu']:.1f}",
             f"{100 * p['shares']['node_share_npu']:.1f}",
             '<span class="pass">pass</span>' if p["passed"] else "fail") for p in points]
    out.append(_table(("rung", "units", *_metric_columns(points), "int8 MACs %", "NPU MACs %", "NPU nodes %",
                       "gates"), rows))
    config = fallback.get("config", {})
    out.append(f"<p>Chosen: {len(config.get('promoted_to_16_bits', []))} tensors at 16 bits, "
               f"{len(config.get('a16w8_nodes', []))} MAC nodes reading 16 bits, "
               f"{len(config.get('bf16_nodes', []))} nodes in BF16, {len(config.get('cpu_nodes', []))} on the CPU; "
               f"gates on the held-out split {'hold' if fallback.get('passed') else 'still fail'}.</p>")
    out += [f'<p class="note">{_e(n)}</p>' for n in fallback.get("notes", [])]
    return out


def _metric_columns(points) -> list[str]:
    keys = sorted({k for p in points for k in p["metrics"]})
    preferred = [k for k in ("cosine_mean", "nn_agreement", "top1_agreement", "accuracy", "sqnr_db") if k in keys]
    return preferred or keys[:3]


def _curve_metric(points) -> str | None:
    cols = _metric_columns(points)
    return cols[0] if cols else None


def _histograms(histograms: Sequence[dict]) -> list[str]:
    out = ["<h2>Activations of the worst layers</h2>",
           "<p>Calibration histograms (the statistics quantize used) with the chosen quantization range in red: "
           "values outside it are clipped, and the range over 2<sup>bits</sup> levels is the step.</p>"]
    for h in histograms:
        out.append(f"<div><p><code>{_e(h['tensor'])}</code>: SQNR {h['sqnr_db']:.1f} dB</p>"
                   + svg_histogram(np.asarray(h["edges"]), np.asarray(h["counts"]), lo=h["lo"], hi=h["hi"],
                                   bits=h.get("bits"), title=h["tensor"]) + "</div>")
    return out


def _placement(manifest: dict) -> list[str]:
    placement = manifest.get("placement", {})
    if not placement:
        return []
    rows = [(_e(k.replace("_", " ")), _e(format_value(v))) for k, v in sorted(placement.items())]
    return ["<h2>Placement (predicted)</h2>", _table(("", "value"), rows)]


def worst_histograms(layer_errors: dict | None, stats_path, ranges: dict, *, count: int = 6) -> list[dict]:
    """Histogram data of the `count` worst layers that have calibration statistics and a range."""
    from pathlib import Path

    from ..quant.histogram import StatsCollector

    if not layer_errors or stats_path is None or not Path(stats_path).is_file():
        return []
    collector = StatsCollector.load(Path(stats_path))
    found = []
    for layer in layer_errors.get("layers", []):
        name = layer["tensor"]
        if name not in collector or name not in ranges:
            continue
        edges, counts = histogram_series(collector[name])
        r = ranges[name]
        found.append({"tensor": name, "edges": edges.tolist(), "counts": counts.tolist(), "lo": float(r["lo"]),
                      "hi": float(r["hi"]), "bits": r.get("bits"), "sqnr_db": layer["sqnr_db"]})
        if len(found) == count:
            break
    return found
