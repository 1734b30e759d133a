"""Where a QDQ model's MACs run, read from the model itself: int8 x int8, 16-bit, or float.

The definition is the one an independent audit applies (and an int8 NPU engine needs): a Conv,
ConvTranspose, MatMul or Gemm counts as *int8* when its activation input and its weight both come from an
8-bit DequantizeLinear, through layout ops (Reshape/Transpose/Flatten/Squeeze/Unsqueeze) at most; as
*16-bit* when both are dequantized and either is 16-bit; as *float* when a side is not dequantized at all
(a BF16 island, a node on the CPU). Bit width = the itemsize of the DQ's zero point (or of its constant
input, or of the zero point of the QuantizeLinear feeding it). MACs from static shapes
(`pipeline.core.graph.node_macs`): Conv out elements x Cin/group x kernel, MatMul/Gemm out elements x K.

So a requantizing pair `DQ16 -> Q8 -> DQ8 -> MatMul` counts int8, and a MatMul reading a 16-bit DQ counts
16-bit even when its weight is int8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..core.graph import Graph, infer_shapes, node_macs
from ..core.ops import DQ_OPS, LAYOUT_OPS, MAC_OPS

__all__ = ["MacShares", "mac_shares"]


@dataclass
class MacShares:
    """MACs by kind, and each MAC node's kind ("int8", "16", "float")."""

    int8: int = 0
    wide16: int = 0
    float: int = 0
    nodes: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.int8 + self.wide16 + self.float

    @property
    def share_int8(self) -> float:
        return self.int8 / self.total if self.total else 1.0

    def to_json(self) -> dict:
        total = self.total or 1
        return {"mac_share_int8": round(self.int8 / total, 6), "mac_share_16": round(self.wide16 / total, 6),
                "mac_share_float": round(self.float / total, 6), "macs_total": self.total}


def _dtype_bits(value: np.ndarray | None) -> int | None:
    return None if value is None else 8 * value.dtype.itemsize


def mac_shares(qmodel: onnx.ModelProto) -> MacShares:
    """The MAC shares of a QDQ model (see the module docstring)."""
    g = Graph(qmodel)
    infer_shapes(g, qmodel)
    consts = {t.name: t for t in qmodel.graph.initializer}
    for node in qmodel.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    producer = {o: n for n in qmodel.graph.node for o in n.output}

    def const(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(consts[name]) if name in consts else None

    def bits(tensor: str) -> int:
        node = producer.get(tensor)
        while node is not None and node.op_type in LAYOUT_OPS:  # data movement keeps the integers
            node = producer.get(node.input[0])
        if node is None or node.op_type not in DQ_OPS:
            return 0
        src = node.input[0]
        found = _dtype_bits(const(node.input[2])) if len(node.input) > 2 and node.input[2] else None
        if found is None:
            found = _dtype_bits(const(src))
        if found is None:
            q = producer.get(src)
            zp = q.input[2] if q is not None and len(q.input) > 2 and q.input[2] else None
            found = _dtype_bits(const(zp)) if zp else None
        return found or 8  # QuantizeLinear without a zero point: uint8

    shares = MacShares()
    for node in qmodel.graph.node:
        if node.op_type not in MAC_OPS:
            continue
        macs = node_macs(g, node) or 1
        b0, b1 = bits(node.input[0]), bits(node.input[1]) if len(node.input) > 1 else 0
        kind = "float" if not b0 or not b1 else "int8" if b0 == b1 == 8 else "16"
        shares.nodes[node.name] = kind
        if kind == "int8":
            shares.int8 += macs
        elif kind == "16":
            shares.wide16 += macs
        else:
            shares.float += macs
    return shares
