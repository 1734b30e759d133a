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
