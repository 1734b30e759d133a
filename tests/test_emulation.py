"""NPU emulation at speed keeps the numbers: constant dequantization folded bit for bit, Q/DQ never fused
into integer kernels, and validation metrics unchanged against the unoptimized graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.core.emulation import fold_constant_dequantize
from pipeline.core.formats import Format
from pipeline.core.onnx_io import make_session

RNG = np.random.default_rng(0)


def _dq_model(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, *, axis: int | None = None,
              domain: str = "", opset: int = 17) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s")]
    inputs = ["q", "s"]
    if zero is not None:
        inits.append(numpy_helper.from_array(zero, "z"))
        inputs.append("z")
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node("DequantizeLinear", inputs, ["w"], domain=domain, **attrs)
    # The folded constant is read by an Identity so that it stays a tensor the graph computes with.
    graph = helper.make_graph([node, helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


@pytest.mark.parametrize("case", ["int8", "uint8-zp", "int8-per-axis", "int32-bias", "int16-contrib", "int4-per-axis"])
def test_folded_dequantization_is_bit_identical_to_onnxruntime(case):
    scale = np.float32(RNG.uniform(1e-4, 1e-1))
    if case == "int8":
        model = _dq_model(RNG.integers(-128, 128, (16, 8, 3, 3)).astype(np.int8), np.array(scale), np.array(0, np.int8))
    elif case == "uint8-zp":
        model = _dq_model(RNG.integers(0, 256, (64, 9)).astype(np.uint8), np.array(scale), np.array(131, np.uint8))
    elif case == "int8-per-axis":
        model = _dq_model(RNG.integers(-128, 128, (16, 8, 3, 3)).astype(np.int8),
                          RNG.uniform(1e-4, 1e-1, 16).astype(np.float32), np.zeros(16, np.int8), axis=0)
    elif case == "int32-bias":
        model = _dq_model(RNG.integers(-(2**31), 2**31 - 1, 32).astype(np.int32), np.array(scale * 1e-3), None)
    elif case == "int16-contrib":
        model = _dq_model(RNG.integers(-32768, 32768, (32, 32)).astype(np.int16), np.array(scale),
                          np.array(0, np.int16), domain="com.microsoft")
    else:  # int4 weights, per output channel, as A16W4 writes them
        q = helper.make_tensor("q", TensorProto.INT4, [8, 6], RNG.integers(-8, 8, 48).tolist())
        model = _dq_model(np.zeros(1, np.int8), RNG.uniform(1e-3, 1e-1, 8).astype(np.float32),
                          None, axis=0, domain="com.microsoft")
        model.graph.initializer[0].CopyFrom(q)
        model.graph.initializer.append(helper.make_tensor("z", TensorProto.INT4, [8], [0] * 8))
        model.graph.node[0].input.append("z")
    reference = make_session(model.SerializeToString(), optimize=False).run(None, {})[0]
    folded = fold_constant_dequantize(model)
    assert not any(n.op_type == "DequantizeLinear" for n in folded.graph.node)
    got = numpy_helper.to_array(next(t for t in folded.graph.initializer if t.name == "w"))
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), reference.view(np.uint32))


def _quantized_cnn(fmt: Format):
    """A small real CNN (conv, depthwise conv, residual add, ReLU6, linear) through the pipeline's quantizer."""
    import torch

    from pipeline.quant.qdq import quantize_qdq
    from pipeline.quant.statistics import collect_histograms
    from pipeline.targets import get_target

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pw = torch.nn.Conv2d(8, 8, 1)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x):
            y = torch.nn.functional.relu6(self.c1(x))
            y = y + self.pw(torch.nn.functional.relu6(self.dw(y)))
            return self.fc(y.mean(dim=(2, 3)))

    path = Path(pytest.importorskip("tempfile").mkdtemp()) / "net.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(1, 3, 16, 16),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))  # as prepare leaves it
    batches = [{"x": RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(24)]
    stats = collect_histograms(model, batches[:16], progress=False)
    target = get_target("cpu" if fmt in (Format.U8S8, Format.A16W4) else "xdna2")
    qmodel, _, _ = quantize_qdq(model, stats, target=target, fmt=fmt, method="minmax")
    return qmodel, batches[16:]


@pytest.mark.parametrize("fmt", ["xint8", "a8w8", "a16w8", "u8s8", "a16w4"])
def test_emulation_is_bit_identical_on_a_cnn_in_every_format(fmt):
    """Conv models: the fast session and the unoptimized graph agree bit for bit (no Q/DQ fused, no
    weight re-quantized), in every integer format including u8s8, which the fused kernels would change."""
    from pipeline.core.emulation import drop_redundant_activation_pairs

    qmodel, batches = _quantized_cnn(Format(fmt))
    # A ReLU6 reads its input through a pair on its own scale: dropped by the fast session (at least the
    # first one's: this graph skipped prepare, so its Clip bounds are Constant nodes the quantizer does not
    # read, and in XINT8 the second pair's power of two differs).
    nodes = len(qmodel.graph.node)
    assert len(drop_redundant_activation_pairs(onnx.ModelProto.FromString(qmodel.SerializeToString())).graph.node) <= nodes - 2
    reference = make_session(qmodel.SerializeToString(), optimize=False)
    fast = make_session(qmodel.SerializeToString(), npu_emulation=True)
    for batch in batches:
        want, got = reference.run(None, batch)[0], fast.run(None, batch)[0]
        assert np.array_equal(want, got), float(np.abs(want - got).max())


def test_emulation_leaves_validation_metrics_unchanged_on_a_transformer_block():
    """MatMul weights pre-packed by onnxruntime may sum in another order: metrics stay equal to print."""
    from pipeline.core.metrics import compare_outputs
    from pipeline.core.tasks import task_metrics
    from pipeline.quant.qdq import quantize_qdq
    from pipeline.quant.statistics import collect_histograms
    from pipeline.targets import get_target

    d = 32
    w1, w2 = RNG.standard_normal((d, 4 * d)).astype(np.float32) / 6, RNG.standard_normal((4 * d, d)).astype(np.float32) / 10
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["f"]), helper.make_node("Add", ["x", "f"], ["s"]),
        helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, d])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                               numpy_helper.from_array(np.ones(d, np.float32), "g"),
                               numpy_helper.from_array(np.zeros(d, np.float32), "b")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    batches = [{"x": RNG.standard_normal((1, 16, d)).astype(np.float32)} for _ in range(40)]
    stats = collect_histograms(model, batches[:20], progress=False)
    for fmt in (Format.A8W8, Format.A16W8):
        qmodel, _, _ = quantize_qdq(model, stats, target=get_target("xdna2"), fmt=fmt, method="minmax")
        float_session = make_session(model.SerializeToString())
        refs = np.concatenate([float_session.run(None, b)[0] for b in batches[20:]])
        metrics = []
        for session in (make_session(qmodel.SerializeToString(), optimize=False),
                        make_session(qmodel.SerializeToString(), npu_emulation=True)):
            got = np.concatenate([session.run(None, b)[0] for b in batches[20:]])
            metrics.append({**compare_outputs([refs], [got]), **task_metrics("embedding", refs, got, None)})
        slow, fast = metrics
        assert fast["sqnr_db"] == pytest.approx(slow["sqnr_db"], abs=1e-3)
        assert fast["cosine_mean"] == pytest.approx(slow["cosine_mean"], abs=1e-6)
        assert fast["nn_agreement"] == slow["nn_agreement"]


def _activation_between_pairs(act: str, dtype: int, scale: float, zero: int, bounds=None) -> onnx.ModelProto:
    """x -> Q -> DQ -> act -> Q -> DQ, both pairs on one scale and zero point (a fused activation's input)."""
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(zero, np_type), "z")]
    act_inputs = ["d1"]
    if bounds is not None:
        for name, value in zip(("lo", "hi"), bounds):
            inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
            act_inputs.append(name)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q1"]),
             helper.make_node("DequantizeLinear", ["q1", "s", "z"], ["d1"]),
             helper.make_node(act, act_inputs, ["a"]),
             helper.make_node("QuantizeLinear", ["a", "s", "z"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4096])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4096])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("case", [
    ("Relu", TensorProto.INT8, 0.0467, 0, None),
    ("Clip", TensorProto.INT8, 6.0 / 127, 0, (0.0, 6.0)),          # ReLU6 on its own grid's top
    ("Clip", TensorProto.INT8, 0.0236, 0, (-3.0, 3.0)),            # bias absorption shifts the bounds
    ("Clip", TensorProto.UINT8, 0.031, 131, (-0.77, 2.013)),       # bounds off the grid, asymmetric
    ("Clip", TensorProto.INT16, 1.7e-4, 0, (0.0, 6.0)),
])
def test_dropping_the_pair_before_a_fused_activation_is_exact(case):
    """X -> Q -> DQ -> act -> Q -> DQ equals X -> act -> Q -> DQ value for value, on inputs chosen to hurt:
    exact rounding midpoints, values next to them, the bounds themselves and beyond the grid."""
    from pipeline.core.emulation import drop_redundant_activation_pairs

    act, dtype, scale, zero, bounds = case
    model = _activation_between_pairs(act, dtype, scale, zero, bounds)
    s = np.float32(scale)
    steps = np.arange(-300, 300, dtype=np.float32)
    midpoints = (steps + np.float32(0.5)) * s
    x = np.concatenate([midpoints, np.nextafter(midpoints, np.float32(np.inf)), np.nextafter(midpoints, np.float32(-np.inf)),
                        steps * s, np.array([b for b in (bounds or ()) for b in (b, np.nextafter(np.float32(b), np.float32(9)))], np.float32),
                        np.float32(400) * s * RNG.standard_normal(4096).astype(np.float32)])[:4096].astype(np.float32)
    reference = make_session(model.SerializeToString(), optimize=False).run(None, {"x": x})[0]
    dropped = drop_redundant_activation_pairs(onnx.ModelProto.FromString(model.SerializeToString()))
    assert [n.op_type for n in dropped.graph.node] == [act, "QuantizeLinear", "DequantizeLinear"]
    got = make_session(dropped.SerializeToString(), optimize=False).run(None, {"x": x})[0]
    assert np.array_equal(reference.view(np.uint32), got.view(np.uint32))


def test_pairs_that_differ_or_are_read_elsewhere_are_kept():
    from pipeline.core.emulation import drop_redundant_activation_pairs

    other_scale = _activation_between_pairs("Relu", TensorProto.INT8, 0.05, 0)
    other_scale.graph.initializer.append(numpy_helper.from_array(np.array(0.1, np.float32), "s2"))
    other_scale.graph.node[3].input[1] = "s2"
    exposed = _activation_between_pairs("Relu", TensorProto.INT8, 0.05, 0)
    exposed.graph.output.append(helper.make_tensor_value_info("d1", TensorProto.FLOAT, [4096]))
    for model in (other_scale, exposed):
        assert len(drop_redundant_activation_pairs(model).graph.node) == 5


def _one_dq_padded(tags: str, *, dq_is_output: bool) -> onnx.ModelProto:
    """x -> Q -> DQ1 -> a Pad per tag (value on the grid) -> Q -> DQ -> Relu -> y_tag (DQ1 also an output)."""
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(np.array([1, 1], np.int64), "pads"),
             numpy_helper.from_array(np.array(-0.35, np.float32), "v")]  # -7 steps
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d1"])]
    outputs = []
    for tag in tags:
        nodes += [helper.make_node("Pad", ["d1", "pads", "v"], [f"p_{tag}"]),
                  helper.make_node("QuantizeLinear", [f"p_{tag}", "s", "z"], [f"q_{tag}"]),
                  helper.make_node("DequantizeLinear", [f"q_{tag}", "s", "z"], [f"d_{tag}"]),
                  helper.make_node("Relu", [f"d_{tag}"], [f"y_{tag}"])]
        outputs.append(helper.make_tensor_value_info(f"y_{tag}", TensorProto.FLOAT, [66]))
    if dq_is_output:
        outputs.append(helper.make_tensor_value_info("d1", TensorProto.FLOAT, [64]))
    graph = helper.make_graph(nodes, "pads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("tags, dq_is_output", [("ab", False), ("ab", True), ("a", True)])
def test_pads_on_the_grid_pad_the_integers_and_their_dequantization_goes_only_when_unread(tags, dq_is_output):
    """Pads reading one DQ all move to the integers and the DQ goes, unless it is a graph output; the
    values are the unoptimized graph's, bit for bit."""
    from pipeline.core.emulation import drop_redundant_activation_pairs

    model = _one_dq_padded(tags, dq_is_output=dq_is_output)
    x = (RNG.standard_normal(64) * 3).astype(np.float32)
    reference = make_session(model.SerializeToString(), optimize=False).run(None, {"x": x})
    moved = drop_redundant_activation_pairs(onnx.ModelProto.FromString(model.SerializeToString()))
    assert all(n.input[0] == "q" for n in moved.graph.node if n.op_type == "Pad")
    assert any(n.output[0] == "d1" for n in moved.graph.node) == dq_is_output
    got = make_session(moved.SerializeToString(), optimize=False).run(None, {"x": x})
    for r, g in zip(reference, got):
        assert np.array_equal(r.view(np.uint32), g.view(np.uint32))


def _rearranged_between_pairs(dtype: int, scale: float, zero: int, *, other_grid: bool = False,
                              exposed: bool = False, domain: str = "") -> onnx.ModelProto:
    """An attention head's plumbing between Q/DQ pairs on one grid: x -> Q/DQ -> Reshape -> Q/DQ -> Transpose
    -> Q/DQ -> Slice -> Q/DQ, concatenated with a second path on the same grid -> Q/DQ -> MaxPool -> Q/DQ
    -> MatMul (a reader that computes). `other_grid`: the Transpose's pair has another scale; `exposed`: the
    Reshape's pair's DQ is a graph output."""
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(zero, np_type), "z"),
             numpy_helper.from_array(np.array(scale * 1.5, np.float32), "s_other"),
             numpy_helper.from_array(np.array([1, 4, 8, 16], np.int64), "shape"),
             numpy_helper.from_array(np.array([0], np.int64), "start"), numpy_helper.from_array(np.array([12], np.int64), "end"),
             numpy_helper.from_array(np.array([3], np.int64), "axis"),
             numpy_helper.from_array(RNG.standard_normal((24, 5)).astype(np.float32), "w")]
    nodes = []

    def pair(source: str, tag: str, s: str = "s") -> str:
        nodes.extend([helper.make_node("QuantizeLinear", [source, s, "z"], [f"q_{tag}"], domain=domain),
                      helper.make_node("DequantizeLinear", [f"q_{tag}", s, "z"], [f"d_{tag}"], domain=domain)])
        return f"d_{tag}"

    x = pair("x", "in")
    nodes.append(helper.make_node("Reshape", [x, "shape"], ["r"]))
    r = pair("r", "reshape")
    nodes.append(helper.make_node("Transpose", [r], ["t"], perm=[0, 2, 1, 3]))
    t = pair("t", "transpose", "s_other" if other_grid else "s")
    nodes.append(helper.make_node("Slice", [t, "start", "end", "axis"], ["sl"]))
    sl = pair("sl", "slice")
    y = pair("y", "second")
    nodes.append(helper.make_node("Concat", [sl, y], ["c"], axis=3))
    c = pair("c", "concat")
    nodes.append(helper.make_node("MaxPool", [c], ["m"], kernel_shape=[1, 2], strides=[1, 1], pads=[0, 0, 0, 1]))
    m = pair("m", "maxpool")
    nodes.append(helper.make_node("MatMul", [m, "w"], ["out"]))
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 4, 5])]
    if exposed:
        outputs.append(helper.make_tensor_value_info(r, TensorProto.FLOAT, [1, 4, 8, 16]))
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 16]),
                                              helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 12])],
                              outputs, inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize("case", [
    (TensorProto.INT8, 0.043, 0, ""), (TensorProto.UINT8, 0.021, 117, ""), (TensorProto.INT16, 1.9e-4, 0, "com.microsoft"),
])
def test_pairs_after_ops_that_only_move_values_go_and_the_values_are_bit_identical(case):
    """A Q/DQ pair whose input is already on its grid (dequantized, then only moved: Reshape, Transpose,
    Slice, Concat of two paths on that grid, MaxPool) changes no value: every such pair goes, chains
    included, and the outputs are the unoptimized graph's bit for bit. Inputs hit rounding midpoints."""
    from pipeline.core.emulation import drop_redundant_activation_pairs

    dtype, scale, zero, domain = case
    model = _rearranged_between_pairs(dtype, scale, zero, domain=domain)
    s = np.float32(scale)
    feeds = {"x": ((RNG.integers(-200, 200, (1, 8, 4, 16)) + np.float32(0.5)) * s).astype(np.float32),
             "y": (RNG.standard_normal((1, 8, 4, 12)) * 90 * s).astype(np.float32)}
    reference = make_session(model.SerializeToString(), optimize=False).run(None, feeds)[0]
    dropped = drop_redundant_activation_pairs(onnx.ModelProto.FromString(model.SerializeToString()))
    onnx.checker.check_model(dropped)
    # Only the two pairs on the inputs stay: every other value was already on the grid.
    assert [n.output[0] for n in dropped.graph.node if n.op_type == "QuantizeLinear"] == ["q_in", "q_second"]
    got = make_session(dropped.SerializeToString(), optimize=False).run(None, feeds)[0]
    assert np.array_equal(reference.view(np.uint32), got.view(np.uint32))
    fast = make_session(model.SerializeToString(), npu_emulation=True).run(None, feeds)[0]
    assert np.allclose(fast, reference, rtol=1e-5, atol=1e-6)  # MatMul pre-packing may reorder its sums


def test_pairs_on_another_grid_or_exposed_stay():
    from pipeline.core.emulation import drop_redundant_activation_pairs

    # The Transpose's pair has another scale: it stays, and so does the Slice's after it (its input is on
    # the other grid now); the Reshape's, exposed as an output, stays too.
    other = drop_redundant_activation_pairs(_rearranged_between_pairs(TensorProto.INT8, 0.043, 0, other_grid=True))
    assert {"q_transpose", "q_slice"} <= {n.output[0] for n in other.graph.node}
    exposed = drop_redundant_activation_pairs(_rearranged_between_pairs(TensorProto.INT8, 0.043, 0, exposed=True))
    assert "q_reshape" in {n.output[0] for n in exposed.graph.node}
    assert "q_transpose" not in {n.output[0] for n in exposed.graph.node}


def test_a_model_cut_to_an_early_value_runs_only_the_nodes_it_needs():
    """`expose_outputs(replace=True)` keeps only what the exposed values depend on (onnxruntime would run
    every node otherwise), with the same values, the graph inputs kept, and names an If branch reads from
    the enclosing graph counted as read."""
    from pipeline.core.onnx_io import expose_outputs, subgraph_reads
    from tests.graph_builders import conv_relu_chain

    model = conv_relu_chain()
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    cut = expose_outputs(model, ["r0"], replace=True)
    assert [n.name for n in cut.graph.node] == ["conv0", "relu0"]
    assert {t.name for t in cut.graph.initializer} == {"w0", "b0"}
    assert [i.name for i in cut.graph.input] == ["x"]
    exposed_all = make_session(expose_outputs(model, ["r0"]).SerializeToString(), optimize=False)
    want = exposed_all.run(["r0"], x)[0]
    got = make_session(cut.SerializeToString(), optimize=False).run(None, x)[0]
    np.testing.assert_array_equal(got, want)

    # An If whose branches read an outer value ("r1") keeps that value's producers.
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("Identity", ["r1"], [f"{name}_out"])], name, [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])
    model.graph.input.append(cond)
    model.graph.node.append(helper.make_node("If", ["c"], ["picked"], then_branch=branch("t"), else_branch=branch("e")))
    cut = expose_outputs(model, ["picked"], replace=True)
    assert [n.name for n in cut.graph.node] == ["conv0", "relu0", "conv1", "relu1", model.graph.node[-1].name]
    assert subgraph_reads(model.graph.node[-1]) == {"r1"}  # not the branches' own outputs
