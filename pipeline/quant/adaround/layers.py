"""The layers of a QDQ model whose integer weights AdaRound may rewrite, and how to write them back.

A layer qualifies when it is a Conv (any group count), a Gemm (no transA) or a MatMul whose weight input is
a DequantizeLinear of a constant integer initializer read by nothing else, and the float model that was
quantized has a node of the same name (onnxruntime's quantizer keeps compute node names) with the float
weight. Its weight is viewed per group as [group, outputs per group, fan-in] (`grouped`): a Conv's
[O, I/g, kh, kw] row o, flattened, is the fan-in vector that multiplies an im2col column of its group.

ConvTranspose is left to round-to-nearest (its im2col is a scatter, not a gather; say so in the report).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ...core.ops import node_attr

__all__ = ["QuantLayer", "find_layers", "write_weights", "write_bias"]

_OPS = ("Conv", "Gemm", "MatMul")



@dataclass
class QuantLayer:
    node: onnx.NodeProto  # in the QDQ model
    weight_int: str  # the integer initializer
    scale: np.ndarray  # scalar, or one per output channel
    zero: np.ndarray
    w_float: np.ndarray  # the float weight, as stored (Conv [O, I/g, k...], Gemm [N, K] or [K, N], MatMul [K, N])
    bias_float: np.ndarray | None  # the float model's bias, one per output (None: no bias slot used)
    input: str  # the activation the layer reads in the QDQ model
    output: str  # the layer's output in the float model (before any activation)
    float_input: str  # the activation the layer reads in the float model
    qmin: int
    qmax: int
    group: int = 1
    conv: dict = field(default_factory=dict)  # kernel, strides, pads, dilations

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def transposed(self) -> bool:
        """True when the stored weight is [fan-in, outputs] (MatMul, Gemm without transB)."""
        return self.op == "MatMul" or (self.op == "Gemm" and not node_attr(self.node, "transB", 0))

    @property
    def n_out(self) -> int:
        return self.w_float.shape[1] if self.transposed else self.w_float.shape[0]

    def grouped(self, w: np.ndarray) -> np.ndarray:
        """[group, outputs per group, fan-in] view of a weight stored like `w_float`."""
        w = w.T if self.transposed else w
        return w.reshape(self.group, w.shape[0] // self.group, -1)

    def stored(self, g: np.ndarray) -> np.ndarray:
        """Inverse of `grouped`."""
        shape = self.w_float.T.shape if self.transposed else self.w_float.shape
        w = g.reshape(shape)
        return w.T if self.transposed else w

    def grouped_scale(self) -> np.ndarray:
        """The weight scale broadcastable against `grouped` (per tensor, or per output channel)."""
        s = np.asarray(self.scale, np.float64).reshape(-1)
        if s.size == 1:
            return s.reshape(1, 1, 1)
        return s.reshape(self.group, -1, 1)


def find_layers(qmodel: onnx.ModelProto, float_model: onnx.ModelProto, *, ops=_OPS) -> tuple[list[QuantLayer], list[dict]]:
    """(the layers AdaRound can round, in graph order; [{node, reason}] for the weight layers it cannot)."""
    inits = {t.name: t for t in qmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    readers = Counter(i for n in qmodel.graph.node for i in n.input)
    f_inits = {t.name: t for t in float_model.graph.initializer}
    f_nodes = {n.name: n for n in float_model.graph.node if n.name}
    found, skipped = [], []
    for node in qmodel.graph.node:
        if node.op_type == "ConvTranspose":
            skipped.append({"node": node.name, "reason": "ConvTranspose keeps round-to-nearest"})
        if node.op_type not in ops or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue  # a float weight, or an activation (attention's MatMuls)
        reason = _unsupported(node, dq, readers, f_nodes, f_inits)
        if reason:
            skipped.append({"node": node.name, "reason": reason})
            continue
        fnode = f_nodes[node.name]
        w = numpy_helper.to_array(f_inits[fnode.input[1]]).astype(np.float64)
        q = numpy_helper.to_array(inits[dq.input[0]])
        zero = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in inits else None
        if q.dtype.kind not in "iu" or (zero is not None and np.any(zero.astype(np.int64) != 0)):
            skipped.append({"node": node.name, "reason": f"weight stored as {q.dtype} with zero point {zero}: "
                            "AdaRound rounds symmetric 8/16-bit integer weights"})
            continue
        info = np.iinfo(q.dtype)
        bias = None
        if node.op_type != "MatMul" and len(fnode.input) > 2 and fnode.input[2] in f_inits:
            bias = numpy_helper.to_array(f_inits[fnode.input[2]]).astype(np.float64).reshape(-1)
        layer = QuantLayer(
            node, dq.input[0], numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64),
            np.zeros(1),
            w, bias, node.input[0], fnode.output[0], fnode.input[0],
            # Symmetric formats keep -qmax..qmax (what onnxruntime writes for symmetric weights).
            -int(info.max) if info.min < 0 else int(info.min), int(info.max),
            int(node_attr(node, "group", 1)),
        )
        if node.op_type == "Conv":
            k = list(w.shape[2:])
            layer.conv = {
                "kernel": k,
                "strides": list(node_attr(node, "strides", [1] * len(k))),
                "pads": list(node_attr(node, "pads", [0] * 2 * len(k))),
                "dilations": list(node_attr(node, "dilations", [1] * len(k))),
            }
        if q.shape != w.shape:
            skipped.append({"node": node.name, "reason": "quantized and float weights differ in shape"})
            continue
        found.append(layer)
    return found, skipped


def _unsupported(node, dq, readers, f_nodes, f_inits) -> str | None:
    if readers.get(dq.input[0], 0) != 1 or readers.get(dq.output[0], 0) != 1:
        return "its weight is shared with another node"
    fnode = f_nodes.get(node.name)
    if fnode is None or len(fnode.input) < 2 or fnode.input[1] not in f_inits:
        return "no float weight of the same node in the float model"
    if node.op_type == "Gemm" and node_attr(node, "transA", 0):
        return "Gemm with transA"
    if node.op_type == "Conv" and node_attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return "Conv with auto_pad"
    w = f_inits[fnode.input[1]]
    if node.op_type == "MatMul" and len(w.dims) != 2:
        return "MatMul with a weight of rank other than 2"
    return None


def write_weights(qmodel: onnx.ModelProto, layer: QuantLayer, q: np.ndarray) -> None:
    """Replace the layer's integer weight initializer (same name, same type) by `q`."""
    for index, tensor in enumerate(qmodel.graph.initializer):
        if tensor.name == layer.weight_int:
            dtype = numpy_helper.to_array(tensor).dtype
            qmodel.graph.initializer[index].CopyFrom(numpy_helper.from_array(q.astype(dtype), tensor.name))
            return
    raise KeyError(layer.weight_int)


def write_bias(qmodel: onnx.ModelProto, layer: QuantLayer, shift: np.ndarray) -> str | None:
    """Add `shift` (one per output) to the layer's bias as the QDQ model stores it: an int32 initializer
    behind a DequantizeLinear (requantized with its own scale) or a float initializer. Returns where, or
    None when the layer has no bias to move (a MatMul, or a Conv/Gemm without one)."""
    node = layer.node
    if node.op_type == "MatMul" or len(node.input) < 3 or not node.input[2]:
        return None
    inits = {t.name: t for t in qmodel.graph.initializer}
    name = node.input[2]
    producer = next((n for n in qmodel.graph.node if name in n.output), None)
    if producer is not None and producer.op_type == "DequantizeLinear" and producer.input[0] in inits:
        raw = inits[producer.input[0]]
        values = numpy_helper.to_array(raw)
        scale = numpy_helper.to_array(inits[producer.input[1]]).astype(np.float64)
        current = values.astype(np.float64) * scale
        info = np.iinfo(values.dtype)
        new = np.clip(np.round((current + shift.reshape(values.shape)) / scale), info.min, info.max)
        raw.CopyFrom(numpy_helper.from_array(new.astype(values.dtype), raw.name))
        return f"int32 bias '{raw.name}'"
    if name in inits and inits[name].data_type == onnx.TensorProto.FLOAT:
        values = numpy_helper.to_array(inits[name])
        inits[name].CopyFrom(numpy_helper.from_array((values + shift.reshape(values.shape)).astype(np.float32), name))
        return f"float bias '{name}'"
    return None
