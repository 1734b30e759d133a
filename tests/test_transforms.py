"""Float-graph transforms (`pipeline.transforms`): each keeps the float function and does what it claims.

Graphs are built inline with onnx.helper; sessions are real onnxruntime ones.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from pipeline.core.editable import Editable
from pipeline.quant.statistics import StatisticsService
from pipeline.quant.transforms import TransformContext, apply_transforms, make_transforms, transform_registry
from pipeline.quant.transforms.bias_correction import BiasCorrection, dequantized_weights
from pipeline.quant.transforms.equalize import CrossLayerEqualization
from pipeline.quant.transforms.fold import NotFoldable, plan_fold
from pipeline.quant.transforms.smoothquant import SmoothQuant


def _apply(model, *steps, batches=None, samples=128, quantize=None):
    """apply_transforms with steps given as names or (name, settings) pairs."""
    steps = [(s, {}) if isinstance(s, str) else s for s in steps]
    return apply_transforms(model, make_transforms(steps), TransformContext(batches, samples, quantize))


def collect_channel_stats(model, tensors, batches, *, limit):
    service = StatisticsService(model, optimize=False)
    service.request_channels(tensors)
    return service.collect(batches, limit=limit).channels

from .graph_builders import run_unoptimized as _run
from .graph_builders import tiny_model as _model

RNG = np.random.default_rng(0)


def _cnn():
    """Conv -> Relu -> MaxPool -> Conv -> Relu -> Flatten -> Gemm, with badly balanced conv1 channels."""
    w1 = RNG.standard_normal((4, 2, 3, 3)) * np.array([10.0, 0.1, 1.0, 0.01])[:, None, None, None]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    inits = {"w1": w1, "b1": RNG.standard_normal(4), "w2": RNG.standard_normal((3, 4, 3, 3)),
             "b2": RNG.standard_normal(3), "wf": RNG.standard_normal((5, 48)), "bf": RNG.standard_normal(5)}
    return _model(nodes, inits, [("x", [1, 2, 8, 8])], ["y"])


def _attention_like():
    """x -> MatMul+Add (value) -> Reshape -> Transpose -> P @ V -> Transpose -> Reshape -> MatMul (dense),
    and a GELU-like branch: MatMul -> Tanh -> Mul(0.5 scalar) -> Reshape -> Gemm."""
    d, t, h = 8, 4, 2
    nodes = [
        helper.make_node("MatMul", ["x", "wv"], ["v0"]),
        helper.make_node("Add", ["bv", "v0"], ["v1"]),
        helper.make_node("Reshape", ["v1", "s4"], ["v2"]),
        helper.make_node("Transpose", ["v2"], ["v3"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["p", "v3"], ["c0"]),
        helper.make_node("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["c1", "s3"], ["c2"]),
        helper.make_node("MatMul", ["c2", "wo"], ["y1"]),
        helper.make_node("MatMul", ["x", "wu"], ["u0"]),
        helper.make_node("Tanh", ["u0"], ["u1"]),
        helper.make_node("Mul", ["u1", "half"], ["u2"]),
        helper.make_node("Reshape", ["u2", "s2"], ["u3"]),
        helper.make_node("Gemm", ["u3", "wd", "bd"], ["y2"]),
    ]
    wv = RNG.standard_normal((d, d))
    wv[:, 3] *= 30.0  # an outlier channel of the value path
    wd = RNG.standard_normal((2 * d, d)) * 0.05
    wd[5, 2] = 6.0  # a lone huge weight, as in MiniLM's FFN down projections
    inits = {
        "wv": wv, "bv": RNG.standard_normal(d), "wo": RNG.standard_normal((d, d)),
        "wu": RNG.standard_normal((d, 2 * d)), "half": np.array(0.5), "wd": wd, "bd": RNG.standard_normal(d),
        "s4": np.array([1, t, h, d // h]), "s3": np.array([1, t, d]), "s2": np.array([t, 2 * d]),
    }
    model = _model(nodes, {k: v for k, v in inits.items() if not k.startswith("s")}, [("x", [1, t, d]),
                   ("p", [1, h, t, t])], ["y1", "y2"])
    for k in ("s4", "s3", "s2"):
        model.graph.initializer.append(numpy_helper.from_array(inits[k].astype(np.int64), k))
    return onnx.shape_inference.infer_shapes(model)


def _feeds_attention(n=4):
    out = []
    for _ in range(n):
        p = RNG.random((1, 2, 4, 4)).astype(np.float32)
        out.append({"x": RNG.standard_normal((1, 4, 8)).astype(np.float32), "p": p / p.sum(-1, keepdims=True)})
    return out


def test_fold_plan_traces_attention_value_path_and_mul_site():
    graph = Editable(_attention_like())
    plan = plan_fold(graph, "c2")
    assert plan.site.op_type == "MatMul" and plan.site.input[1] == "wv"
    assert plan.path == ["c2", "c1", "c0", "v3", "v2", "v1", "v0"]
    assert sorted(plan.site_map.tolist()) == list(range(8))
    gelu = plan_fold(graph, "u3")
    assert gelu.site.op_type == "Mul" and gelu.path == ["u3", "u2"]


def test_fold_refuses_a_tensor_shared_with_a_residual_add():
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "w"], ["m"]),
        helper.make_node("Add", ["m", "n"], ["y"]),
    ]
    model = _model(nodes, {"g": np.ones(4), "b": np.zeros(4), "w": np.eye(4)}, [("x", [1, 3, 4])], ["y"])
    with pytest.raises(NotFoldable, match="Add"):
        plan_fold(Editable(model), "n")


def test_smoothquant_keeps_the_float_function_and_balances_ranges():
    model = _attention_like()
    feeds = _feeds_attention()
    result = _apply(model, ("smoothquant", {"alpha": 0.5}), batches=lambda: iter(feeds), samples=4)
    for f in feeds:
        for want, got in zip(_run(model, f), _run(result.model, f)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    applied = {e["tensor"]: e for e in result.report["smoothquant"]["applied"]}
    assert set(applied) == {"c2", "u3"}
    # The lone 6.0 weight is divided down; the smoothed activation's outlier channel comes down too.
    assert applied["u3"]["weight_range_after"] < applied["u3"]["weight_range_before"]
    assert applied["c2"]["act_range_after"] < applied["c2"]["act_range_before"]
    assert {"c2", "c1", "c0", "v3", "v2", "v1", "v0", "u3", "u2"} <= result.stale
    skipped = {e["tensor"] for e in result.report["smoothquant"]["skipped"]}
    assert "x" in skipped  # a graph input: nothing upstream to fold into


def test_smoothquant_alpha_balances_each_channel_exactly():
    """alpha = 0.5: per channel, max|X'_j| == max|W'_j| (both sqrt(max|X_j| max|W_j|)), where the scale folds
    into a weight (c2: into the value projection's columns)."""
    model = _attention_like()
    feeds = _feeds_attention()
    result = _apply(model, ("smoothquant", {"alpha": 0.5}), batches=lambda: iter(feeds), samples=4)
    graph = Editable(result.model)
    stats = collect_channel_stats(result.model, {"c2": (3, 2)}, iter(feeds), limit=4)
    dense = next(n for n in result.model.graph.node if n.op_type == "MatMul" and n.input[0] == "c2")
    w, axis = graph.weight(dense)
    np.testing.assert_allclose(stats["c2"].absmax, np.abs(w).max(axis=1 - axis), rtol=1e-4)


def test_smoothquant_into_a_mul_puts_its_constant_on_the_int8_grid():
    """u3 folds into Mul(0.5): the new per-channel constant 0.5 / s is quantized per tensor like an
    activation, so s is snapped to make it a multiple of max / 127 exactly; balance holds to that grid."""
    model = _attention_like()
    feeds = _feeds_attention()
    result = _apply(model, ("smoothquant", {"alpha": 0.5}), batches=lambda: iter(feeds), samples=4)
    for f in feeds:
        for want, got in zip(_run(model, f), _run(result.model, f)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    graph = Editable(result.model)
    mul = next(n for n in result.model.graph.node if n.op_type == "Mul")
    c = graph.const(mul.input[1]).ravel().astype(np.float64)
    steps = c / (np.abs(c).max() / 127)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    stats = collect_channel_stats(result.model, {"u3": (2, 1)}, iter(feeds), limit=4)
    gemm = next(n for n in result.model.graph.node if n.op_type == "Gemm")
    w, axis = graph.weight(gemm)
    ratio = stats["u3"].absmax / np.abs(w).max(axis=1 - axis)  # 1 before snapping; within a grid step after
    assert np.all(np.abs(np.log(ratio)) < np.log(2.0)) and np.median(np.abs(ratio - 1)) < 0.1


def test_cross_layer_equalization_keeps_the_function_and_equalizes():
    model = _cnn()
    x = RNG.standard_normal((1, 2, 8, 8)).astype(np.float32)
    result = _apply(model, "cross_layer_equalization")
    np.testing.assert_allclose(_run(result.model, {"x": x})[0], _run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)
    (entry,) = result.report["cross_layer_equalization"]["applied"]
    assert entry["pair"][0].startswith("") and entry["worst_channel_share_before"][0] < 0.01
    before, after = entry["worst_channel_share_before"], entry["worst_channel_share_after"]
    assert after[0] > 10 * before[0]
    # After equalization both sides of each channel have the same range: r1 == r2.
    graph = Editable(result.model)
    w1, w2 = graph.const(graph.model.graph.node[0].input[1]), graph.const(graph.model.graph.node[3].input[1])
    np.testing.assert_allclose(np.abs(w1).reshape(4, -1).max(1), np.abs(w2).transpose(1, 0, 2, 3).reshape(4, -1).max(1),
                               rtol=1e-3)
    assert {"c1", "r1", "p1"} <= result.stale and "c2" not in result.stale
    # conv2 -> gemm goes through Flatten, which mixes channels with positions: refused, with the reason.
    assert any("mixed" in s["reason"] for s in result.report["cross_layer_equalization"]["skipped"])


def test_channel_stats_match_numpy_at_opsets_17_and_18():
    for opset in (17, 18):
        model = _model([helper.make_node("Relu", ["x"], ["y"])], {}, [("x", [2, 3, 4])], ["y"], opset=opset)
        batches = [{"x": RNG.standard_normal((2, 3, 4)).astype(np.float32)} for _ in range(5)]
        stats = collect_channel_stats(model, {"y": (3, 1)}, iter(batches), limit=3)["y"]
        ys = np.stack([np.maximum(b["x"], 0) for b in batches[:3]])
        np.testing.assert_allclose(stats.absmax, ys.max(axis=(0, 1, 3)), rtol=1e-6)
        np.testing.assert_allclose(stats.mean, ys.mean(axis=(0, 1, 3)), rtol=1e-5)
        assert stats.samples == 3


def _fake_quantize(model):
    """A 'quantizer' that rounds every weight to a coarse grid (a QDQ model with int8 weight DQs)."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    nodes = []
    for node in g.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            scale = np.float32(np.abs(w).max() / 7)  # 4-bit-like: a large, systematic error
            name = node.input[1]
            g.initializer.extend([
                numpy_helper.from_array(np.round(w / scale).astype(np.int8), f"{name}_q"),
                numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
                numpy_helper.from_array(np.array(0, np.int8), f"{name}_z"),
            ])
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"]))
            node.input[1] = f"{name}_dq"
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    return out


def test_dequantized_weights_reads_back_the_quantizers_weights():
    model = _cnn()
    fake = _fake_quantize(model)
    found = dequantized_weights(fake)
    w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1"))
    scale = np.abs(w1).max() / 7
    assert sorted(found) == ["n0", "n3", "n6"]
    np.testing.assert_allclose(found["n0"], np.round(w1 / np.float32(scale)) * np.float32(scale), rtol=1e-6)


def test_bias_correction_removes_the_mean_output_shift():
    model = _cnn()
    batches = [{"x": (RNG.standard_normal((1, 2, 8, 8)) + 1.0).astype(np.float32)} for _ in range(16)]
    result = _apply(model, "bias_correction", batches=lambda: iter(batches), samples=16,
                              quantize=_fake_quantize)
    assert [e["node"] for e in result.report["bias_correction"]["applied"]] == ["n0", "n3", "n6"]
    assert "y" in result.stale and "c1" in result.stale
    # A Conv without padding (the correction ignores zero padding): with the quantized weights, the
    # corrected model's mean output per channel matches the float one's; uncorrected, it is far off.
    w = RNG.standard_normal((4, 2, 3, 3)) * np.array([3.0, 0.3, 1.0, 2.0])[:, None, None, None]
    conv = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"])], {"w": w, "b": np.zeros(4)},
                  [("x", [1, 2, 8, 8])], ["y"])
    fixed_model = _apply(conv, "bias_correction", batches=lambda: iter(batches), samples=16,
                                   quantize=_fake_quantize).model
    mean = lambda m: np.mean([_run(m, b)[0].mean(axis=(0, 2, 3)) for b in batches], axis=0)  # noqa: E731
    ref, plain, fixed = mean(conv), mean(_fake_quantize(conv)), mean(_fake_quantize(fixed_model))
    assert np.abs(plain - ref).max() > 0.05
    assert np.abs(fixed - ref).max() < 0.05 * np.abs(plain - ref).max()


def test_no_transform_is_a_copy():
    model = _cnn()
    result = _apply(model)
    assert not result.changed and not result.stale
    assert result.model.SerializeToString() == model.SerializeToString()


def test_transforms_need_data_and_a_quantizer():
    with pytest.raises(ValueError, match="batches"):
        _apply(_attention_like(), ("smoothquant", {"alpha": 0.5}))
    with pytest.raises(ValueError, match="quantizer"):
        _apply(_cnn(), "bias_correction", batches=lambda: iter([{"x": np.zeros((1, 2, 8, 8), np.float32)}]))


def test_plan_apply_rejects_bad_scales():
    graph = Editable(_attention_like())
    plan = plan_fold(graph, "c2")
    with pytest.raises(ValueError):
        plan.apply(graph, np.zeros(8), "x")
    with pytest.raises(ValueError):
        plan.apply(graph, np.ones(3), "x")


def test_transforms_are_registered_with_their_settings():
    registry = transform_registry()
    assert {"cross_layer_equalization", "smoothquant", "bias_correction"} <= set(registry)
    assert SmoothQuant(SmoothQuant.Config(alpha=0.3)).alpha == 0.3
    assert CrossLayerEqualization().config.sweeps > 0
    assert BiasCorrection().ops
    with pytest.raises(Exception, match="alpha"):
        make_transforms([("smoothquant", {"alpha": 2.0})])


def test_accuracy_study_script_prints_both_tables(tiny_cnn_recipe, tmp_path, capsys):
    """scripts/accuracy_study.py (the calibration-method and transform comparison) on the tiny CNN."""
    import importlib.util

    from .conftest import ROOT

    spec = importlib.util.spec_from_file_location("accuracy_study", ROOT / "scripts" / "accuracy_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    assert study.main([str(tiny_cnn_recipe()), "--formats", "a8w8", "--transforms", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for method in ("minmax", "percentile", "entropy", "mse", "auto"):
        assert f"| a8w8 | {method} |" in out
    assert "| cross-layer equalization |" in out and "| bias correction |" in out
