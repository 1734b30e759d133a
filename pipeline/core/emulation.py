"""NPU numerics at speed: a QDQ (or BF16-rounding) model evaluated so that every Q/DQ keeps its exact float
semantics (ideal integer arithmetic, what the NPU computes), without paying for what does not matter.

- Constant weights and biases are dequantized once, here, instead of at every inference: each
  DequantizeLinear whose inputs are all initializers becomes a float initializer holding exactly what the
  node computes ((q - zero_point) in integers, converted to float32, times the float32 scale: the same
  IEEE operations as onnxruntime's kernel, checked bit for bit in tests).
- A Q/DQ pair right before a Relu or a Clip that is followed by a pair with the same scale and zero point
  is dropped, which is exact (`drop_redundant_activation_pairs`): the quantizer gives a fused
  activation's input the activation's own scale, so the first pair only rounds what the second rounds again
  to the same grid. Without it onnxruntime fuses Conv+Clip, and MobileNetV2 loses 35 Q, 35 DQ and 35 Clip
  passes over its largest tensors.
- The Q/DQ pair after a constant Pad whose input and value sit on that pair's grid is dropped (exact: the
  Pad writes only grid points), and on an 8-bit grid the Pad pads the integers before the dequantization
  (a quarter of the bytes); bias absorption's explicit Pads before depthwise convolutions would
  otherwise cost MobileNetV2 a third more emulation time.
- A Q/DQ pair whose input is already on its grid goes (exact: Q(DQ(q)) == q): the value was dequantized
  on the pair's scale, zero point and type, then only moved (Reshape, Transpose, Slice, Concat, MaxPool,
  ...: `_drop_pairs_on_their_grid`). The quantizer repeats the source's grid after every such op, so a
  transformer's attention plumbing is full of them (MiniLM A8W8: 176 of 420 pairs; its emulation ~9% faster).
- onnxruntime's graph optimizations run up to the extended level, except the transformers that would fuse
  Q/DQ into its integer kernels (QLinearConv, ...) or requantize float weights: those change the numbers
  (the fused u8s8 kernels saturate on x86 without VNNI). The layout level (NCHWc) is left off: it reorders
  convolution accumulation and moves requantization boundaries.

What still differs from the unoptimized graph: onnxruntime pre-packs a constant MatMul weight, which can
change float accumulation order in the last bits (1e-4 on MiniLM's unit-norm embeddings); convolutions are
bit-identical. `tests/test_emulation.py` holds the metrics of every shipped recipe's kind to that.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .ops import DATA_MOVEMENT_OPS, is_constant_pad

__all__ = ["fold_constant_dequantize", "drop_redundant_activation_pairs", "EMULATION_DISABLED_OPTIMIZERS"]

# onnxruntime transformers that turn Q/DQ node groups into integer kernels or re-quantize float weights.
EMULATION_DISABLED_OPTIMIZERS = (
    "QDQSelectorActionTransformer", "QDQPropagationTransformer", "QDQFinalCleanupTransformer",
    "DoubleQDQPairsRemover", "QDQS8ToU8Transformer", "EnsureUniqueDQForNodeUnit", "WeightBiasQuantization",
    "Avx2WeightS8ToU8Transformer",
)


def _dequantized(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    q = numpy_helper.to_array(inits[node.input[0]])
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    zero = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
    if scale.ndim == 1 and scale.size > 1:  # per-axis: broadcast along `axis`
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = None if zero is None else zero.reshape(shape)
    centred = q.astype(np.int64) - (0 if zero is None else zero.astype(np.int64))
    return (centred.astype(np.float32) * scale).astype(np.float32)


def fold_constant_dequantize(model: onnx.ModelProto, *, in_place: bool = False) -> onnx.ModelProto:
    """A copy of `model` (or `model` itself, edited, when `in_place`) whose DequantizeLinear nodes reading only
    initializers are float initializers."""
    folded = model if in_place else onnx.ModelProto.FromString(model.SerializeToString())
    graph = folded.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    kept, made = [], []
    for node in graph.node:
        constant = (node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx", "com.microsoft")
                    and all(name in inits for name in node.input if name) and node.output[0] not in outputs
                    and not any(a.name == "block_size" and a.i for a in node.attribute))
        if constant:
            made.append(numpy_helper.from_array(_dequantized(node, inits), node.output[0]))
        else:
            kept.append(node)
    if not made:
        return folded
    graph.initializer.extend(made)
    _keep_nodes(graph, kept)
    return folded


def _keep_nodes(graph: onnx.GraphProto, kept: list[onnx.NodeProto]) -> None:
    """`graph` with only the `kept` nodes, and only the initializers they or the graph outputs read."""
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    remaining = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(remaining)


_INTEGER_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16)


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """{value: the nodes that read it}, in graph order (built again after every `_keep_nodes`: it copies)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                readers.setdefault(name, []).append(node)
    return readers


def _scalar(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    if name not in inits:
        return None
    value = numpy_helper.to_array(inits[name])
    return value if value.size == 1 else None


def drop_redundant_activation_pairs(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (edited in place and returned) without the Q/DQ pairs that change nothing:
    X -> Q1 -> DQ1 -> act -> Q2 -> DQ2, act a Relu or a Clip, Q1 and Q2 of the same per-tensor scale, zero
    point and type, becomes X -> act -> Q2 -> DQ2.

    Exact, value for value, in float32 as onnxruntime computes it. Q (divide by the scale, round half to
    even, add the zero point, saturate) is monotone and Q(DQ(q)) == q for every integer q (the round trip
    is off by under 2.5e-7 relative, far from a half). For any x, with q = Q1(x) and v = DQ1(q): every y
    between x and v has Q(y) == q (monotone, both ends give q). A clamp maps x and v to the same value, or
    to values between them (a bound lying between x and v), so Q2(act(v)) == Q2(act(x)). Pairs whose
    values are graph outputs (a per-layer comparison exposes them) are kept.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    readers = _readers(graph)
    producer = {o: n for n in graph.node for o in n.output}
    dropped: set[int] = set()
    for act in graph.node:
        if act.op_type not in ("Relu", "Clip") or act.domain not in ("", "ai.onnx") or not act.input:
            continue
        dq1 = producer.get(act.input[0])
        q1 = producer.get(dq1.input[0]) if dq1 is not None and dq1.op_type == "DequantizeLinear" else None
        after = readers.get(act.output[0], [])
        if q1 is None or q1.op_type != "QuantizeLinear" or len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        q2 = after[0]
        if (len(readers.get(dq1.output[0], [])) != 1 or len(readers.get(q1.output[0], [])) != 1
                or dq1.output[0] in outputs or q1.output[0] in outputs):
            continue
        if _one_grid(inits, (q1, dq1, q2)) is None:
            continue
        act.input[0] = q1.input[0]
        dropped.update((id(q1), id(dq1)))
    dropped |= _pairs_after_pads(graph, inits, producer, readers, outputs)
    if dropped:
        _keep_nodes(graph, [n for n in graph.node if id(n) not in dropped])
    _drop_pairs_on_their_grid(graph, {t.name: t for t in graph.initializer}, outputs)
    return model


# Ops that only move, select or repeat values (never compute one), so values on a grid stay on it; which of
# their inputs and outputs carry the data. MaxPool picks one of its inputs (padding never wins a max).
_MOVES_VALUES = (DATA_MOVEMENT_OPS - {"Pad"}) | {"MaxPool"}  # Pad writes its value: see _pairs_after_pads


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    return list(node.input) if node.op_type == "Concat" else list(node.input[:1])


def _data_outputs(node: onnx.NodeProto) -> list[str]:
    return [o for o in (node.output if node.op_type == "Split" else node.output[:1]) if o]


def _grid_key(inits, node: onnx.NodeProto) -> tuple | None:
    grid = _one_grid(inits, (node,))
    return None if grid is None else (grid[0].tobytes(), grid[1].dtype.str, grid[1].tobytes())


def _drop_pairs_on_their_grid(graph, inits, outputs) -> None:
    """Q -> DQ pairs whose input already sits on their grid go: DQ(q) -> Reshape/Transpose/Slice/Concat/...
    -> Q -> DQ, every data input dequantized on the pair's scale, zero point and type. The ops between only
    move values, so each is some DQ(q), which Q maps back to q (Q(DQ(q)) == q, see
    `drop_redundant_activation_pairs`) and DQ to the same float: exact, bit for bit. The quantizer gives a
    rearranged tensor its source's grid, so transformers have many (MiniLM A16W8: 72 of 230 pairs, after
    its Reshapes and Transposes; A8W8: 176 of 420, its attention heads' Slices and Concats too). Chains
    count: a value stays on the grid through any number of such ops and dropped pairs."""
    readers = _readers(graph)
    grid_of: dict[str, tuple] = {}  # value -> grid key, for values that are dequantized integers
    renamed: dict[str, str] = {}  # a dropped DQ's output -> the value its readers read instead
    dropped: set[int] = set()
    for node in graph.node:  # topological order: a value's grid is known before its readers
        if id(node) in dropped:
            continue
        for slot, name in enumerate(node.input):
            if name in renamed:
                node.input[slot] = renamed[name]
        if node.op_type == "DequantizeLinear":
            key = _grid_key(inits, node)
            if key is not None:
                grid_of[node.output[0]] = key
        elif node.op_type in _MOVES_VALUES and node.domain in ("", "ai.onnx"):
            keys = {grid_of.get(name) for name in _data_inputs(node)}
            if len(keys) == 1 and None not in keys:
                grid_of.update((name, next(iter(keys))) for name in _data_outputs(node))
        elif node.op_type == "QuantizeLinear" and node.input[0] in grid_of:
            after = readers.get(node.output[0], [])
            if (len(after) != 1 or after[0].op_type != "DequantizeLinear" or {node.output[0], after[0].output[0]} & outputs
                    or not grid_of[node.input[0]] == _grid_key(inits, node) == _grid_key(inits, after[0])):
                continue
            dropped.update((id(node), id(after[0])))
            renamed[after[0].output[0]] = node.input[0]
    if dropped:  # while `readers` holds every node: a node's id() is its wrapper's, stable only while it lives
        _keep_nodes(graph, [n for n in graph.node if id(n) not in dropped])


def _one_grid(inits, nodes) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, zero point) when the Q/DQ `nodes` all use one per-tensor integer grid (the same float32
    scale > 0, zero point and type) in the standard integer form, else None."""
    if any(n.domain not in ("", "ai.onnx", "com.microsoft") or any(a.name != "axis" for a in n.attribute)
           for n in nodes):
        return None  # saturate=0 (float8) or blocked Q/DQ: not the integer kernels reasoned about
    params = [[_scalar(inits, n.input[i]) if len(n.input) > i and n.input[i] else None for i in (1, 2)]
              for n in nodes]
    if any(scale is None or zero is None for scale, zero in params):
        return None
    (s1, z1), rest = params[0], params[1:]
    same = all(z.dtype == z1.dtype and s.dtype == s1.dtype == np.float32 and np.array_equal(s, s1)
               and np.array_equal(z, z1) for s, z in rest) and float(s1.ravel()[0]) > 0
    if not same or inits[nodes[0].input[2]].data_type not in _INTEGER_TYPES:
        return None
    return s1, z1


def _pairs_after_pads(graph, inits, producer, readers, outputs) -> set[int]:
    """DQ1 -> Pad(value v) -> Q2 -> DQ2 with Q2/DQ2 on DQ1's scale, zero point and type, and v on that grid
    (the quantizer puts it there): every value the Pad writes is already a grid point, which Q2 maps to its
    own integer (Q(DQ(q)) == q) and DQ2 back to the same float. The pair goes.

    On an 8-bit grid the Pad moves to the integers instead: q -> Pad(integer of v) -> DQ2, a quarter of the
    bytes of a float Pad (MobileNetV2's 17 explicit Pads pad its largest tensors), and exact: DQ of the
    integer of v is v (checked below in float32), DQ of every other element is what DQ1 gave it. onnxruntime's
    Pad has no 16-bit kernel: there DQ2's readers read the float Pad."""
    dropped: set[int] = set()
    moved: list[onnx.NodeProto] = []  # DQ1s whose Pad now reads the integers
    for pad in graph.node:
        if not is_constant_pad(pad) or pad.domain not in ("", "ai.onnx") or not pad.input:
            continue
        dq1, after = producer.get(pad.input[0]), readers.get(pad.output[0], [])
        if dq1 is None or dq1.op_type != "DequantizeLinear" or len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        q2 = after[0]
        dq2s = readers.get(q2.output[0], [])
        if len(dq2s) != 1 or dq2s[0].op_type != "DequantizeLinear" or {pad.output[0], q2.output[0], dq2s[0].output[0]} & outputs:
            continue
        dq2 = dq2s[0]
        grid = _one_grid(inits, (dq1, q2, dq2))
        if grid is None:
            continue
        s1, z1 = grid
        value = _scalar(inits, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1, np.float32)
        if value is None or value.dtype != np.float32:
            continue
        step, info = float(s1.ravel()[0]), np.iinfo(z1.dtype)
        k = float(value.ravel()[0]) / step
        on_grid = abs(k - round(k)) < 1e-3 and info.min <= round(k) + int(z1.ravel()[0]) <= info.max
        if not on_grid or np.float32(np.float32(round(k)) * np.float32(step)) != np.float32(value.ravel()[0]):
            continue
        dropped.add(id(q2))
        if z1.dtype.itemsize == 1:
            _pad_integers(graph, pad, dq1, dq2, np.array(round(k) + int(z1.ravel()[0]), z1.dtype))
            moved.append(dq1)
            continue
        for node in readers.get(dq2.output[0], []):
            for slot, name in enumerate(node.input):
                if name == dq2.output[0]:
                    node.input[slot] = pad.output[0]
        dropped.add(id(dq2))
    # A DQ1 goes once nothing reads it any more (several Pads may have read it; a graph output is read).
    still_read = {name for node in graph.node if id(node) not in dropped for name in node.input} | outputs
    dropped.update(id(dq1) for dq1 in moved if dq1.output[0] not in still_read)
    return dropped


def _pad_integers(graph, pad, dq1, dq2, value: np.ndarray) -> None:
    """DQ1 -> Pad(v) -> [Q2] -> DQ2 becomes q -> Pad(value) -> DQ2 (the caller drops Q2, and DQ1 once
    nothing reads it)."""
    name = f"{pad.output[0]}__integer_pad_value"
    graph.initializer.append(numpy_helper.from_array(value, name))
    pad.input[0] = dq1.input[0]
    while len(pad.input) < 3:
        pad.input.append("")
    pad.input[2] = name
    dq2.input[0] = pad.output[0]
    typed = [v for v in graph.value_info if v.name != pad.output[0]]  # the Pad's output is integer now
    del graph.value_info[:]
    graph.value_info.extend(typed)
