"""NPU readiness and placement prediction for any ONNX model (float or QDQ-quantized), against a Target.

Hard rules (violations: `raise_for_violations` raises ReadinessError; the VitisAI EP would reject the model,
or silently produce wrong results):
- `opset`: the default-domain opset is outside the target's range;
- `forbidden-op`: Loop, If or Scan (the target's `forbidden_ops`);
- `static-shape`: a graph input dim (or, when every input is static, an output dim) is dynamic;
- `batch-one`: a static batch > 1 on a rank >= 2 input of a CNN (a model with Conv/ConvTranspose);
- `format`: the model's Q/DQ types form a format the target does not take (e.g. u8s8 on xdna2);
- `qdq-dtype`: an activation or weight Q/DQ type is not the format's (e.g. uint8 activations under a8w8);
- `zero-point`: a non-symmetric zero point under a symmetric format (0; 128 for uint8, Quark's XINT8 form);
- `pow2-scale`: a scale that is not an exact power of two under xint8;
- `bias-int32`: a Conv/ConvTranspose/Gemm bias that is not an int32 DequantizeLinear (int8 bias DQ, or a
  float bias on a node whose input and weight are dequantized).

Soft (warnings): opset other than the recommended 17, batch > 1 on a non-CNN, per-channel Q/DQ under a
per-tensor format (the X2 compiler's acceptance is not documented), fewer Conv layers than the target's
`min_conv_layers`, nodes predicted on the CPU, a `fmt` that disagrees with the model's Q/DQ types, shapes
or constants the inspection could not read.

Placement facts (neither): an op outside the target's table, or a compute op a quantized model leaves
float, runs on the CPU. That is what `exclude_nodes` asks for, so it is reported, not refused.

Placement (which nodes run on the NPU, MACs, NPU<->CPU transitions) is predicted by
`pipeline.targets.placement`; its docstring states the rule. MACs count Conv, ConvTranspose, MatMul and
Gemm from the shapes onnx shape inference finds; a node whose shapes stay unknown is left out of both
totals, with a warning.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..core.fileio import atomic_write
from ..core.formats import Format
from ..core.graph import Graph, infer_shapes
from ..core.ops import MAC_OPS
from ..errors import ReadinessError
from ..targets import Target, get_target
from ..targets.placement import Placement, predict_placement
from .rules import Finding, candidate_formats, check_graph, check_qdq, qdq_info

__all__ = ["Finding", "Placement", "Inspection", "inspect_model", "write_json"]

_SHOW = 30  # rows per list in table()


@dataclass
class Inspection:
    """What `inspect_model` found: hard violations, soft warnings, and the predicted placement.

    `placement` lists the counted nodes in graph order; Q/DQ, Constant and bfloat16 Cast nodes are in
    `attached` with the device of the compute they wrap. Shares are None when there is nothing to count.
    """

    model: str
    target: str
    format: Format
    detected_format: Format | None  # from the Q/DQ types; None for a float model
    quantized: bool
    opset: int
    violations: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    placement: list[Placement] = field(default_factory=list)  # counted nodes, graph order
    attached: list[Placement] = field(default_factory=list)  # Q/DQ, Constant, bf16 Cast nodes
    transitions: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    def _count(self, device: str) -> int:
        return sum(p.device == device for p in self.placement)

    @property
    def npu_node_share(self) -> float | None:
        return self._count("NPU") / len(self.placement) if self.placement else None

    @property
    def total_macs(self) -> int:
        return sum(p.macs for p in self.placement if p.macs is not None)

    @property
    def npu_macs(self) -> int:
        return sum(p.macs for p in self.placement if p.macs is not None and p.device == "NPU")

    @property
    def npu_mac_share(self) -> float | None:
        return self.npu_macs / self.total_macs if self.total_macs else None

    def summary(self) -> dict:
        """Flat figures for a manifest or report (deterministic)."""
        share = lambda x: None if x is None else round(x, 6)  # noqa: E731
        return {
            "format": self.format.value,
            "ready": self.ok,
            "violations": len(self.violations),
            "warnings": len(self.warnings),
            "nodes_npu": self._count("NPU"),
            "nodes_cpu": self._count("CPU"),
            "npu_node_share": share(self.npu_node_share),
            "macs_total": self.total_macs,
            "macs_npu": self.npu_macs,
            "npu_mac_share": share(self.npu_mac_share),
            "macs_unknown_nodes": sum(p.op_type in MAC_OPS and p.macs is None for p in self.placement),
            "transitions": self.transitions,
        }

    def to_json(self) -> dict:
        row = dataclasses.asdict
        return {
            "schema": "npu-pipeline/inspect/1",
            "model": self.model,
            "target": self.target,
            "format": self.format.value,
            "detected_format": self.detected_format.value if self.detected_format else None,
            "quantized": self.quantized,
            "opset": self.opset,
            "summary": self.summary(),
            "violations": [f._asdict() for f in self.violations],
            "warnings": [f._asdict() for f in self.warnings],
            "placement": [row(p) for p in self.placement],
            "attached": [row(p) for p in self.attached],
        }

    def table(self) -> str:
        s = self.summary()
        pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        if self.detected_format is None:
            how = "float model, placed as if quantized" if self.format.spec.quantized else "float model"
        elif self.detected_format is self.format:
            how = "detected from the Q/DQ types"
        else:
            how = f"as asked; the Q/DQ types look like {self.detected_format.value}"
        lines = [
            f"{self.model}: target {self.target}, format {self.format.value} ({how}), opset {self.opset}",
            f"  nodes        {s['nodes_npu']} on NPU, {s['nodes_cpu']} on CPU ({pct(s['npu_node_share'])} on NPU); "
            f"{len(self.attached)} Q/DQ/Constant nodes go with their compute",
            f"  MACs         {s['macs_npu']:,} of {s['macs_total']:,} on NPU ({pct(s['npu_mac_share'])})"
            + (f"; {s['macs_unknown_nodes']} MAC nodes with unknown shapes" if s["macs_unknown_nodes"] else ""),
            f"  transitions  {self.transitions} NPU<->CPU",
            f"  verdict      {'ready' if self.ok else 'NOT READY'}: {_plural(len(self.violations), 'violation')}, "
            f"{_plural(len(self.warnings), 'warning')}",
        ]
        for title, findings in (("violations", self.violations), ("warnings", self.warnings)):
            if findings:
                lines.append(f"{title} ({len(findings)}):")
                lines += [f"  [{f.rule}] {f.where}: {f.message}" for f in findings[:_SHOW]]
                lines += _more(len(findings))
        cpu = [p for p in self.placement if p.device == "CPU"]
        if cpu and len(cpu) == len(self.placement) and len({p.reason for p in cpu}) == 1:
            lines.append(f"all {len(cpu)} nodes run on the CPU ({cpu[0].reason})")
        elif cpu:
            width = max(len(p.node) for p in cpu[:_SHOW])
            op_width = max(len(p.op_type) for p in cpu[:_SHOW])
            lines.append(f"CPU fallback ({_plural(len(cpu), 'node')}):")
            lines += [f"  {p.node.ljust(width)}  {p.op_type.ljust(op_width)}  {p.reason}" for p in cpu[:_SHOW]]
            lines += _more(len(cpu))
        return "\n".join(lines)

    def raise_for_violations(self) -> None:
        """Raise ReadinessError naming the first violation (and how many others) if there is any."""
        if not self.violations:
            return
        first, others = self.violations[0], len(self.violations) - 1
        more = f" (and {others} more violation{'s' * (others > 1)}; 'npu-pipeline inspect' lists them)" if others else ""
        raise ReadinessError(
            f"{self.model}: not ready for {self.target}: [{first.rule}] {first.where}: {first.message}{more}"
        )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _more(n: int) -> list[str]:
    return [f"  ... and {n - _SHOW} more (see the JSON report)"] if n > _SHOW else []


def write_json(inspection: Inspection, path: Path | str) -> None:
    """The inspection as sorted JSON, written atomically (temp file + rename)."""
    text = json.dumps(inspection.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(Path(path), text)


def _load(model: onnx.ModelProto | Path | str) -> tuple[onnx.ModelProto, str, str]:
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "<model>", ""
    from ..core.onnx_io import load_onnx

    path = Path(model)
    return load_onnx(path, where="inspect"), str(path), str(path.parent)


def inspect_model(
    model: onnx.ModelProto | Path | str, target: Target | str, fmt: Format | str | None = None,
    unbatched: Collection[str] = (),
) -> Inspection:
    """Check `model` against `target`'s hard rules and predict where each node runs.

    `unbatched`: inputs whose dim 0 is not a batch axis (a recipe's `batch: false`, constant and recurrent
    state inputs: an LSTM state's [layers, batch, hidden]); the batch-one rule skips them.

    `fmt` None: the format is detected from the Q/DQ types (a float model is predicted in the target's
    default format). A `fmt` the target does not take raises TargetError; a file that is not a readable
    ONNX model raises ModelError. Violations do not raise here: see `Inspection.raise_for_violations`.
    """
    target = get_target(target)
    asked = target.resolve_format(fmt) if fmt is not None else None
    proto, name, base_dir = _load(model)
    violations: list[Finding] = []
    warnings: list[Finding] = []
    g = Graph(proto, base_dir)
    failed = infer_shapes(g, proto)
    if failed:
        warnings.append(Finding("shape-inference", "<model>", f"onnx shape inference failed ({failed}); MACs "
                                "and types come from the declared shapes only"))
    opset = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)

    qdq = qdq_info(g)
    candidates = candidate_formats(g, qdq)
    detected = next((f for f in candidates if f in target.formats), candidates[0]) if candidates else None
    quantized = any(q.role == "activation" for q in qdq) and detected is not Format.BF16
    fmt = asked or detected or target.default_format
    if asked is not None and candidates and asked not in candidates:
        warnings.append(Finding("format-mismatch", "<model>", f"the model's Q/DQ types look like "
                                f"{'/'.join(c.value for c in candidates)}, inspected as {asked.value} as asked"))
    if fmt not in target.formats:
        violations.append(Finding("format", "<model>", f"the model is {fmt.value} but {target.name} takes "
                                  f"{', '.join(f.value for f in target.formats)}; requantize with a recipe whose "
                                  f"quantization.format is one of them"))

    check_graph(g, target, opset, violations, warnings, unbatched=frozenset(unbatched))
    if quantized:
        check_qdq(g, qdq, fmt, violations, warnings, target=target)
    placed = predict_placement(g, target, fmt, quantized=quantized)
    _placement_warnings(placed, target, warnings)
    return Inspection(name, target.name, fmt, detected, quantized, opset, violations, warnings,
                      placed.placement, placed.attached, placed.transitions)


def _placement_warnings(placed, target: Target, warnings: list) -> None:
    if placed.too_few_convs:
        warnings.append(Finding("min-conv", "<model>", f"{placed.conv_layers} Conv layers, fewer than "
                                f"{target.min_conv_layers}: the {target.name} runtime config runs the whole model "
                                "on the CPU"))
    cpu = [p for p in placed.placement if p.device == "CPU"]
    if target.device == "NPU" and cpu and not placed.too_few_convs:
        warnings.append(Finding("cpu-fallback", cpu[0].node, f"{len(cpu)} of {len(placed.placement)} nodes are "
                                f"predicted on the CPU ({placed.transitions} NPU<->CPU transitions)"))
    unknown = [p.node for p in placed.placement if p.op_type in MAC_OPS and p.macs is None]
    if unknown:
        warnings.append(Finding("macs-unknown", unknown[0], f"{len(unknown)} MAC nodes have unknown shapes and "
                                "are left out of the MAC totals"))


