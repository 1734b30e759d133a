"""Exact float-graph rewrites that take quantization points away: constant affine ops folded into the
convolutions beside them, and decomposed hard activations fused into the one op they spell.

Why: every op output of a quantized graph is rounded to the activation grid. Exporters that spell a
per-tensor affine as separate ops (PaddlePaddle's learnable affine blocks, `Mul(scale) -> Add(bias)` after
and before every convolution of PP-LCNetV3; a BatchNorm exported as Mul/Add) or a hardswish as four ops
(`x * Clip(x + 3, 0, 6) / 6`) give a block eight roundings where the model needs one or two: on PP-OCRv4's
CTC recognizer in A8W8 the difference between a model that reads and one that does not.

- `fold_conv_affine(model)`: a Conv whose output only a `Mul`/`Add`/`Sub`/`Div` by a constant reads
  (one value, or one per output channel) takes it into its weights and bias; and a `Mul`/`Add`/`Sub`/`Div`
  by a constant whose output only Convs read goes into those Convs' weights (a scale: always; a shift: into
  the bias, when the Conv pads nothing, since padding adds zeros, not shifted values); a `Mul(c) -> Add(d)`
  before padded Convs becomes `Add(d / c) -> Mul(c)`, whose scale then folds. Exact up to float rounding.
- `fuse_hard_activations(model)`: `x * Clip(x + 3, 0, 6) / 6` (any order of the Mul and the Div, or a
  Mul by 1/6; Relu6 as Clip) becomes `HardSwish(x)`, `Clip(x + 3, 0, 6) / 6` becomes `HardSigmoid(x)`
  (alpha 1/6, beta 0.5). Exact up to float rounding. Whether an NPU format runs HardSwish is the caller's
  question (the quantize stage asks the target's operator table).

Both return counts and leave the graph valid for shape inference; neither touches a graph output's name.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .names import NameAllocator
from .onnx_io import model_opset
from .ops import is_default_domain, node_attr

__all__ = ["fold_conv_affine", "fuse_hard_activations", "has_decomposed_hard_activations"]

_AFFINE = ("Mul", "Add", "Sub", "Div")


class _Graph:
    """The model's nodes with producer/reader indexes and constant lookups, rebuilt after each rewrite."""

    def __init__(self, model: onnx.ModelProto, keep: frozenset[str] = frozenset()) -> None:
        self.model = model
        self.keep = keep
        self.g = model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.outputs = {o.name for o in self.g.output}
        self.names = NameAllocator(self.g)
        self.reindex()

    def reindex(self) -> None:
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.g.node:
            for name in node.input:
                if name:
                    self.readers.setdefault(name, []).append(node)

    def constant(self, name: str) -> np.ndarray | None:
        """A float initializer's value (float64), or the value of a Constant node; else None."""
        if name in self.inits:
            value = numpy_helper.to_array(self.inits[name])
        else:
            node = self.producer.get(name)
            if node is None or node.op_type != "Constant" or not is_default_domain(node.domain):
                return None
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is None:
                return None
            value = numpy_helper.to_array(attr.t)
        return value.astype(np.float64) if value.dtype.kind == "f" else None

    def only_reader(self, name: str) -> onnx.NodeProto | None:
        """The one node reading `name` (not a graph output), unless the caller keeps that node."""
        readers = self.readers.get(name, [])
        if len(readers) != 1 or name in self.outputs or readers[0].name in self.keep:
            return None
        return readers[0]

    def add_initializer(self, base: str, value: np.ndarray, dtype) -> str:
        name = self.names.fresh(base)
        self.g.initializer.append(numpy_helper.from_array(value.astype(dtype), name))
        self.inits[name] = self.g.initializer[-1]
        return name

    def remove(self, dead: list[onnx.NodeProto]) -> None:
        ids = {id(n) for n in dead}
        kept = [n.SerializeToString() for n in self.g.node if id(n) not in ids]
        del self.g.node[:]
        for data in kept:
            self.g.node.add().ParseFromString(data)
        needed = {name for node in self.g.node for name in node.input} | self.outputs
        unused_constants = [n for n in self.g.node if n.op_type == "Constant" and n.output[0] not in needed]
        for node in unused_constants:  # the constants the folded ops read
            self.g.node.remove(node)
        kept_inits = [t for t in self.g.initializer if t.name in needed]
        del self.g.initializer[:]
        self.g.initializer.extend(kept_inits)
        self.inits = {t.name: t for t in self.g.initializer}
        self.reindex()



def _affine_operand(graph: _Graph, node: onnx.NodeProto, value: str) -> tuple[str, np.ndarray] | None:
    """(op, constant) when `node` is `value` combined with a constant by Mul/Add (either side) or Sub/Div
    (constant second): `value` op constant. None otherwise."""
    if node.op_type not in _AFFINE or not is_default_domain(node.domain) or len(node.input) != 2:
        return None
    a, b = node.input
    if a == value and b != value:
        k = graph.constant(b)
    elif b == value and a != value and node.op_type in ("Mul", "Add"):
        k = graph.constant(a)
    else:
        return None
    return None if k is None or not np.isfinite(k).all() else (node.op_type, k)


def _per_channel(k: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """`k` as one value per channel (axis 1 of a rank-`rank` tensor) when it broadcasts that way: a scalar,
    or all dims 1 but the channel dim. None when it varies along another axis or would grow the tensor."""
    if k.ndim > rank:
        return None
    shape = (1,) * (rank - k.ndim) + k.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(k.reshape(-1), (channels,)).astype(np.float64) if k.size == 1 else k.reshape(-1)


def _conv_parts(graph: _Graph, conv: onnx.NodeProto):
    """(weight, bias or None) of a Conv with constant parameters, float64; None when not constant."""
    if conv.op_type != "Conv" or not is_default_domain(conv.domain) or len(conv.input) < 2:
        return None
    if conv.input[1] not in graph.inits:
        return None
    w = graph.constant(conv.input[1])
    has_bias = len(conv.input) > 2 and conv.input[2]
    b = graph.constant(conv.input[2]) if has_bias else None
    if w is None or (has_bias and (b is None or conv.input[2] not in graph.inits)):
        return None
    return w, b


def _set_conv(graph: _Graph, conv: onnx.NodeProto, w: np.ndarray, b: np.ndarray) -> None:
    """New weight and bias initializers for `conv` (never edited in place: another node may share them)."""
    dtype = numpy_helper.to_array(graph.inits[conv.input[1]]).dtype
    inputs = [conv.input[0], graph.add_initializer(f"{conv.input[1]}_folded", w, dtype),
              graph.add_initializer(f"{conv.output[0]}_bias_folded", b, dtype)]
    del conv.input[:]
    conv.input.extend(inputs)


def _unpadded(conv: onnx.NodeProto) -> bool:
    if node_attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        return False
    return not any(node_attr(conv, "pads", []))


def _fold_after(graph: _Graph, conv: onnx.NodeProto) -> bool:
    """Fold the affine op that alone reads `conv`'s output into it."""
    parts = _conv_parts(graph, conv)
    reader = graph.only_reader(conv.output[0])
    if conv.name in graph.keep or parts is None or reader is None:
        return False
    operand = _affine_operand(graph, reader, conv.output[0])
    if operand is None:
        return False
    w, b = parts
    op, k = operand
    c = _per_channel(k, w.shape[0], w.ndim)
    if c is None or (op == "Div" and not np.all(c != 0)):
        return False
    b = np.zeros(w.shape[0]) if b is None else b
    column = (-1,) + (1,) * (w.ndim - 1)
    if op == "Mul":
        w, b = w * c.reshape(column), b * c
    elif op == "Div":
        w, b = w / c.reshape(column), b / c
    elif op == "Add":
        b = b + c
    else:
        b = b - c
    _set_conv(graph, conv, w, b)
    conv.output[0] = reader.output[0]
    graph.remove([reader])
    return True


def _fold_before(graph: _Graph, node: onnx.NodeProto) -> bool:
    """Fold the affine op `node` into the Convs that alone read its output (see the module docstring)."""
    if node.op_type not in _AFFINE or not node.input or node.output[0] in graph.outputs or node.name in graph.keep:
        return False
    source = next((i for i in node.input if graph.constant(i) is None), None)
    operand = _affine_operand(graph, node, source) if source is not None else None
    readers = graph.readers.get(node.output[0], [])
    if operand is None or not readers:
        return False
    op, k = operand
    plans = []
    for conv in readers:
        if conv.name in graph.keep:
            return False
        parts = _conv_parts(graph, conv)
        if parts is None or conv.input[0] != node.output[0] or list(conv.input[1:]).count(node.output[0]):
            return False
        w, b = parts
        group = node_attr(conv, "group", 1)
        in_channels = w.shape[1] * group
        c = _per_channel(k, in_channels, w.ndim)
        if c is None or (op == "Div" and not np.all(c != 0)) or (op in ("Add", "Sub") and not _unpadded(conv)):
            return False
        # Each output channel o reads input channels (o // (C_out / group)) * C_in/group + j, j < C_in/group.
        per_group_out = w.shape[0] // group
        index = (np.arange(w.shape[0]) // per_group_out)[:, None] * w.shape[1] + np.arange(w.shape[1])[None, :]
        ck = c[index].reshape(w.shape[:2] + (1,) * (w.ndim - 2))
        b = np.zeros(w.shape[0]) if b is None else b
        if op == "Mul":
            w = w * ck
        elif op == "Div":
            w = w / ck
        else:
            shift = ck if op == "Add" else -ck
            b = b + (w * shift).reshape(w.shape[0], -1).sum(axis=1)
        plans.append((conv, w, b))
    for conv, w, b in plans:
        _set_conv(graph, conv, w, b)
        conv.input[0] = source
    graph.remove([node])
    return True


def _scale_past_shift(graph: _Graph, mul: onnx.NodeProto) -> bool:
    """`Mul(x, c) -> Add(., d) -> padded Convs` becomes `Add(x, d / c) -> Mul(., c) -> Convs`, so that the
    scale folds into the Convs (the shift cannot: padding) and one op is left where there were two."""
    if mul.op_type != "Mul" or mul.name in graph.keep:
        return False
    source = next((i for i in mul.input if graph.constant(i) is None), None)
    operand = _affine_operand(graph, mul, source) if source is not None else None
    add = graph.only_reader(mul.output[0])
    shift = _affine_operand(graph, add, mul.output[0]) if add is not None else None
    if operand is None or shift is None or shift[0] not in ("Add", "Sub"):
        return False
    readers = graph.readers.get(add.output[0], [])
    if not readers or add.output[0] in graph.outputs or any(
            r.op_type != "Conv" or r.name in graph.keep or r.input[0] != add.output[0] or _conv_parts(graph, r) is None
            for r in readers):
        return False
    c, d = operand[1], shift[1] if shift[0] == "Add" else -shift[1]
    w = _conv_parts(graph, readers[0])[0]
    if not np.all(c != 0) or _per_channel(c, w.shape[1] * node_attr(readers[0], "group", 1), w.ndim) is None:
        return False  # the scale would not fold after the move
    const_name = mul.input[1] if mul.input[0] == source else mul.input[0]
    dtype = numpy_helper.to_array(graph.inits[const_name]).dtype if const_name in graph.inits else np.float32
    shifted = graph.add_initializer(f"{add.output[0]}_shift", d / c, dtype)
    scale = graph.add_initializer(f"{mul.output[0]}_scale", c, dtype)
    middle, out = mul.output[0], add.output[0]
    add_node = helper.make_node("Add", [source, shifted], [middle], name=add.name)
    mul_node = helper.make_node("Mul", [middle, scale], [out], name=mul.name)
    mul.CopyFrom(add_node)  # in place: the graph's order (Mul, then Add) becomes Add, then Mul
    add.CopyFrom(mul_node)
    graph.remove([])
    return True


def fold_conv_affine(model: onnx.ModelProto, keep: Iterable[str] = ()) -> dict[str, int]:
    """Fold constant affine ops into neighbouring Convs, in place (module docstring); the counts. Nodes
    named in `keep` (a recipe's `exclude_nodes`) are neither folded away nor rewritten."""
    graph = _Graph(model, frozenset(keep))
    counts = {"after_conv": 0, "before_conv": 0, "scale_moved_past_shift": 0}
    # Each pass applies the first rewrite that finds a place (a rewrite re-indexes the graph), in this
    # order: folds first, a move only where nothing folds any more.
    rewrites = (("after_conv", lambda node: node.op_type == "Conv" and _fold_after(graph, node)),
                ("before_conv", lambda node: node.op_type in _AFFINE and _fold_before(graph, node)),
                ("scale_moved_past_shift", lambda node: _scale_past_shift(graph, node)))
    while True:
        for key, rewrite in rewrites:
            if any(rewrite(node) for node in list(graph.g.node)):
                counts[key] += 1
                break
        else:
            return counts


def _is_const(graph: _Graph, name: str, value: float) -> bool:
    k = graph.constant(name) if name else None
    return k is not None and k.size == 1 and abs(float(k.reshape(-1)[0]) - value) <= 1e-6 * max(1.0, abs(value))


def _relu6_of_x_plus_3(graph: _Graph, clip: onnx.NodeProto) -> str | None:
    """x when `clip` is Clip(x + 3, 0, 6) (Add by a constant 3, either side); else None."""
    if clip.op_type != "Clip" or not is_default_domain(clip.domain):
        return None
    if len(clip.input) >= 3:
        bounds = _is_const(graph, clip.input[1], 0.0) and _is_const(graph, clip.input[2], 6.0)
    else:
        bounds = node_attr(clip, "min") == 0.0 and node_attr(clip, "max") == 6.0
    add = graph.producer.get(clip.input[0])
    if not bounds or add is None or add.op_type != "Add" or graph.only_reader(add.output[0]) is not clip:
        return None
    a, b = add.input
    if _is_const(graph, b, 3.0) and graph.constant(a) is None:
        return a
    if _is_const(graph, a, 3.0) and graph.constant(b) is None:
        return b
    return None


def _over_six(graph: _Graph, node: onnx.NodeProto, value: str) -> bool:
    """`node` is `value` / 6 or `value` * (1/6)."""
    if node.op_type == "Div" and node.input[0] == value:
        return _is_const(graph, node.input[1], 6.0)
    if node.op_type == "Mul" and value in node.input:
        other = node.input[1] if node.input[0] == value else node.input[0]
        return _is_const(graph, other, 1.0 / 6.0)
    return False


def _other(node: onnx.NodeProto, value: str) -> str | None:
    if node.op_type != "Mul" or len(node.input) != 2 or value not in node.input:
        return None
    return node.input[1] if node.input[0] == value else node.input[0]


def _hard_activation_at(graph: _Graph, clip: onnx.NodeProto) -> tuple[str, str, list[onnx.NodeProto]] | None:
    """(fused op, x, the nodes it replaces, the last one writing the output) when `clip` is the Clip of a
    decomposed hardswish or hardsigmoid of x; else None."""
    x = _relu6_of_x_plus_3(graph, clip)
    reader = graph.only_reader(clip.output[0]) if x is not None else None
    if reader is None:
        return None
    add = graph.producer[clip.input[0]]
    if _other(reader, clip.output[0]) == x:  # x * relu6(x + 3), then / 6
        last = graph.only_reader(reader.output[0])
        if last is not None and _over_six(graph, last, reader.output[0]):
            return "HardSwish", x, [add, clip, reader, last]
    elif _over_six(graph, reader, clip.output[0]):  # relu6(x + 3) / 6, maybe then * x
        user = graph.only_reader(reader.output[0])
        if user is not None and _other(user, reader.output[0]) == x:
            return "HardSwish", x, [add, clip, reader, user]
        return "HardSigmoid", x, [add, clip, reader]
    return None


def fuse_hard_activations(model: onnx.ModelProto, keep: Iterable[str] = (),
                          ops: Iterable[str] = ("HardSwish", "HardSigmoid")) -> dict[str, int]:
    """Fuse decomposed hardswish and hardsigmoid, in place (module docstring); the counts. Only into the
    `ops` named (the ones the target runs); patterns with a node named in `keep` are left."""
    graph = _Graph(model, frozenset(keep))
    ops = set(ops)
    counts = {"hardswish": 0, "hardsigmoid": 0}
    if model_opset(model) < 14:
        return counts  # HardSwish is an opset-14 operator
    changed = True
    while changed:
        changed = False
        for clip in list(graph.g.node):
            found = _hard_activation_at(graph, clip)
            if found is None or found[0] not in ops or any(n.name in graph.keep for n in found[2]):
                continue
            fused, x, dead = found
            out = dead[-1].output[0]
            attrs = {"alpha": 1.0 / 6.0, "beta": 0.5} if fused == "HardSigmoid" else {}
            node = helper.make_node(fused, [x], [out], name=graph.names.fresh(f"{fused}_{out}"), **attrs)
            index = list(graph.g.node).index(dead[-1])
            graph.g.node.insert(index, node)
            graph.remove(dead)
            counts[fused.lower()] += 1
            changed = True
            break
    return counts


def has_decomposed_hard_activations(model: onnx.ModelProto) -> bool:
    """Whether `fuse_hard_activations` would find anything in `model` once at opset 14 or later (the
    model is only read)."""
    if not any(n.op_type == "Clip" for n in model.graph.node):
        return False
    graph = _Graph(model)
    return any(_hard_activation_at(graph, node) is not None for node in model.graph.node)
