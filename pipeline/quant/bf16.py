"""BF16 numerics of the XDNA2 NPU, emulated on onnxruntime's CPU EP.

XDNA2 runs a model in bfloat16 (weights and activations) with float32 model inputs and outputs; AMD's
flow converts an FP32 ONNX model at compile time (`enable_f32_to_bf16_conversion`). Without the
VitisAI EP we emulate that on the CPU EP: the model still computes in float32, but every value the NPU
would hold in bf16 is rounded to bf16 (round-to-nearest-even):

- float32 initializers used by NPU nodes are rounded offline (`round_to_bf16`);
- each float32 output of an NPU node goes through Cast(to=BFLOAT16) -> Cast(to=FLOAT), the pair taking
  over the output's name, so consumers and graph outputs keep their names;
- float32 values entering the NPU from outside (graph inputs, outputs of `keep_float` nodes that run
  on the CPU) get a rounded copy that only the NPU consumers read; CPU consumers see the float32 value.

onnxruntime's CPU Cast float->bfloat16 rounds to nearest even (checked bit for bit against torch in
tests/test_bf16.py, subnormals, ties, overflow to inf included), and its graph optimizers keep the
pair, so no float-op rounding construction is needed; Cast to/from bfloat16 needs opset >= 13.

What this does not emulate: accumulation inside an op (MatMul, Conv, Softmax, LayerNorm reductions)
is float32 with a single rounding at the op's output, which matches an fp32-accumulating MAC array but
not bf16 intermediates or LUT approximations inside NPU kernels; ops the compiler fuses (MatMul+Add,
Conv+Relu) are rounded between the ONNX nodes here, once on the NPU; float attributes (epsilon, alpha)
are not rounded; whether the hardware flushes bf16 subnormals is not modelled (they are kept).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..core.names import NameAllocator
from ..core.ops import BF16_EXACT_OPS
from ..core.shapes import ShapeInferenceFailed, infer
from ..errors import ModelError

__all__ = ["round_to_bf16", "emulate_bf16", "to_bf16_model"]

_FLOAT = TensorProto.FLOAT
_MIN_OPSET = 13  # Cast to/from bfloat16 is in the default domain from opset 13 on


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 array -> float32 array of bf16-representable values, round-to-nearest-even.

    Same bits as torch's `t.to(torch.bfloat16).to(torch.float32)` for every non-NaN input (overflow
    past bf16's largest finite value gives inf); a NaN stays a NaN with its sign.
    """
    a = np.asarray(x)
    if a.dtype != np.float32:
        # Rounding float64 via float32 would round twice; make the caller choose.
        raise TypeError(f"round_to_bf16 takes float32, got {a.dtype}")
    import ml_dtypes

    with np.errstate(invalid="ignore"):  # NaN payloads: ml_dtypes keeps sign and quiet NaN, numpy warns
        return a.astype(ml_dtypes.bfloat16).astype(np.float32)


def emulate_bf16(model: onnx.ModelProto, *, keep_float: Iterable[str] = ()) -> onnx.ModelProto:
    """A new model that computes as the NPU would in bf16 (see the module docstring); input untouched.

    keep_float: names of nodes that run on the CPU in float32; their outputs are not rounded (an NPU
    node reading one still gets it rounded, as the NPU converts what it receives).
    """
    return _emulate(model, keep_float).model


def to_bf16_model(model: onnx.ModelProto, *, keep_float: Iterable[str] = ()) -> onnx.ModelProto:
    """`emulate_bf16`, with the rounded weights stored as bfloat16 initializers and a Cast to float at
    use: half the weight bytes, same outputs bit for bit. Weights only CPU nodes read stay float32."""
    plan = _emulate(model, keep_float)
    g = plan.model.graph
    casts = []
    for t in g.initializer:
        if t.name not in plan.rounded_inits:
            continue
        values = numpy_helper.to_array(t)
        high = (np.ascontiguousarray(values).reshape(-1).view(np.uint32) >> 16).astype("<u2")
        stored = plan.names.fresh(f"{t.name}__bf16w")
        cast_name = plan.names.fresh(f"{t.name}__to_f32")
        casts.append(helper.make_node("Cast", [stored], [t.name], name=cast_name, to=_FLOAT))
        t.name = stored
        t.data_type = TensorProto.BFLOAT16
        t.ClearField("float_data")
        t.raw_data = high.tobytes()
    nodes = casts + list(g.node)
    g.ClearField("node")
    g.node.extend(nodes)
    return plan.model


# --------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    model: onnx.ModelProto
    names: NameAllocator
    rounded_inits: set[str] = field(default_factory=set)


def _emulate(model: onnx.ModelProto, keep_float: Iterable[str]) -> _Plan:
    keep = {keep_float} if isinstance(keep_float, str) else set(keep_float)
    _check_supported(model, keep)
    types = _elem_types(model)

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    plan = _Plan(out, NameAllocator(g))
    names = plan.names

    npu_readers: set[str] = set()
    cpu_readers: set[str] = {o.name for o in g.output}  # a graph output is read outside the NPU
    for n in g.node:
        (cpu_readers if n.name in keep else npu_readers).update(n.input)

    alias: dict[str, str] = {}  # float32 name -> its rounded copy, read by NPU nodes only

    def cast_pair(src: str, dst: str) -> list[onnx.NodeProto]:
        mid = names.fresh(f"{dst}__bf16")
        return [
            helper.make_node("Cast", [src], [mid], name=names.fresh(f"{dst}__to_bf16"), to=TensorProto.BFLOAT16),
            helper.make_node("Cast", [mid], [dst], name=names.fresh(f"{dst}__from_bf16"), to=_FLOAT),
        ]

    graph_inputs = {i.name for i in g.input}
    for t in g.initializer:
        if t.data_type != _FLOAT or t.name in graph_inputs or t.name not in npu_readers:
            continue  # an initializer listed as an input can be fed: it is rounded as an input below
        values = round_to_bf16(numpy_helper.to_array(t)).astype("<f4")
        if t.name in cpu_readers:  # shared with CPU nodes or a graph output: NPU reads a rounded copy
            copy = g.initializer.add()
            copy.CopyFrom(t)
            copy.name = alias[t.name] = names.fresh(f"{t.name}__bf16")
            types[copy.name] = _FLOAT
            t = copy
        t.ClearField("float_data")
        t.raw_data = values.tobytes()
        plan.rounded_inits.add(t.name)

    nodes: list[onnx.NodeProto] = []
    for i in g.input:
        if types.get(i.name) == _FLOAT and i.name in npu_readers:
            alias[i.name] = names.fresh(f"{i.name}__bf16in")
            types[alias[i.name]] = _FLOAT
            nodes += cast_pair(i.name, alias[i.name])

    unknown = []
    for n in list(g.node):
        npu = n.name not in keep
        if npu:
            for k, i in enumerate(n.input):
                n.input[k] = alias.get(i, i)
        nodes.append(n)
        float_outs = []
        for o in n.output:
            if not o or (not npu and o not in npu_readers):
                continue
            if o not in types:
                unknown.append(o)
            elif types[o] == _FLOAT:
                float_outs.append(o)
        if not npu:  # CPU output: float32 for CPU readers and graph outputs, rounded for NPU readers
            for o in float_outs:
                alias[o] = names.fresh(f"{o}__bf16in")
                types[alias[o]] = _FLOAT
                nodes += cast_pair(o, alias[o])
            continue
        # Every float input of an NPU node is bf16 by now, so an exact op's outputs already are.
        has_float_in = any(types.get(i) == _FLOAT for i in n.input if i)
        if n.domain in ("", "ai.onnx") and n.op_type in BF16_EXACT_OPS and has_float_in:
            continue
        for o in float_outs:
            raw = names.fresh(f"{o}__f32")
            n.output[list(n.output).index(o)] = raw
            nodes += cast_pair(raw, o)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise ModelError(
            f"bf16 emulation: shape inference gives no type for {len(unknown)} node output(s): {shown}; "
            "use standard ONNX ops, or name the producing nodes in keep_float"
        )
    g.ClearField("node")
    g.node.extend(nodes)
    return plan


def _check_supported(model: onnx.ModelProto, keep: set[str]) -> None:
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < _MIN_OPSET:
        raise ModelError(
            f"bf16 emulation needs ONNX opset >= {_MIN_OPSET} (Cast to bfloat16), the model has {opset}; "
            "convert it with onnx.version_converter first"
        )
    missing = sorted(repr(k) for k in keep - ({n.name for n in g.node} - {""}))
    if missing:
        raise ModelError(f"bf16 emulation: keep_float names nodes the graph does not have: {', '.join(missing)}")
    subgraphs = [n.name or n.op_type for n in g.node
                 if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)]
    if subgraphs:
        raise ModelError(
            f"bf16 emulation does not handle control flow (If/Loop/Scan): {', '.join(subgraphs[:8])}; "
            "the NPU target does not run it either"
        )
    if len(g.sparse_initializer):
        raise ModelError("bf16 emulation does not handle sparse initializers; densify them first")
    external = [t.name for t in g.initializer if t.data_location == TensorProto.EXTERNAL]
    if external:
        raise ModelError(
            f"bf16 emulation: initializer(s) {', '.join(external[:8])} are stored as external data; "
            "load the model with load_external_data=True"
        )


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor name, from the graph and onnx shape inference (model untouched)."""
    try:
        inferred = infer(model)
    except ShapeInferenceFailed as err:
        raise ModelError(f"bf16 emulation: onnx shape inference fails on the model: {err}") from err
    g = inferred.graph
    types = {}
    for v in [*g.value_info, *g.input, *g.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    return types
