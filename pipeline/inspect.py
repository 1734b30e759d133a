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
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto

from .errors import ReadinessError
from .recipe import Format
from .targets import QUANT_SPECS, Target, get_target
from .targets.graph import DQ_OPS, MAC_OPS, Q_OPS, Graph, infer_shapes
from .targets.placement import Placement, predict_placement

__all__ = ["Finding", "Placement", "Inspection", "inspect_model", "write_json"]

_BIAS_OPS = {"Conv", "ConvTranspose", "Gemm"}
_CNN_OPS = {"Conv", "ConvTranspose"}
_SHOW = 30  # rows per list in table()


class Finding(NamedTuple):
    """One broken rule: `where` is the node or tensor it concerns; `message` says how to fix it."""

    rule: str
    where: str
    message: str


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
            how = "float model, placed as if quantized" if QUANT_SPECS.get(self.format) else "float model"
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
    from .runner import atomic_write

    text = json.dumps(inspection.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(Path(path), text)


def _load(model: onnx.ModelProto | Path | str) -> tuple[onnx.ModelProto, str, str]:
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "<model>", ""
    from .onnx_utils import load_onnx

    path = Path(model)
    return load_onnx(path, where="inspect"), str(path), str(path.parent)


def inspect_model(
    model: onnx.ModelProto | Path | str, target: Target | str, fmt: Format | str | None = None
) -> Inspection:
    """Check `model` against `target`'s hard rules and predict where each node runs.

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

    qdq = _qdq_info(g)
    candidates = _candidates(g, qdq)
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

    _check_graph(g, target, opset, violations, warnings)
    if quantized:
        _check_qdq(g, qdq, fmt, violations, warnings, target=target)
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


def _check_graph(g: Graph, target: Target, opset: int, violations: list, warnings: list) -> None:
    if not target.opset_min <= opset <= target.opset_max:
        violations.append(Finding("opset", "opset_import", f"default-domain opset {opset} is outside "
                                  f"{target.name}'s {target.opset_min}..{target.opset_max}; re-export at opset "
                                  f"{target.opset_recommended} (recipe export.opset) or use onnx.version_converter"))
    elif opset != target.opset_recommended:
        warnings.append(Finding("opset", "opset_import", f"opset {opset}: AMD recommends "
                                f"{target.opset_recommended} for the NPU compiler"))
    for i, node in enumerate(g.nodes):
        if node.op_type in target.forbidden_ops and node.domain in ("", "ai.onnx"):
            violations.append(Finding("forbidden-op", g.names[i], f"{node.op_type} is not supported by "
                                      f"{target.name}; unroll it at export (fixed trip count, traced branch)"))
    is_cnn = any(n.op_type in _CNN_OPS for n in g.nodes)
    if target.requires_static_shapes:
        dynamic_input = False
        for value in g.inputs:
            dynamic_input |= _check_static(value, "input", violations, violations)
        if not dynamic_input:  # a dynamic output of a dynamic input is the same fault: report it once
            for value in g.outputs:
                _check_static(value, "output", violations, warnings)
    if target.batch_one:
        for value in g.inputs:
            dims = value.type.tensor_type.shape.dim
            if len(dims) >= 2 and dims[0].HasField("dim_value") and dims[0].dim_value > 1:
                finding = Finding("batch-one", value.name, f"input '{value.name}' has batch {dims[0].dim_value}; "
                                  f"{target.name} runs batch 1 (export with batch 1 and loop over samples)")
                (violations if is_cnn else warnings).append(finding)


def _check_static(value: onnx.ValueInfoProto, kind: str, violations: list, unknown: list) -> bool:
    """A violation per dynamic dim of a graph input/output (no shape at all: into `unknown`); True if any."""
    if not value.type.HasField("tensor_type"):
        violations.append(Finding("static-shape", value.name, f"{kind} '{value.name}' is not a tensor; "
                                  "NPU models take and return plain tensors"))
        return True
    if not value.type.tensor_type.HasField("shape"):
        unknown.append(Finding("static-shape", value.name, f"{kind} '{value.name}' has no shape; declare a "
                               "static shape at export"))
        return unknown is violations
    found = False
    for k, dim in enumerate(value.type.tensor_type.shape.dim):
        if not dim.HasField("dim_value") or dim.dim_value <= 0:
            label = f" ('{dim.dim_param}')" if dim.dim_param else ""
            violations.append(Finding("static-shape", value.name, f"{kind} '{value.name}' dim {k}{label} is "
                                      "dynamic; export with a fixed shape (recipe inputs[].shape) or fix it with "
                                      "onnxruntime.tools.make_dynamic_shape_fixed"))
            found = True
    return found


@dataclass(frozen=True)
class _QInfo:
    index: int
    dtype: str  # quantized storage type, numpy-style name ("int8"), "?" if unknown
    role: str  # activation | weight | bias | constant
    scale: np.ndarray | None
    zero_point: np.ndarray | None  # None: absent (0) or not constant


def _dtype_name(kind: int | None) -> str:
    return TensorProto.DataType.Name(kind).lower() if kind else "?"


def _qdq_info(g: Graph) -> list[_QInfo]:
    infos = []
    for i, node in enumerate(g.nodes):
        if node.op_type not in Q_OPS | DQ_OPS or not g.attached(i):
            continue
        inputs = list(node.input) + ["", ""]
        zp = inputs[2]
        if zp:
            kind = g.elem_type(zp)
        elif node.op_type in Q_OPS:
            out_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
            kind = out_dtype or g.elem_type(node.output[0]) or TensorProto.UINT8
        else:
            kind = g.elem_type(inputs[0])
        role = "activation"
        if inputs[0] in g.consts:
            role = "constant"
            for c in g.consumers.get(node.output[0], []):
                consumer = g.nodes[c]
                slots = [k for k, name in enumerate(consumer.input) if name == node.output[0]]
                if consumer.op_type in _BIAS_OPS and 2 in slots:
                    role = "bias"
                elif consumer.op_type in MAC_OPS and 1 in slots:
                    role = "weight"
        zp_array = g.array(zp) if zp else None
        infos.append(_QInfo(i, _dtype_name(kind), role, g.array(inputs[1]), zp_array))
    return infos


def _is_pow2(scale: np.ndarray) -> bool:
    values = np.asarray(scale, dtype=np.float64).ravel()
    mantissa, _ = np.frexp(values)
    return bool(np.all(values > 0) and np.all(mantissa == 0.5))


def _candidates(g: Graph, qdq: list[_QInfo]) -> list[Format]:
    """Formats the model's Q/DQ types fit, most specific first; [] for a float model."""
    bf16 = any(g.attached(i) and g.nodes[i].op_type == "Cast" for i in range(len(g.nodes)))
    if bf16 or any(q.dtype == "bfloat16" for q in qdq):
        return [Format.BF16]
    acts = {q.dtype for q in qdq if q.role == "activation"}
    if not acts:
        return []
    pow2 = all(q.scale is not None and _is_pow2(q.scale) for q in qdq if q.role != "bias")
    if acts & {"int16", "uint16"}:
        return [Format.A16W8]
    if acts <= {"int8"}:
        return [Format.XINT8, Format.A8W8] if pow2 else [Format.A8W8]
    zp128 = all(q.zero_point is not None and np.all(q.zero_point == 128)
                for q in qdq if q.role == "activation" and q.dtype == "uint8")
    if acts <= {"int8", "uint8"} and pow2 and zp128:
        return [Format.XINT8, Format.U8S8] if acts == {"uint8"} else [Format.XINT8]
    return [Format.U8S8] if "uint8" in acts else [Format.A8W8]


def _check_qdq(
    g: Graph, qdq: list[_QInfo], fmt: Format, violations: list, warnings: list, *, target: Target
) -> None:
    spec = QUANT_SPECS.get(fmt)
    if spec is None:
        return
    # Mixed precision: activations of another integer format the same target takes (the accuracy-aware
    # fallback promotes sensitive values of an A8W8 model to 16 bits). Allowed, but its acceptance by the
    # compiler in one graph is not documented, so it is a warning, not a pass.
    others = [QUANT_SPECS.get(f) for f in target.formats if f != fmt]
    wider = {t for o in others if o is not None for t in o.activations if t.endswith("16")} - spec.activations
    per_channel, unreadable, mixed = [], [], []
    for q in qdq:
        where, node = g.names[q.index], g.nodes[q.index]
        if q.dtype == "?":
            unreadable.append(where)
            continue
        if q.role == "bias":
            if q.dtype != "int32":
                violations.append(Finding("bias-int32", where, f"bias DequantizeLinear is {q.dtype}; the NPU "
                                          "takes int32 bias (scale = input scale x weight scale)"))
            continue
        accepted = spec.weights if q.role == "weight" else spec.activations
        if q.role == "constant":  # other constants (an Add's operand, a MatMul+Add bias): any of them
            accepted = spec.weights | spec.activations | {"int32"}
        if q.dtype not in accepted and q.role in ("activation", "constant") and q.dtype in wider:
            mixed.append(where)
        elif q.dtype not in accepted:
            violations.append(Finding("qdq-dtype", where, f"{q.role} {node.op_type} is {q.dtype}; {fmt.value} "
                                      f"takes {'/'.join(sorted(accepted))}; requantize in {fmt.value}"))
            continue
        if q.scale is None:
            unreadable.append(where)
            continue
        if q.scale.size > 1:
            per_channel.append(where)
        if spec.symmetric:
            zp = q.zero_point if q.zero_point is not None else np.zeros(1)
            centre = 2 ** (np.iinfo(np.dtype(q.dtype)).bits - 1) if q.dtype.startswith("uint") else 0
            if not np.all(zp == centre):
                violations.append(Finding("zero-point", where, f"zero point {_first(zp)} is not symmetric "
                                          f"({centre} for {q.dtype}); {fmt.value} needs symmetric quantization"))
        if spec.pow2_scales and not _is_pow2(q.scale):
            bad = float(next(s for s in np.ravel(q.scale) if not _is_pow2(np.asarray(s))))
            near = 2.0 ** round(math.log2(bad)) if bad > 0 else float("nan")
            violations.append(Finding("pow2-scale", where, f"scale {bad:.6g} is not a power of two "
                                      f"(nearest {near:.6g}); {fmt.value} requantizes by shifts, use power-of-two "
                                      "calibration"))
    if per_channel and not spec.per_channel:
        warnings.append(Finding("per-channel", per_channel[0], f"{len(per_channel)} Q/DQ nodes have per-channel "
                                f"scales; {fmt.value} is documented per tensor only"))
    if mixed:
        warnings.append(Finding("mixed-precision", mixed[0], f"{len(mixed)} activation Q/DQ nodes use a wider "
                                f"type than {fmt.value} (mixed precision from the fallback); {target.name} takes "
                                "both formats, but mixing them in one graph is not documented: check on device"))
    if unreadable:
        warnings.append(Finding("qdq-unreadable", unreadable[0], f"{len(unreadable)} Q/DQ nodes have a type or "
                                "scale that is not known statically; their rules were not checked"))
    for i, node in enumerate(g.nodes):  # float bias on a node that is otherwise quantized
        if node.op_type in _BIAS_OPS and len(node.input) > 2 and node.input[2] in g.consts:
            fed = [g.producer.get(n) for n in node.input[:2]]
            if all(j is not None and g.nodes[j].op_type in DQ_OPS for j in fed) and g.is_float(node.input[2]):
                violations.append(Finding("bias-int32", g.names[i], f"bias '{node.input[2]}' of {node.op_type} "
                                          "is float; quantize it to int32 (QuantizeBias)"))


def _first(array: np.ndarray):
    return np.ravel(array)[0].item()
