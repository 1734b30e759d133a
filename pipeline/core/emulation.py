"""NPU numerics at speed: a QDQ (or BF16-rounding) model evaluated so that every Q/DQ keeps its exact float
semantics (ideal integer arithmetic, what the NPU computes), without paying for what does not matter.

- Constant weights and biases are dequantized once, here, instead of at every inference: each
  DequantizeLinear whose inputs are all initializers becomes a float initializer holding exactly what the
  node computes ((q - zero_point) in integers, converted to float32, times the float32 scale: the same
  IEEE operations as onnxruntime's kernel, checked bit for bit in tests).
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

__all__ = ["fold_constant_dequantize", "EMULATION_DISABLED_OPTIMIZERS"]

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


def fold_constant_dequantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose DequantizeLinear nodes reading only initializers are float initializers."""
    folded = onnx.ModelProto.FromString(model.SerializeToString())
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
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(made)
    used = {name for node in graph.node for name in node.input} | outputs
    remaining = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(remaining)
    return folded
