"""A read-only index over an ONNX graph: producers, consumers, constants (initializers and Constant nodes),
and the element types and shapes that onnx (and, where it gives up, onnxruntime's symbolic) shape
inference find. Nodes are addressed by position (a graph may hold unnamed nodes).

`pipeline.inspect`, placement and the MAC counts read it; the transforms use its editable sibling
(`pipeline.core.editable`).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .ops import DQ_OPS, MAC_OPS, Q_OPS, QDQ_DOMAINS
from .shapes import ShapeInferenceFailed, infer

__all__ = ["Graph", "infer_shapes", "node_macs", "cast_to"]

FLOATS = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})


class Graph:
    """Index over the top-level graph: producers, consumers, constants, types and shapes."""

    def __init__(self, model: onnx.ModelProto, base_dir: str = ""):
        g = model.graph
        self.base_dir = base_dir
        self.nodes = list(g.node)
        self.names = [n.name or f"{n.op_type}#{i}" for i, n in enumerate(self.nodes)]
        self.consts: dict[str, TensorProto] = {t.name: t for t in g.initializer}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = i
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(i)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        self.consts[node.output[0]] = attr.t
        self.inputs = [v for v in g.input if v.name not in self.consts]
        self.outputs = list(g.output)
        self.input_names = {v.name for v in self.inputs}
        self.output_names = {v.name for v in self.outputs}
        self.types: dict[str, int] = {}
        self.dims: dict[str, list[int | None]] = {}
        self.learn(g.input, g.value_info, g.output)
        self._attached: list[bool] | None = None  # computed once types are known (after infer_shapes)

    def learn(self, *values, skip_types: frozenset[str] = frozenset(), fill_only: bool = False) -> None:
        """Record element types and dims of ValueInfos: later calls win, or only fill gaps (`fill_only`)."""
        for value in (v for group in values for v in group):
            tensor = value.type.tensor_type if value.type.HasField("tensor_type") else None
            if tensor is None:
                continue
            if tensor.elem_type and value.name not in skip_types:
                self.types[value.name] = tensor.elem_type
            known = self.dims.get(value.name)
            if tensor.HasField("shape") and not (fill_only and known is not None and None not in known):
                self.dims[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]

    def elem_type(self, name: str) -> int | None:
        if name in self.consts:
            return self.consts[name].data_type
        return self.types.get(name)

    def is_float(self, name: str) -> bool:
        kind = self.elem_type(name)
        return kind is None or kind in FLOATS  # unknown: assume float (the conservative side)

    def shape(self, name: str) -> list[int] | None:
        """Fully static shape, or None."""
        if name in self.consts:
            return list(self.consts[name].dims)
        dims = self.dims.get(name)
        return None if dims is None or any(d is None for d in dims) else dims

    def array(self, name: str) -> np.ndarray | None:
        tensor = self.consts.get(name)
        if tensor is None:
            return None
        try:
            return numpy_helper.to_array(tensor, base_dir=self.base_dir)
        except (OSError, ValueError):  # external data not found or unreadable
            return None

    def attached(self, i: int) -> bool:
        """Q/DQ, Constant and bfloat16 Cast nodes: not placed on their own, they go with their compute."""
        if self._attached is None:
            self._attached = [self._is_attached(node) for node in self.nodes]
        return self._attached[i]

    def _is_attached(self, node: onnx.NodeProto) -> bool:
        if node.op_type in Q_OPS | DQ_OPS:
            return node.domain in QDQ_DOMAINS
        if node.op_type == "Constant":
            return True
        if node.op_type == "Cast":  # bfloat16 rounding casts (BF16 emulation, Quark BF16)
            return cast_to(node) == TensorProto.BFLOAT16 or self.elem_type(node.input[0]) == TensorProto.BFLOAT16
        return False


def cast_to(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "to"), 0)


def infer_shapes(g: Graph, model: onnx.ModelProto) -> str | None:
    """Teach `g` the types and shapes onnx shape inference finds; returns why it failed, or None."""
    try:
        inferred = infer(model, data_prop=True)
    except ShapeInferenceFailed as err:
        return str(err)
    custom = {o for n in model.graph.node if n.op_type in Q_OPS | DQ_OPS and n.domain not in ("", "ai.onnx")
              for o in n.output}
    g.learn(inferred.graph.value_info, inferred.graph.output, skip_types=frozenset(custom))
    declared = {v.name for v in g.outputs}
    g.outputs = [v for v in inferred.graph.output if v.name in declared] or g.outputs
    static_inputs = all(g.shape(v.name) is not None for v in g.inputs)  # else it only finds symbols
    if static_inputs and any(node_macs(g, n) is None for n in g.nodes if n.op_type in MAC_OPS):
        _infer_symbolic(g, model, custom)
    return None


def _infer_symbolic(g: Graph, model: onnx.ModelProto, replaced: set[str]) -> None:
    """onnx leaves some broadcast dims unknown (MiniLM's attention MatMuls behind the mask Add);
    onnxruntime's symbolic shape inference resolves them. It is slower and fails on some graphs
    (measured: dynamo-exported MiniLM), so it only runs when a MAC node's shapes are missing in a model
    with static inputs, and a failure just leaves them unknown (reported as `macs-unknown`)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - it raises assorted TypeErrors/AssertionErrors on graphs it cannot follow
        return
    if inferred is not None:
        g.learn(inferred.graph.value_info, skip_types=frozenset(replaced | g.types.keys()), fill_only=True)


def node_macs(g: Graph, node: onnx.NodeProto) -> int | None:
    """Multiply-accumulates of a Conv, ConvTranspose, MatMul or Gemm from its static shapes; else None."""
    op = node.op_type
    if op not in MAC_OPS or len(node.input) < 2:
        return None
    a, b, y = g.shape(node.input[0]), g.shape(node.input[1]), g.shape(node.output[0])
    if op == "Conv" and y and b:  # each output element: C_in/group x kernel MACs
        return math.prod(y) * math.prod(b[1:])
    if op == "ConvTranspose" and a and b:  # each input element scatters to C_out/group x kernel outputs
        return math.prod(a) * math.prod(b[1:])
    if op == "MatMul" and y is not None and a:
        return math.prod(y) * a[-1]
    if op == "Gemm" and y is not None and a and len(a) == 2:
        trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
        return math.prod(y) * (a[0] if trans_a else a[1])
    return None
