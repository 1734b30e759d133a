"""The readiness rules `inspect_model` applies: graph-level (opset, forbidden ops, static shapes, batch one)
and Q/DQ-level (format detection, storage types, zero points, power-of-two scales, int32 bias)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto

from ..core.formats import Format, all_formats
from ..core.graph import Graph
from ..core.ops import DQ_OPS, MAC_OPS, Q_OPS
from ..targets import Target

__all__ = ["Finding", "check_graph", "qdq_info", "candidate_formats", "check_qdq"]

_BIAS_OPS = {"Conv", "ConvTranspose", "Gemm"}
_CNN_OPS = {"Conv", "ConvTranspose"}


class Finding(NamedTuple):
    """One broken rule: `where` is the node or tensor it concerns; `message` says how to fix it."""

    rule: str
    where: str
    message: str


def check_graph(g: Graph, target: Target, opset: int, violations: list, warnings: list,
                unbatched: frozenset[str] = frozenset()) -> None:
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
            if value.name not in unbatched and len(dims) >= 2 and dims[0].HasField("dim_value") and dims[0].dim_value > 1:
                finding = Finding("batch-one", value.name, f"input '{value.name}' has batch {dims[0].dim_value}; "
                                  f"{target.name} runs batch 1 (export with batch 1 and loop over samples)")
                # Only a convolution's input is surely batched on dim 0: a recurrent state's is its layers.
                (violations if is_cnn and _reaches_conv(g, value.name) else warnings).append(finding)


_STOP_AT = {"MatMul", "Gemm", "LSTM", "GRU", "RNN", "Attention", "Einsum"}  # the axes mean something else past these


def _reaches_conv(g: Graph, tensor: str) -> bool:
    """Whether `tensor` flows into a Conv/ConvTranspose's data input without passing another MAC op."""
    todo, seen = [tensor], {tensor}
    while todo:
        name = todo.pop()
        for i in g.consumers.get(name, ()):
            node = g.nodes[i]
            if node.op_type in _CNN_OPS and node.input[0] == name:
                return True
            if node.op_type in _STOP_AT:
                continue
            for out in node.output:
                if out and out not in seen:
                    seen.add(out)
                    todo.append(out)
    return False


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


def qdq_info(g: Graph) -> list[_QInfo]:
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


# Share of activation Q/DQ with power-of-two scales from which a model is read as XINT8. An A8W8 model's
# scales (range / 127) are powers of two by accident only; an XINT8 quantizer that left a few scales
# (a constant's, one activation) off the grid made an XINT8 model that breaks a rule, and is reported so,
# not passed as A8W8.
_POW2_SHARE = 0.9


def _pow2_activations(qdq: list[_QInfo]) -> bool:
    """True when the activation scales are powers of two (at least `_POW2_SHARE` of them)."""
    acts = [q for q in qdq if q.role == "activation" and q.scale is not None]
    if not acts:
        return False
    return sum(_is_pow2(q.scale) for q in acts) >= _POW2_SHARE * len(acts)


def candidate_formats(g: Graph, qdq: list[_QInfo]) -> list[Format]:
    """Formats the model's Q/DQ types fit, most specific first; [] for a float model."""
    bf16 = any(g.attached(i) and g.nodes[i].op_type == "Cast" for i in range(len(g.nodes)))
    if bf16 or any(q.dtype == "bfloat16" for q in qdq):
        return [Format.BF16]
    acts = {q.dtype for q in qdq if q.role == "activation"}
    if not acts:
        return []
    pow2 = _pow2_activations(qdq)
    if acts & {"int16", "uint16"} and not acts & {"int8", "uint8"}:
        # Every registered 16-bit-activation format whose weight types hold the model's, in registration
        # order (A16W8 first); a format module registering another (A16W4) is found without an edit here.
        weights = {q.dtype for q in qdq if q.role == "weight"}
        wide = [f for f in all_formats() if f.spec.activation_bits == 16 and weights <= f.spec.weight_dtypes]
        return wide or [Format.A16W8]
    # 8-bit activations with some at 16 bits: an 8-bit format with mixed-precision values (`free_16bit`,
    # the fallback's promotions), whose MACs read int8 copies; the 16-bit ones are checked as such.
    acts -= {"int16", "uint16"}
    if acts <= {"int8"}:
        return [Format.XINT8, Format.A8W8] if pow2 else [Format.A8W8]
    zp128 = all(q.zero_point is not None and np.all(q.zero_point == 128)
                for q in qdq if q.role == "activation" and q.dtype == "uint8")
    if acts <= {"int8", "uint8"} and pow2 and zp128:
        return [Format.XINT8, Format.U8S8] if acts == {"uint8"} else [Format.XINT8]
    return [Format.U8S8] if "uint8" in acts else [Format.A8W8]


def check_qdq(
    g: Graph, qdq: list[_QInfo], fmt: Format, violations: list, warnings: list, *, target: Target
) -> None:
    spec = Format(fmt).spec
    if not spec.quantized:
        return
    # Mixed precision: activations of another integer format the same target takes (the accuracy-aware
    # fallback promotes sensitive values of an A8W8 model to 16 bits). Allowed, but its acceptance by the
    # compiler in one graph is not documented, so it is a warning, not a pass.
    others = [Format(f).spec for f in target.formats if f != fmt]
    wider = {t for o in others if o.quantized for t in o.activation_dtypes if t.endswith("16")} - spec.activation_dtypes
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
        accepted = spec.weight_dtypes if q.role == "weight" else spec.activation_dtypes
        if q.role == "constant":  # other constants (an Add's operand, a MatMul+Add bias): any of them
            accepted = spec.weight_dtypes | spec.activation_dtypes | {"int32"}
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
        if spec.symmetric_activations:
            zp = q.zero_point if q.zero_point is not None else np.zeros(1)
            centre = 2 ** (np.iinfo(np.dtype(q.dtype)).bits - 1) if q.dtype.startswith("uint") else 0
            if not np.all(zp == centre):
                violations.append(Finding("zero-point", where, f"zero point {_first(zp)} is not symmetric "
                                          f"({centre} for {q.dtype}); {fmt.value} needs symmetric quantization"))
        if spec.power_of_two and not _is_pow2(q.scale):
            bad = float(next(s for s in np.ravel(q.scale) if not _is_pow2(np.asarray(s))))
            near = 2.0 ** round(math.log2(bad)) if bad > 0 else float("nan")
            violations.append(Finding("pow2-scale", where, f"scale {bad:.6g} is not a power of two "
                                      f"(nearest {near:.6g}); {fmt.value} requantizes by shifts, use power-of-two "
                                      "calibration"))
    if per_channel and not spec.per_channel_accepted:
        warnings.append(Finding("per-channel", per_channel[0], f"{len(per_channel)} Q/DQ nodes have per-channel "
                                f"scales; {fmt.value} is documented per tensor only"))
    if mixed:
        warnings.append(Finding("mixed-precision", mixed[0], f"{len(mixed)} activation Q/DQ nodes use a wider "
                                f"type than {fmt.value} (mixed precision: free_16bit or the fallback); {target.name} takes "
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
