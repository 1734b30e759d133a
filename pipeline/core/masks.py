"""Attention masks: the float tensors a transformer computes from its integer inputs to mask attention.

These build additive masks; they run once per input, not per layer, and carry -1e4 fills that no 8-bit
range can share with real activations. Quantizing them blindly is how onnxruntime and Quark turn MiniLM's
cosine into 0.35 and 0.25 (measured.md), so quantize keeps them float, Softmax inputs that carry one get
a mask-aware range, and per-layer errors score those inputs on unmasked positions only.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

__all__ = ["MASK_FLOOR", "MASKED_BELOW", "mask_path_nodes", "masked_softmax_inputs"]

# prepare clamps additive-mask constants (float32 min, -3.4e38) to this; exp(-1e4) is 0 in float32 anyway.
MASK_FLOOR = -1.0e4
# Below this a masked score is masked (the clamped mask plus any real score stays under it).
MASKED_BELOW = -5.0e3

_PASSTHROUGH = frozenset({
    "Cast", "Sub", "Mul", "Add", "Unsqueeze", "Reshape", "Expand", "Not", "Equal", "Where", "Neg",
    "Flatten", "Gather", "And", "Or",
})


def mask_path_nodes(model: onnx.ModelProto) -> set[str]:
    """Nodes that compute float tensors from integer inputs by casts and elementwise constant math."""
    init = {i.name: i for i in model.graph.initializer}
    int_inputs = {
        i.name for i in model.graph.input
        if i.name not in init and i.type.tensor_type.elem_type != TensorProto.FLOAT
    }

    def is_float_weight(name: str) -> bool:
        # Scalars (the -1e4 fill, 1.0) are mask constants; a float tensor (an embedding table) is a weight.
        t = init.get(name)
        return t is not None and t.data_type == TensorProto.FLOAT and int(np.prod(t.dims)) > 1

    derived = set(int_inputs)
    nodes = set()
    for node in model.graph.node:  # graph is topologically sorted
        dynamic = [i for i in node.input if i and i not in init]
        if (
            node.op_type in _PASSTHROUGH
            and dynamic
            and all(i in derived for i in dynamic)
            and not any(is_float_weight(i) for i in node.input)
        ):
            derived.update(node.output)
            nodes.add(node.name)
    return nodes


def masked_softmax_inputs(model: onnx.ModelProto, mask_nodes: set[str] | None = None) -> dict[str, str]:
    """Softmax inputs made by Add(scores, mask) with the mask from the mask path: {input: scores}."""
    mask_nodes = mask_path_nodes(model) if mask_nodes is None else mask_nodes
    mask_tensors = {o for n in model.graph.node if n.name in mask_nodes for o in n.output}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for node in model.graph.node:
        add = producers.get(node.input[0]) if node.op_type == "Softmax" else None
        if add is not None and add.op_type == "Add":
            a, b = add.input
            if b in mask_tensors:
                found[node.input[0]] = a
            elif a in mask_tensors:
                found[node.input[0]] = b
    return found
