"""Values that share a quantization grid with another, so that no requantization happens between them.

- A fused activation's input (Conv -> Relu/Clip: the NPU requantizes once, to the activation's output)
  takes the activation's quantization (`fused_activation_inputs`).
- A Clip whose lower bound is below 0 (bias absorption's shifted ReLU6: Clip(z - c, -c, 6 - c)) sends
  its most frequent value, the old zero, to that bound: the grid holds it exactly (`clip_floors`), so the
  shift costs no rounding error on it (a constant error on most values, which only a bias correction on
  quantized inputs would see).
- A constant-mode Pad's output holds its input's values and the pad value: one grid for both
  (`padded_outputs`), the value written on it (`pad_values_on_their_grid`), so the Q/DQ pair after the Pad
  changes nothing (the emulation drops it, `core.emulation`).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from ..core.ops import is_constant_pad

__all__ = ["fused_activation_inputs", "padded_outputs", "pad_values_on_their_grid", "clip_floors"]


def padded_outputs(model: onnx.ModelProto) -> dict[str, str]:
    """{output: input} of every constant-mode Pad (the value's own Q/DQ is onnxruntime's, exact)."""
    found = {}
    for node in model.graph.node:
        if is_constant_pad(node):
            found[node.output[0]] = node.input[0]
    return found


def pad_values_on_their_grid(qmodel: onnx.ModelProto) -> None:
    """Each constant Pad's value quantized on the grid of the data it pads (onnxruntime gives the constant
    a scale of its own): the NPU's int8 Pad writes one integer in the data's type, and the Q/DQ pair after
    the Pad then changes nothing (the emulation drops it, `core.emulation`)."""
    inits = {t.name: t for t in qmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    readers = Counter(name for node in qmodel.graph.node for name in node.input)
    for pad in qmodel.graph.node:
        if pad.op_type != "Pad" or len(pad.input) < 3 or not pad.input[2]:
            continue
        data, value = producer.get(pad.input[0]), producer.get(pad.input[2])
        if data is None or value is None or data.op_type != value.op_type or data.op_type != "DequantizeLinear":
            continue
        if readers.get(value.input[0]) != 1 or not all(n in inits for n in (*data.input[1:3], *value.input[:3])):
            continue
        scale = numpy_helper.to_array(inits[data.input[1]])
        zero = numpy_helper.to_array(inits[data.input[2]])
        if scale.size != 1 or zero.size != 1 or not float(scale) > 0:
            continue
        q = numpy_helper.to_array(inits[value.input[0]]).astype(np.int64)
        v = (q - numpy_helper.to_array(inits[value.input[2]]).astype(np.int64)) * numpy_helper.to_array(inits[value.input[1]])
        info = np.iinfo(zero.dtype)
        k = np.clip(np.round(v.astype(np.float64) / float(scale)) + int(zero), info.min, info.max).astype(zero.dtype)
        inits[value.input[0]].CopyFrom(numpy_helper.from_array(k.reshape(q.shape), value.input[0]))
        value.input[1], value.input[2] = data.input[1], data.input[2]


def fused_activation_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """{tensor: the Relu/Clip output it feeds}, for node outputs read only by a Relu, or by a Clip with
    constant bounds and a lower bound <= 0: their Q/DQ take the activation's output range (whatever the
    pair saturates, the activation clips anyway)."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    readers = Counter(name for node in model.graph.node for name in node.input)
    produced = {o for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    found = {}
    for node in model.graph.node:
        if node.op_type not in ("Relu", "Clip") or not node.input or node.input[0] not in produced:
            continue
        source = node.input[0]
        if readers.get(source) != 1 or source in outputs:
            continue
        bounds = [n for n in node.input[1:3] if n]
        if node.op_type == "Clip" and (any(n not in consts or consts[n].size != 1 for n in bounds)
                                       or (len(node.input) > 1 and node.input[1] and float(consts[node.input[1]].ravel()[0]) > 0)):
            continue
        found[source] = node.output[0]
    return found


def clip_floors(model: onnx.ModelProto) -> dict[str, float]:
    """{Clip output: its constant lower bound} for Clips whose lower bound is below 0."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "Clip" and len(node.input) > 1 and node.input[1] in consts and consts[node.input[1]].size == 1:
            bound = float(consts[node.input[1]].ravel()[0])
            if bound < 0:
                found[node.output[0]] = bound
    return found
