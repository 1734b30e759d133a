"""Tables both reports share: every output by name, the gates (with their output), the range guard.

Rows are plain strings; `report.md` writes them as markdown tables, `report.html` escapes them into HTML.
"""

from __future__ import annotations

__all__ = ["output_rows", "gate_rows", "guard_rows", "OUTPUT_HEADER", "GATE_HEADER", "GUARD_HEADER",
           "TASK_COLUMNS"]

# The task metrics shown per output (the most telling first); all of them are in metrics.json.
TASK_COLUMNS = {
    "classification": ("top1_agreement", "top1_agreement_confident", "accuracy"),
    "embedding": ("nn_agreement",),
    "detection": ("boxes_matched", "boxes_precision"),
    "ctc": ("nonblank_agreement", "string_agreement", "char_error_rate", "step_agreement"),
    "dense": ("map_iou", "map_iou_min", "pixel_agreement"),
}
_LABELS = {
    "top1_agreement": "top-1 agr.", "top1_agreement_confident": "confident top-1 agr.", "accuracy": "accuracy",
    "nn_agreement": "NN agr.", "boxes_matched": "boxes matched", "boxes_precision": "box precision",
    "nonblank_agreement": "non-blank agr.", "string_agreement": "strings equal", "char_error_rate": "CER",
    "step_agreement": "step agr.", "map_iou": "map IoU", "map_iou_min": "worst IoU", "pixel_agreement": "pixel agr.",
}

OUTPUT_HEADER = ("output", "task", "dtype, shape", "SQNR dB", "worst channel", "dead channels", "cosine mean",
                 "rel. error", "task metrics (%)")
GATE_HEADER = ("output", "metric", "value", "min", "max", "result", "note")
GUARD_HEADER = ("tensor", "op", "what mixes", "ranges", "kept at")


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def output_rows(metrics: dict) -> list[tuple[str, ...]]:
    """One row per model output: its generic metrics by dtype, then its task's."""
    rows = []
    for name, m in (metrics.get("outputs") or {}).items():
        task = m.get("task") or "-"
        shape = f"{m.get('dtype', '?')} {m.get('shape', [])}"
        if "exact_agreement" in m:  # integer output: exact comparison only
            rows.append((name, task, shape, "-", "-", "-", "-", "-",
                         f"exact {_num(m['exact_agreement'])}, samples equal {_num(m['sample_agreement'])}"
                         + _task_text(m, task, sep="; ")))
            continue
        worst = (f"{m['sqnr_db_worst_channel']:.1f} dB (ch {m['worst_channel']}, axis {m['channel_axis']})"
                 if "sqnr_db_worst_channel" in m else "-")
        dead = (f"**{m['dead_channels']}** ({m['dead_channel_list']})" if m.get("dead_channels") else
                "0" if "dead_channels" in m else "-")
        rows.append((name, task, shape, _num(m.get("sqnr_db")), worst, dead, _num(m.get("cosine_mean")),
                     _num(m.get("rel_error")), _task_text(m, task)))
    return rows


def _task_text(m: dict, task: str, sep: str = "") -> str:
    parts = [f"{_LABELS[k]} {_num(m[k])}" for k in TASK_COLUMNS.get(task, ()) if k in m]
    parts += [f"{_LABELS.get(k, k)}: not measured" for k in TASK_COLUMNS.get(task, ()) if k in m.get("not_measured", {})]
    text = ", ".join(parts)
    return (sep + text) if sep and text else (text or ("" if sep else "-"))


def gate_rows(gates: list[dict]) -> list[tuple[str, ...]]:
    rows = []
    for g in gates:
        note = g.get("note") or ("default gate" if g.get("default") else "")
        rows.append((g.get("output") or "-", g["metric"], _num(g["value"]), _num(g["min"]), _num(g["max"]),
                     "pass" if g["passed"] else "**FAIL**", note))
    return rows


def guard_rows(guard: dict | None) -> list[tuple[str, ...]]:
    if not guard:
        return []
    return [(f["tensor"], f["op_type"], f"{f['kind']}: {f['small']}",
             f"{f['range_big']:.3g} vs {f['range_small']:.3g} ({f['ratio']:.0f}x)",
             "float (CPU)" if f["action"] == "float" else "16 bits") for f in guard.get("findings", [])]
