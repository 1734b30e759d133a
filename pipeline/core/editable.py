"""A small mutable view of an ONNX graph for the float-graph transforms: producers, consumers, static
shapes, constants that can be read and written without touching a constant another node shares.

Unlike `pipeline.core.graph.Graph` (read-only, nodes by position, types and MACs for inspection), this
view holds node objects and edits the model in place."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .names import NameAllocator
from .ops import WEIGHT_OPS, node_attr
from .shapes import static_shapes

__all__ = ["Editable", "WEIGHT_OPS"]



class Editable:
    """Index over `model` (edited in place). Build a new one after changing the graph's structure."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in g.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in g.output}
        self.shapes = static_shapes(model)  # best effort: an unknown shape just stops a fold
        self.names = NameAllocator(g)

    attr = staticmethod(node_attr)

    def const(self, name: str) -> np.ndarray | None:
        """The value of a float initializer (a copy), or None when `name` is not one."""
        t = self.inits.get(name)
        if t is None or t.data_type != onnx.TensorProto.FLOAT:
            return None
        return numpy_helper.to_array(t).copy()

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name in self.inits:
            return tuple(self.inits[name].dims)
        return self.shapes.get(name)

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        """The single node that reads `name`, or None when it has several readers or is a graph output."""
        readers = self.consumers.get(name, [])
        if len(readers) != 1 or name in self.outputs:
            return None
        return readers[0]

    def set_input_const(self, node: onnx.NodeProto, slot: int, value: np.ndarray, tag: str) -> None:
        """Give `node` a new constant at input `slot`: a fresh initializer, so sharers keep the old one."""
        old = node.input[slot] if slot < len(node.input) else ""
        name = self.names.fresh(f"{old or node.name}_{tag}")
        tensor = numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name)
        self.model.graph.initializer.append(tensor)
        self.inits[name] = tensor
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = name
        self.consumers.setdefault(name, []).append(node)
        if old:
            self.consumers[old] = [n for n in self.consumers.get(old, []) if n is not node]
            if not self.consumers[old] and old in self.inits and old not in {i.name for i in self.model.graph.input}:
                self.model.graph.initializer.remove(self.inits.pop(old))

    def weight(self, node: onnx.NodeProto) -> tuple[np.ndarray, int] | None:
        """(weight, input-channel axis of the weight) for a MatMul/Gemm/Conv with a constant weight."""
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            return None
        w = self.const(node.input[1])
        if w is None:
            return None
        if node.op_type == "MatMul":
            return (w, 0) if w.ndim == 2 else None
        if node.op_type == "Gemm":
            if node_attr(node, "transA", 0) or w.ndim != 2:
                return None
            return w, (1 if node_attr(node, "transB", 0) else 0)
        if node_attr(node, "group", 1) != 1:  # grouped/depthwise: an input channel is not shared by all outputs
            return None
        return w, 1

    @staticmethod
    def output_axis(node: onnx.NodeProto) -> int:
        """Output-channel axis of a MatMul/Gemm/Conv weight."""
        if node.op_type == "Conv":
            return 0
        if node.op_type == "Gemm" and node_attr(node, "transB", 0):
            return 0
        return 1

    @staticmethod
    def input_channel_axis(node: onnx.NodeProto) -> int:
        """Channel axis of the activation input of a MatMul/Gemm (last) or Conv (1)."""
        return 1 if node.op_type == "Conv" else -1
