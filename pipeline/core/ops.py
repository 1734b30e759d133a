"""Op-type sets, named by what the code that reads them relies on (one definition each)."""

from __future__ import annotations

from onnx import helper

__all__ = [
    "MAC_OPS", "WEIGHT_OPS", "Q_OPS", "DQ_OPS", "QDQ_OPS", "QDQ_DOMAINS", "LAYOUT_OPS", "PERMUTING_OPS",
    "DATA_MOVEMENT_OPS", "FUSIBLE_ACTIVATIONS", "QUANTIZABLE_OPS", "BF16_EXACT_OPS", "is_default_domain", "node_attr",
]

# Ops that do the multiply-accumulates (what MAC shares count).
MAC_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
# Ops with a constant weight whose input channels can absorb a per-channel scale (transforms).
WEIGHT_OPS = frozenset({"MatMul", "Gemm", "Conv"})

Q_OPS = frozenset({"QuantizeLinear", "ExtendedQuantizeLinear"})  # Extended*: Quark's custom-domain Q/DQ
DQ_OPS = frozenset({"DequantizeLinear", "ExtendedDequantizeLinear"})
QDQ_OPS = Q_OPS | DQ_OPS
QDQ_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft", "com.amd.quark", "com.vai.quantize"})

# Ops whose output holds exactly the values of their input, laid out differently (one value, several
# layouts: one quantization range, one set of numbers).
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"})
# ... and Identity: same statistics as their input (calibration measures the source once).
PERMUTING_OPS = LAYOUT_OPS | {"Identity"}
# Ops that move or select data without arithmetic (placement looks through them).
DATA_MOVEMENT_OPS = PERMUTING_OPS | {
    "Concat", "Slice", "Gather", "Split", "Expand", "DepthToSpace", "SpaceToDepth", "Tile", "Pad",
}
# Activations the NPU compiler fuses into the op before them (Conv+Relu): no Q/DQ needed between the two.
FUSIBLE_ACTIVATIONS = frozenset({
    "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Elu", "PRelu",
})
# Ops onnxruntime's QDQ quantizer knows how to wrap; a target's table decides which of them are asked for.
QUANTIZABLE_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "Clip", "LeakyRelu",
    "Sigmoid", "HardSigmoid", "Softmax", "AveragePool", "GlobalAveragePool", "MaxPool", "Concat", "Resize",
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Pad", "Gather", "Where",
    "Tanh", "Erf", "Pow", "Sqrt", "ReduceMean", "LayerNormalization", "InstanceNormalization",
})
# Ops whose float outputs are copies, selections, max/min or sign flips of their float inputs: bfloat16 in
# means bfloat16 out exactly (BF16 emulation rounds nothing after them). Clip is min/max against bounds the
# emulation has rounded to bfloat16 already (a ReLU6 after every MobileNet conv: one rounding pair less each).
BF16_EXACT_OPS = DATA_MOVEMENT_OPS | {
    "GatherElements", "GatherND", "Relu", "MaxPool", "Max", "Min", "ReduceMax", "ReduceMin", "Neg", "Abs", "Where",
    "Clip",
}


def is_default_domain(domain: str) -> bool:
    return domain in ("", "ai.onnx")


def is_constant_pad(node) -> bool:
    """A Pad in constant mode (the default), the mode whose value bias absorption writes its shifted zero in."""
    return node.op_type == "Pad" and node_attr(node, "mode", b"constant") in (b"constant", "constant")


def node_attr(node, name: str, default=None):
    """The value of `node`'s attribute `name` (ints, floats, strings as bytes, tensors), or `default`."""
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default
