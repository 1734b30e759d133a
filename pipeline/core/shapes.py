"""One entry to shape inference, for graphs with custom-domain Q/DQ too.

onnx does not know onnxruntime's com.microsoft Q/DQ (16- and 4-bit) nor Quark's: inference runs on a copy
where they are Identity (same shape), and their outputs are typed by the caller's knowledge, not by onnx.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from .ops import QDQ_OPS, is_default_domain

__all__ = ["ShapeInferenceFailed", "infer", "static_shapes", "value_shapes", "float_values"]


class ShapeInferenceFailed(Exception):
    """onnx shape inference refused the graph; the message is its first line."""


def _without_custom_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """A copy whose custom-domain Q/DQ are Identity nodes, and the names of their outputs."""
    if not any(n.op_type in QDQ_OPS and not is_default_domain(n.domain) for n in model.graph.node):
        return model, set()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    replaced: set[str] = set()
    for node in copy.graph.node:
        if node.op_type in QDQ_OPS and not is_default_domain(node.domain):
            replaced.update(node.output)
            del node.input[1:]
            del node.attribute[:]
            node.op_type, node.domain = "Identity", ""
    return copy, replaced


def infer(model: onnx.ModelProto, *, strict: bool = False, data_prop: bool = False) -> onnx.ModelProto:
    """The inferred model (value_info filled in); raises ShapeInferenceFailed with onnx's reason.

    Custom-domain Q/DQ outputs keep their inferred shapes, typed float (DequantizeLinear) or as their zero
    point (QuantizeLinear); a Q output without a constant zero point gets no value_info.
    """
    source, replaced = _without_custom_qdq(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(source, strict_mode=strict, data_prop=data_prop)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError, RuntimeError) as err:
        text = str(err).strip()
        raise ShapeInferenceFailed(text.splitlines()[0] if text else type(err).__name__) from None
    if source is model:
        return inferred
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.value_info[:]
    producers = {o: n for n in model.graph.node for o in n.output if o in replaced}
    inits = {t.name: t for t in model.graph.initializer}
    for value in inferred.graph.value_info:
        if value.name in replaced:
            elem = _qdq_output_type(producers[value.name], inits)
            if elem is None:
                continue
            value.type.tensor_type.elem_type = elem
        result.graph.value_info.append(value)
    return result


def _qdq_output_type(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> int | None:
    """Element type of a custom Q/DQ node's output: float for a DequantizeLinear, the zero point's for a Quantize."""
    if node.op_type in ("DequantizeLinear", "ExtendedDequantizeLinear"):
        return TensorProto.FLOAT
    zero = node.input[2] if len(node.input) > 2 else ""
    init = inits.get(zero) if zero else None
    return init.data_type if init is not None else None


def value_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Declared dims of every typed value (inputs, value_info, outputs): int, or None where unknown."""
    g = model.graph
    shapes = {}
    for value in [*g.input, *g.value_info, *g.output]:
        t = value.type.tensor_type
        if value.type.HasField("tensor_type") and t.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                                  for d in t.shape.dim]
    return shapes


def static_shapes(model: onnx.ModelProto, *, infer_first: bool = True) -> dict[str, tuple[int, ...]]:
    """Fully static shapes of the values of `model` (after inference when `infer_first`; best effort:
    where inference fails, the declared shapes only)."""
    if infer_first:
        try:
            model = infer(model)
        except ShapeInferenceFailed:
            pass
    return {name: tuple(dims) for name, dims in value_shapes(model).items() if None not in dims}


def float_values(model: onnx.ModelProto, *, infer_first: bool = True) -> set[str]:
    """Node outputs typed float32 (after inference when `infer_first`)."""
    if infer_first:
        model = infer(model)
    g = model.graph
    outputs = {o for n in g.node for o in n.output}
    return {v.name for v in [*g.value_info, *g.output] if v.type.tensor_type.elem_type == TensorProto.FLOAT} & outputs
