"""Tiny ONNX graphs built node by node for the transform and quantization tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.core.onnx_io import make_session


def tiny_model(nodes, inits, inputs, outputs, opset=17) -> onnx.ModelProto:
    """A float model of `nodes` (unnamed ones get `n<i>`), initializers {name: array}, inputs
    [(name, shape)] and outputs [name], shape-inferred."""
    for i, node in enumerate(nodes):
        node.name = node.name or f"n{i}"
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def run_unoptimized(model: onnx.ModelProto, feeds: dict) -> list:
    """`model`'s outputs with onnxruntime's graph optimizations off (exact Q/DQ numerics)."""
    return make_session(model.SerializeToString(), optimize=False).run(None, feeds)


def conv_relu_chain(seed: int = 5) -> onnx.ModelProto:
    """Three 3x3 Conv + Relu layers (3 -> 8 -> 8 -> 4 channels, biased outputs, input [1, 3, 8, 8]): with
    8-bit activations each layer's rounding noise reaches the output `y`."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = {}, [], "x"
    for i, (cin, cout) in enumerate([(3, 8), (8, 8), (8, 4)]):
        inits[f"w{i}"] = rng.standard_normal((cout, cin, 3, 3)) * 0.4
        inits[f"b{i}"] = rng.standard_normal(cout) * 0.3 + 0.2  # biased: a mean error to correct
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        out = "y" if i == 2 else f"r{i}"
        nodes.append(helper.make_node("Relu", [f"c{i}"], [out], name=f"relu{i}"))
        x = out
    return tiny_model(nodes, inits, [("x", [1, 3, 8, 8])], ["y"])
