"""Which activations are 16-bit, and which MAC readers of a 16-bit value still read int8 (requantized).

The NPU's fast path is int8 x int8 MACs; a residual sum or a LayerNorm input/output at 16 bits costs no
int8 MAC as long as every MatMul/Gemm/Conv that reads it gets an int8 copy: a requantizing pair
`DQ16 -> Q8 -> DQ8` in front of it (onnxruntime's TensorQuantOverrides "convert" with "recv_nodes").
`plan_bits` decides, from the values the caller wants at 16 bits (`promote`) and the MAC nodes allowed to
read 16 bits themselves (`wide`: A16W8 nodes), per tensor:

- 16 bits when promoted (or read by a wide node) and some reader needs the 16-bit value: a non-MAC op, a
  wide MAC, or a same-grid op (layout ops, Slice, pools, Resize, Pad) whose output is itself 16-bit;
- an int8 copy for the other readers (MAC nodes not wide, same-grid ops whose output stays int8);
- promoted but read by int8 readers only: int8 (16 bits would buy nothing and add a rounding).

Layout ops share their input's quantization (onnxruntime quantizes their output with the parameters their
input gives *them*), so a Reshape that receives the int8 copy has an int8 output, which the walk backwards
through the graph accounts for.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import onnx

from ..core.ops import LAYOUT_OPS, MAC_OPS

__all__ = ["BitPlan", "plan_bits", "mac_activation_inputs"]

# Ops whose output onnxruntime's quantizer puts on their input's grid: the layout ops, Slice, the
# pools, Resize and Pad. A 16-bit value one of them reads hands its width on to its output, and from there
# to the MAC that reads it, unless the op itself gets the int8 copy (PP-OCR's SVTR attention: promoted
# values sliced into q, k, v, 0.1% of the MACs 16-bit that the fallback had counted int8; a promoted
# value pooled, resized or padded into a Conv: that whole Conv; tests/test_transformer_int8.py).
_SAME_GRID_OPS = LAYOUT_OPS | {"Slice", "MaxPool", "AveragePool", "Resize", "Pad"}


@dataclass
class BitPlan:
    """`wide16`: tensors quantized at 16 bits; `int8_readers`: {16-bit tensor: nodes that get an int8 copy}."""

    wide16: set[str] = field(default_factory=set)
    int8_readers: dict[str, set[str]] = field(default_factory=dict)


def _activation_slots(node: onnx.NodeProto, inits: set[str]) -> list[str]:
    """The activation (non-constant) inputs of a MAC node: input 0, and input 1 when it is not a weight."""
    slots = [node.input[0]] if node.input and node.input[0] not in inits else []
    if node.op_type in ("MatMul",) and len(node.input) > 1 and node.input[1] not in inits:
        slots.append(node.input[1])
    return slots


def mac_activation_inputs(model: onnx.ModelProto, node_names: Iterable[str]) -> set[str]:
    """Activation tensors the named MAC nodes read, followed back through layout ops to their source."""
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    wanted = set(node_names)
    found: set[str] = set()
    for node in model.graph.node:
        if node.name not in wanted or node.op_type not in MAC_OPS:
            continue
        for name in _activation_slots(node, inits):
            found.add(name)
            src = producer.get(name)
            while src is not None and src.op_type in _SAME_GRID_OPS:
                found.add(src.input[0])
                src = producer.get(src.input[0])
    return found


def plan_bits(model: onnx.ModelProto, promote: Collection[str], wide: Collection[str] = ()) -> BitPlan:
    """The per-tensor plan for `promote` (tensors wanted at 16 bits) and `wide` (MAC nodes reading 16 bits)."""
    wide = set(wide)
    wanted = set(promote) | mac_activation_inputs(model, wide)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    # Reverse topological order (graph inputs last): a layout reader's output is decided before its input.
    order = [o for node in reversed(list(model.graph.node)) for o in node.output] + [i.name for i in model.graph.input]
    plan = BitPlan()
    for tensor in order:
        if tensor not in wanted:
            continue
        needs16, gets8 = tensor in outputs, set()
        for reader in consumers.get(tensor, []):
            if reader.op_type in MAC_OPS and reader.name not in wide:
                gets8.add(reader.name)
            elif reader.op_type in _SAME_GRID_OPS and reader.input[0] == tensor and reader.output[0] not in plan.wide16:
                gets8.add(reader.name)
            else:  # a wide MAC, a layout op with a 16-bit output, any other op
                needs16 = True
        if needs16:
            plan.wide16.add(tensor)
            if gets8:
                plan.int8_readers[tensor] = gets8
    return plan
