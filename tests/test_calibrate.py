"""The instrumented calibration graph: exact extremes, even subsample, flat memory, aliases."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.errors import DataError
from pipeline.core.onnx_io import make_session
from pipeline.quant.statistics import SAMPLE_SIZE, activation_tensors, permuted_aliases
from pipeline.quant.statistics import collect_histograms as collect_statistics
from pipeline.quant.statistics import instrument_histograms as instrument


def _model(opset: int):
    """x[1,8,64,32] -> Mul(w) -> Relu -> Transpose -> Reshape -> y."""
    w = numpy_helper.from_array(np.full((1, 8, 1, 1), 2.0, np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["scaled"], name="mul"),
        helper.make_node("Relu", ["scaled"], ["act"], name="relu"),
        helper.make_node("Transpose", ["act"], ["perm"], name="transpose", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["perm", "shape"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 64, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16384])], [w, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("opset", [17, 18])
def test_instrumented_graph_returns_exact_extremes_and_a_bounded_sample(opset):
    model = _model(opset)
    tensors = activation_tensors(model)
    assert set(tensors) == {"x", "scaled", "act", "perm", "y"}
    session = make_session(instrument(model, tensors).SerializeToString())
    x = np.random.default_rng(0).standard_normal((1, 8, 64, 32)).astype(np.float32)
    results = session.run(None, {"x": x})
    lo, hi, sample = results[3:6]  # "scaled" = 2x
    assert float(lo) == pytest.approx(2 * x.min()) and float(hi) == pytest.approx(2 * x.max())
    assert 0 < sample.size <= SAMPLE_SIZE
    assert set(np.round(sample / 2, 5)) <= set(np.round(x.ravel(), 5))


def test_permuting_ops_alias_their_source_and_stats_match():
    model = _model(17)
    tensors = activation_tensors(model)
    assert permuted_aliases(model, tensors) == {"perm": "act", "y": "act"}
    rng = np.random.default_rng(1)
    data = [{"x": rng.standard_normal((1, 8, 64, 32)).astype(np.float32)} for _ in range(11)]
    collector = collect_statistics(model, data, progress=False)
    # 'scaled' only feeds the Relu: quantization gives it the Relu's range, so it is not measured.
    assert set(collector.names) == set(tensors) - {"scaled"}
    assert collector["y"].max == collector["act"].max == pytest.approx(2 * max(d["x"].max() for d in data))
    assert collector["act"].min == 0.0


def test_activation_overflow_names_the_tensor():
    model = _model(17)
    data = [{"x": np.full((1, 8, 64, 32), 3e38, np.float32)}]
    with pytest.raises(DataError, match="activation 'act' is NaN/inf"):  # Relu(scaled): the first measured
        collect_statistics(model, data, progress=False)
