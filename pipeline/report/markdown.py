"""The human-readable report of an artifact (`report.md`) and the accuracy table the CLI prints."""

from __future__ import annotations

from .outputs import GATE_HEADER, GUARD_HEADER, OUTPUT_HEADER, gate_rows, guard_rows, output_rows

__all__ = ["render_markdown", "accuracy_header", "accuracy_rows", "format_table", "format_value"]

_ROWS = [
    ("accuracy_float", "float accuracy (%)"),
    ("accuracy", "quantized accuracy (%)"),
    ("accuracy_drop", "accuracy drop (pt)"),
    ("top1_agreement", "top-1 agreement with float (%)"),
    ("top1_agreement_confident", "top-1 agreement, confident positions (%)"),
    ("boxes_matched", "float boxes matched (%)"),
    ("boxes_precision", "quantized boxes matching a float one (%)"),
    ("nonblank_agreement", "agreement on non-blank steps (%)"),
    ("string_agreement", "decoded strings equal (%)"),
    ("char_error_rate", "character error rate (%)"),
    ("map_iou", "thresholded map IoU (%)"),
    ("map_iou_min", "thresholded map IoU, worst sample (%)"),
    ("exact_agreement", "exact agreement (%)"),
    ("cosine_mean", "cosine to float, mean"),
    ("cosine_min", "cosine to float, min"),
    ("nn_agreement", "nearest-neighbour agreement (%)"),
    ("sqnr_db", "SQNR (dB)"),
    ("sqnr_db_worst_channel", "SQNR of the worst channel (dB)"),
    ("dead_channels", "dead channels"),
    ("rel_error", "relative error"),
    ("max_abs_error", "max abs error"),
]


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def _share(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def accuracy_header(metrics: dict) -> tuple[str, str, str]:
    """The accuracy table's columns; the CPU-EP one says when it covers fewer samples than validation."""
    cpu = metrics.get("cpu_ep", {})
    subset = cpu.get("samples") is not None and cpu["samples"] < metrics.get("samples", 0)
    return ("metric", "NPU (emulated)", f"CPU EP (first {cpu['samples']} samples)" if subset else "CPU EP")


def accuracy_rows(metrics: dict) -> list[tuple[str, str, str]]:
    """(metric, NPU-emulated value, CPU-EP value) for every metric that was measured."""
    cpu = metrics.get("cpu_ep", {})
    return [
        (label, format_value(metrics.get(key)), format_value(cpu.get(key)) if key != "accuracy_float" else "")
        for key, label in _ROWS
        if key in metrics
    ]


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]], *, markdown: bool = False) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)
    line = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def render_markdown(
    manifest: dict,
    metrics: dict,
    records: dict,
    inspection,
    *,
    layer_errors: dict | None = None,
    transforms: dict | None = None,
    fallback: dict | None = None,
) -> str:
    numerics = metrics.get("numerics", "")
    lines = [
        f"# {manifest['name']}: {manifest['format'].upper()} for {manifest['target']}",
        "",
        manifest.get("description") or "",
        "",
        f"Validated on {metrics.get('samples')} held-out samples; every output below, the table for the task "
        f"output `{metrics.get('task_output')}` ({metrics.get('task')}). NPU column: {numerics}, what the NPU "
        "computes. CPU-EP column: the same model on onnxruntime's CPU kernels (fused int8, which saturate on "
        "x86 without VNNI).",
        "",
        "## Accuracy",
        "",
        format_table(accuracy_header(metrics), accuracy_rows(metrics), markdown=True),
        "",
        "## Gates",
        "",
    ]
    gates = manifest.get("gates", [])
    if gates:
        lines.append(format_table(GATE_HEADER, gate_rows(gates), markdown=True))
    else:
        lines.append("No gates.")
    lines += ["", "## Outputs", "",
              "Every output by name. Worst channel: the channel with the lowest SQNR; dead channels: quantized to "
              "a constant while the float ones vary (a default gate fails the run on them).", "",
              format_table(OUTPUT_HEADER, output_rows(metrics), markdown=True)]
    guard = manifest.get("range_guard")
    if guard and (guard.get("findings") or guard.get("notes")):
        lines += ["", "## Range guard", "",
                  "Tensors whose parts differ in range by orders of magnitude (one scale would round the small part "
                  "away), found from the calibration statistics and kept at a precision that holds.", ""]
        if guard.get("findings"):
            lines.append(format_table(GUARD_HEADER, guard_rows(guard), markdown=True))
        lines += ["", *(f"- {note}" for note in guard.get("notes", []))] if guard.get("notes") else []
    placement = manifest.get("placement", {})
    lines += ["", "## Placement (predicted)", ""]
    if placement:
        nodes = placement["nodes_npu"] + placement["nodes_cpu"]
        lines += [
            f"- verdict: {'ready' if placement['ready'] else '**NOT READY**'} for {manifest['target']} "
            f"({placement['violations']} violation(s), {placement['warnings']} warning(s); see placement.json)",
            f"- nodes on the NPU: {placement['nodes_npu']} of {nodes} ({_share(placement['npu_node_share'])})",
            f"- MACs on the NPU: {placement['macs_npu']:,} of {placement['macs_total']:,} "
            f"({_share(placement['npu_mac_share'])})",
            f"- NPU<->CPU transitions: {placement['transitions']}",
        ]
    shares = manifest.get("quantization", {}).get("mac_shares")
    if shares:
        lines.append(f"- MACs int8 x int8 (activation and weight from 8-bit Q/DQ): {_share(shares['mac_share_int8'])}; "
                     f"16-bit: {_share(shares['mac_share_16'])}; float: {_share(shares['mac_share_float'])}")
    cpu_nodes = [p for p in inspection.placement if p.device == "CPU"]
    if cpu_nodes:
        lines += ["", "Nodes predicted to fall back to the CPU:", ""]
        lines += [f"- `{p.node}` ({p.op_type}): {p.reason}" for p in cpu_nodes[:50]]
        if len(cpu_nodes) > 50:
            lines.append(f"- ... and {len(cpu_nodes) - 50} more (see placement.json)")
    lines += _accuracy_work(transforms, fallback, layer_errors)
    lines += ["", "## Stages", ""]
    rows = [(name, f"{rec.seconds:.2f}") for name, rec in records.items()]
    lines.append(format_table(("stage", "seconds"), rows, markdown=True))
    lines += ["", "## Files", ""]
    lines += [f"- `{name}` sha256 `{digest}`" for name, digest in manifest["files"].items()]
    return "\n".join(lines) + "\n"


def _accuracy_work(transforms: dict | None, fallback: dict | None, layer_errors: dict | None) -> list[str]:
    """Sections for the accuracy transforms, the fallback search and the worst layers (report.html plots them)."""
    lines: list[str] = []
    if transforms:
        lines += ["", "## Accuracy transforms", ""]
        for name, part in sorted(transforms.items()):
            reasons = sorted({s["reason"] for s in part.get("skipped", [])})
            lines.append(f"- {name.replace('_', ' ')}: applied to {len(part.get('applied', []))}, skipped "
                         f"{len(part.get('skipped', []))}" + (f" ({'; '.join(reasons[:3])})" if reasons else ""))
    if fallback:
        lines += ["", "## Accuracy-aware fallback", "",
                  "Gates checked on a held-out split of the calibration data, not on the validation set.", ""]
        metrics = sorted({k for p in fallback["points"] for k in p["metrics"]} & {"cosine_mean", "nn_agreement",
                                                                                 "top1_agreement", "sqnr_db"})
        rows = [(p["rung"], str(p["units"]), *(format_value(p["metrics"].get(m)) for m in metrics),
                 _share(p["shares"]["mac_share_int8"]), _share(p["shares"]["mac_share_npu"]),
                 _share(p["shares"]["node_share_npu"]), "pass" if p["passed"] else "fail") for p in fallback["points"]]
        lines.append(format_table(("rung", "units", *metrics, "int8 MACs", "NPU MACs", "NPU nodes", "gates"), rows,
                                  markdown=True))
        config = fallback["config"]
        lines += ["", f"Chosen: {len(config['promoted_to_16_bits'])} tensors at 16 bits, "
                  f"{len(config.get('a16w8_nodes', []))} MAC nodes reading 16 bits, {len(config['bf16_nodes'])} "
                  f"nodes in BF16, {len(config['cpu_nodes'])} on the CPU; the held-out gates "
                  f"{'hold' if fallback['passed'] else 'still fail'}."]
        lines += [f"- {note}" for note in fallback.get("notes", [])]
    if layer_errors and layer_errors.get("layers"):
        lines += ["", "## Worst layers (per-layer SQNR)", "",
                  f"NPU-emulated, {layer_errors.get('samples')} validation samples, against "
                  f"`{layer_errors.get('float_model', '')}`; all layers in layer_errors.json.", ""]
        rows = [(str(i + 1), f"`{l['tensor']}`", l["op_type"], f"{l['sqnr_db']:.2f}", format_value(l["cosine"]),
                 l.get("note", "")) for i, l in enumerate(layer_errors["layers"][:10])]
        lines.append(format_table(("#", "tensor", "op", "SQNR (dB)", "cosine", "note"), rows, markdown=True))
    return lines
