"""Per-tensor int8 CNN quantization: equalization through ReLU6 and depthwise layers inside a residual
block, bias absorption, AdaRound, MSE weight ranges, presets by model family.

Tiny graphs built inline; real onnxruntime sessions; the quantizer is the pipeline's own.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.core.formats import Format
from pipeline.quant.adaround import AdaRoundSettings, adaround
from pipeline.quant.presets import choose_preset, model_family
from pipeline.quant.qdq import quantize_qdq
from pipeline.quant.statistics import collect_histograms
from pipeline.quant.transforms import TransformContext, apply_transforms, make_transforms
from pipeline.quant.transforms.layers import WeightLayer
from pipeline.quant.weight_ranges import rounding_error, weight_scale
from pipeline.targets import get_target

from .graph_builders import conv_relu_chain
from .graph_builders import run_unoptimized as _run
from .graph_builders import tiny_model as _model

RNG = np.random.default_rng(0)


def _batches(n, shape, seed=1, scale=1.0):
    rng = np.random.default_rng(seed)
    data = [{"x": (rng.standard_normal(shape) * scale).astype(np.float32)} for _ in range(n)]
    return lambda: iter(data)


def _residual_block():
    """conv0 -> [expand 1x1 -> ReLU6 -> depthwise 3x3 -> ReLU6 -> project 1x1] + conv0 (residual Add).

    The expand and depthwise channels are badly balanced, and expand channel 0 is pushed into ReLU6's
    saturation (large bias), so one channel must keep its scale."""
    c, e = 4, 8
    w0 = RNG.standard_normal((c, 3, 1, 1)) * 0.5
    we = RNG.standard_normal((e, c, 1, 1)) * np.array([4.0, 0.05, 1, 2, 0.1, 1, 3, 0.2])[:, None, None, None]
    be = np.array([8.0, 0, 0.1, 0, 0, 0.2, 0, 0])
    wd = RNG.standard_normal((e, 1, 3, 3)) * np.array([0.05, 3, 1, 0.1, 2, 1, 0.5, 4])[:, None, None, None]
    wp = RNG.standard_normal((c, e, 1, 1)) * 0.3
    inits = {"w0": w0, "b0": np.zeros(c), "we": we, "be": be, "wd": wd, "bd": RNG.standard_normal(e) * 0.1,
             "wp": wp, "bp": np.zeros(c), "lo": np.array(0.0), "hi": np.array(6.0)}
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["t"], name="conv0"),
        helper.make_node("Conv", ["t", "we", "be"], ["ce"], name="expand"),
        helper.make_node("Clip", ["ce", "lo", "hi"], ["re"], name="relu6_e"),
        helper.make_node("Conv", ["re", "wd", "bd"], ["cd"], name="depthwise", group=e, pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["cd", "lo", "hi"], ["rd"], name="relu6_d"),
        helper.make_node("Conv", ["rd", "wp", "bp"], ["cp"], name="project"),
        helper.make_node("Add", ["t", "cp"], ["y"], name="residual"),
    ]
    return _model(nodes, inits, [("x", [1, 3, 6, 6])], ["y"])


def test_cle_equalizes_through_relu6_and_depthwise_inside_a_residual_block():
    model = _residual_block()
    batches = _batches(32, (1, 3, 6, 6))
    result = apply_transforms(model, make_transforms([("cross_layer_equalization", {})]), TransformContext(batches, 32))
    report = result.report["cross_layer_equalization"]
    pairs = {tuple(a["pair"]) for a in report["applied"]}
    assert pairs == {("expand", "depthwise"), ("depthwise", "project")}
    assert all(a["through"] == ["Clip"] for a in report["applied"])
    # The residual's tensor 't' is read by the Add too: never rescaled.
    assert any(s["tensor"] == "t" and "also read" in s["reason"] for s in report["skipped"])
    # Expand channel 0 sits in ReLU6's saturation on the calibration data: held at s = 1.
    expand = next(a for a in report["applied"] if a["pair"][0] == "expand")
    assert expand["channels_held_by_clip"] >= 1
    before = [WeightLayer(None, numpy_helper.to_array(t).astype(np.float64), False, 8)
              for t in model.graph.initializer if t.name == "wd"][0]
    after_wd = next(numpy_helper.to_array(t) for t in result.model.graph.initializer
                    if t.name == next(n for n in result.model.graph.node if n.name == "depthwise").input[1])
    spread = lambda r: r.max() / r[r > 0].min()  # noqa: E731
    assert spread(WeightLayer(None, after_wd.astype(np.float64), False, 8).output_ranges()) < spread(before.output_ranges())
    # Float function kept: exactly on the calibration data (tolerance: float32 rounding, 1e-5 relative).
    for batch in batches():
        ref, got = _run(model, batch)[0], _run(result.model, batch)[0]
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6
    assert report["float_output_sqnr_db"] is None or report["float_output_sqnr_db"] > 100


def test_cle_as_relu_changes_the_clip_and_skip_leaves_clip_pairs_alone():
    model = _residual_block()
    batches = _batches(8, (1, 3, 6, 6))
    relu = apply_transforms(model, make_transforms([("cross_layer_equalization", {"clip": "as_relu"})]),
                            TransformContext(batches, 8))
    assert {n.name for n in relu.model.graph.node if n.op_type == "Relu"} == {"relu6_e", "relu6_d"}
    skip = apply_transforms(model, make_transforms([("cross_layer_equalization", {"clip": "skip"})]),
                            TransformContext(batches, 8))
    assert not skip.report["cross_layer_equalization"]["applied"]


def test_weight_layer_channel_maps_match_index_arithmetic():
    w = RNG.standard_normal((4, 3, 2, 2))  # Conv, 2 groups: output o reads inputs (o // 2) * 3 + j
    conv = WeightLayer(None, w, False, 2)
    s_in, s_out = RNG.uniform(0.5, 2, 6), RNG.uniform(0.5, 2, 4)
    np.testing.assert_allclose(conv.scaled_inputs(s_in), w * s_in[conv.inputs][..., None, None])
    np.testing.assert_allclose(conv.scaled_outputs(s_out), w * s_out[conv.outputs][..., None, None])
    ref = np.zeros(6)
    np.maximum.at(ref, conv.inputs.ravel(), np.abs(w).max(axis=(2, 3)).ravel())
    np.testing.assert_allclose(conv.input_ranges(), ref)
    deconv = WeightLayer(None, w, True, 2)  # ConvTranspose [Cin=4, Cout/g=3]: input a feeds (a // 2) * 3 + j
    assert deconv.n_in == 4 and deconv.n_out == 6
    np.testing.assert_allclose(deconv.scaled_outputs(s_in), w * s_in[deconv.outputs][..., None, None])


def test_bias_absorption_centres_relu6_outputs_and_keeps_the_function():
    model = _residual_block()
    batches = _batches(16, (1, 3, 6, 6))
    result = apply_transforms(model, make_transforms([("bias_absorption", {})]), TransformContext(batches, 16))
    report = result.report["bias_absorption"]
    assert [a["activation"] for a in report["applied"]] == ["relu6_d"]  # its consumer is a 1x1 conv
    assert any(s["activation"] == "relu6_e" and "pads" in s["reason"] for s in report["skipped"])
    lo, hi = report["applied"][0]["range_after"]
    assert lo == pytest.approx(-hi)  # centred on 0: the whole int8 range is used
    for batch in batches():
        ref, got = _run(model, batch)[0], _run(result.model, batch)[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def _quantized(model, batches, fmt="a8w8"):
    hist = collect_histograms(model, batches(), progress=False)
    return quantize_qdq(model, hist, target=get_target("xdna2"), fmt=Format(fmt), method="minmax")[0]


def _layer_error(model, qmodel, batches, output="y"):
    err = sig = 0.0
    for batch in batches():
        ref, got = _run(model, batch)[0], _run(qmodel, batch)[0]
        err += float(((got - ref) ** 2).sum())
        sig += float((ref**2).sum())
    return err / sig


@pytest.mark.parametrize("kind", ["grouped-conv", "linear"])
def test_adaround_beats_round_to_nearest(kind):
    if kind == "grouped-conv":
        w = RNG.standard_normal((8, 2, 3, 3)) * 0.4
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], group=2, pads=[1, 1, 1, 1], name="layer")]
        model = _model(nodes, {"w": w, "b": RNG.standard_normal(8) * 0.1}, [("x", [1, 4, 8, 8])], ["y"])
        shape = (1, 4, 8, 8)
    else:
        w = RNG.standard_normal((32, 16)) * 0.3
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")]
        model = _model(nodes, {"w": w}, [("x", [1, 6, 32])], ["y"])
        shape = (1, 6, 32)
    # Correlated inputs (a shared component), as real activations are: rounding errors then add up.
    rng = np.random.default_rng(3)
    data = []
    for _ in range(32):
        x = rng.standard_normal(shape) * 0.3 + rng.standard_normal() + 1.0
        data.append({"x": x.astype(np.float32)})
    batches = lambda: iter(data)  # noqa: E731
    nearest = _quantized(model, batches, "a16w8")  # 16-bit activations: the weights make the error
    rounded, report = adaround(nearest, model, batches, AdaRoundSettings(iterations=300, samples=32))
    assert report["layers"][0]["kept"] == "adaround"
    assert _layer_error(model, rounded, batches) < 0.7 * _layer_error(model, nearest, batches)
    # Only integer weight values moved: same graph, same scales.
    assert [n.op_type for n in rounded.graph.node] == [n.op_type for n in nearest.graph.node]
    for a, b in zip(nearest.graph.initializer, rounded.graph.initializer):
        if a.data_type == TensorProto.FLOAT:
            np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_adaround_on_quantized_inputs_goes_layer_by_layer_and_does_not_overcorrect():
    """Three convolutions with 8-bit activations: with inputs from the QDQ model each layer's rounding and
    bias correction also absorb the upstream error, which is right only when every layer sees its
    predecessors already corrected (one pass per layer); the result must beat float-input AdaRound."""
    model = conv_relu_chain()
    batches = _batches(24, (1, 3, 8, 8), seed=7)
    nearest = _quantized(model, batches, "a8w8")
    floats, _ = adaround(nearest, model, batches, AdaRoundSettings(iterations=200, samples=24))
    sequential, report = adaround(nearest, model, batches,
                                  AdaRoundSettings(iterations=200, samples=24, quantized_inputs=True))
    assert [r["node"] for r in report["layers"]] == ["conv0", "conv1", "conv2"]
    assert _layer_error(model, sequential, batches) < _layer_error(model, floats, batches)
    assert _layer_error(model, sequential, batches) < _layer_error(model, nearest, batches)


def test_sequential_adaround_from_kept_activations_matches_streaming_from_the_inputs(monkeypatch):
    """Sequential AdaRound keeps each layer's values (`Frontier`) instead of running the model from its
    inputs per layer: on a residual block (a stream the Add reads after a branch of three layers) the
    rounded model is byte-identical to the streamed one, which is what it falls back to when the kept
    values would pass the memory limit."""
    from pipeline.quant.adaround import frontier

    model = _residual_block()
    batches = _batches(12, (1, 3, 6, 6), seed=3)
    nearest = _quantized(model, batches, "a8w8")
    settings = AdaRoundSettings(iterations=50, samples=12, quantized_inputs=True)
    kept, report = adaround(nearest, model, batches, settings)
    assert (report["layers_from_kept_activations"], report["layers_streamed"]) == (4, 0)
    # What `values` answers when the kept values would pass the memory limit (tested below).
    monkeypatch.setattr(frontier.Frontier, "values", lambda self, model, wanted: None)
    streamed, report = adaround(nearest, model, batches, settings)
    assert (report["layers_from_kept_activations"], report["layers_streamed"]) == (0, 4)
    assert kept.SerializeToString() == streamed.SerializeToString()


def test_frontier_values_equal_a_run_from_the_inputs_and_follow_changed_weights():
    """Every value asked for in graph order equals onnxruntime's run of the whole model; a weight an already
    run node read, once changed and reported, sends the cut back to the inputs (the new weight is used);
    over the memory limit nothing is kept."""
    from pipeline.core.onnx_io import expose_outputs, make_session
    from pipeline.quant.adaround.frontier import Frontier

    model = _residual_block()
    feeds = list(_batches(3, (1, 3, 6, 6), seed=4)())

    def direct(m, name):
        session = make_session(expose_outputs(m, [name], replace=True).SerializeToString(), optimize=False)
        return [session.run(None, f)[0] for f in feeds]

    front = Frontier(model, feeds, optimize=False)
    for name in ["t", "re", "rd", "cp", "y"]:
        for got, want in zip(front.values(model, [name]), direct(model, name)):
            np.testing.assert_array_equal(got[0], want)
    assert set(front.cached) <= {"y"}  # nothing later reads anything else

    front = Frontier(model, feeds, optimize=False)
    front.values(model, ["re"])
    assert set(front.cached) == {"t", "re"}  # the residual stream and the branch
    changed = model.__class__.FromString(model.SerializeToString())
    we = next(t for t in changed.graph.initializer if t.name == "we")
    we.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(we) * 2, "we"))
    front.changed({"we"})
    assert front.cached == {}
    for got, want in zip(front.values(changed, ["rd"]), direct(changed, "rd")):
        np.testing.assert_array_equal(got[0], want)

    small = Frontier(model, feeds, optimize=False, limit_bytes=16)
    assert small.values(model, ["t"]) is None and small.cached == {}


def test_mse_weight_range_beats_max_on_a_weight_with_an_outlier():
    w = RNG.standard_normal(65536) * 0.05
    w[17] = 3.0  # one outlier, 60 sigma out: max |w| spends the int8 grid on it
    by_max, by_mse = weight_scale(w, "minmax"), weight_scale(w, "mse")
    assert by_mse < 0.9 * by_max  # clipped
    assert rounding_error(w, [by_mse], 127)[0] < 0.8 * rounding_error(w, [by_max], 127)[0]
    pow2 = weight_scale(w, "mse", power_of_two=True)
    assert np.log2(pow2) == round(np.log2(pow2))
    # Through the quantizer: a MatMul with that weight reproduces its float output better.
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": w.reshape(256, 256)},
                   [("x", [1, 256])], ["y"])
    batches = _batches(16, (1, 256))
    hist = collect_histograms(model, batches(), progress=False)
    errors = {}
    for method in (None, "mse"):
        q = quantize_qdq(model, hist, target=get_target("xdna2"), fmt=Format("a16w8"), method="minmax",
                         weight_method=method)[0]
        errors[method] = _layer_error(model, q, batches)
    assert errors["mse"] < errors[None]


def test_model_family_and_presets():
    cnn = _residual_block()
    assert model_family(cnn) == "cnn"
    assert choose_preset("auto", cnn).name == "cnn"
    q, k, v = (helper.make_node("MatMul", ["x", w], [o]) for w, o in (("wq", "q"), ("wk", "k"), ("wv", "v")))
    nodes = [q, k, v, helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"]),
             helper.make_node("MatMul", ["p", "v"], ["y"])]
    attention = _model(nodes, {n: RNG.standard_normal((8, 8)) for n in ("wq", "wk", "wv")}, [("x", [1, 4, 8])], ["y"])
    assert model_family(attention) == "transformer"
    chosen = choose_preset("auto", attention)
    assert chosen.name == "transformer" and chosen.weight_method == "mse" and not chosen.transforms
    assert choose_preset("cnn", attention).transforms  # asked for explicitly


def test_quantize_stage_applies_the_cnn_preset_where_the_recipe_is_silent(tiny_cnn_recipe):
    from pipeline.recipe import load_recipe
    from pipeline.stages.quantize import resolve_settings

    model = _residual_block()
    target = get_target("xdna2")
    silent = load_recipe(tiny_cnn_recipe())
    settings, used = resolve_settings(silent, model, target, Format.A8W8)
    assert [n for n, _ in settings.transforms] == [
        "residual_equalization", "cross_layer_equalization", "bias_absorption", "adaround"]
    # AdaRound's target stays exact; 8-bit: a padded conv's input is centred too (an explicit Pad).
    assert dict(settings.transforms)["bias_absorption"] == {"consumer_bias": "float", "padded": "pad"}
    settings, _ = resolve_settings(silent, model, target, Format.XINT8)  # alignment sees the moved tensors
    assert [n for n, _ in settings.transforms] == [
        "residual_equalization", "cross_layer_equalization", "bias_absorption", "pow2_alignment", "adaround"]
    # 8-bit activations: AdaRound on the quantized model's inputs, layer by layer; 16-bit: on float inputs,
    # and no stream equalization (it buys int8 activation resolution with weight resolution).
    assert dict(settings.transforms)["adaround"]["quantized_inputs"] is True
    settings, _ = resolve_settings(silent, model, target, Format.A16W8)
    assert dict(settings.transforms)["adaround"] == {}
    assert dict(settings.transforms)["bias_absorption"] == {"consumer_bias": "float"}
    assert "residual_equalization" not in dict(settings.transforms)
    assert settings.method == "percentile" and settings.output_method is None  # 16-bit: the percentile throughout
    settings, _ = resolve_settings(silent, model, target, Format.A8W8)
    assert dict(settings.transforms)["adaround"] == {"quantized_inputs": True}
    # 8-bit activations: ranges by squared error, except the graph outputs' (the answer is not clipped).
    assert settings.method == "mse" and settings.output_method == "percentile"
    assert settings.weight_method == "mse" and used["family"] == "cnn"
    explicit = load_recipe(tiny_cnn_recipe(
        calibration={"data": {"kind": "npz", "path": "calib.npz"}, "samples": 16, "method": "minmax"},
        quantization={"target": "xdna2", "format": "a8w8", "transforms": ["bias_correction"], "weight_method": "minmax"},
    ))
    settings, _ = resolve_settings(explicit, model, target, Format.A8W8)
    assert [n for n, _ in settings.transforms] == ["bias_correction"]
    assert settings.method == "minmax" and settings.weight_method == "minmax" and settings.output_method is None
    off = load_recipe(tiny_cnn_recipe(quantization={"target": "xdna2", "format": "a8w8", "preset": "none"}))
    settings, _ = resolve_settings(off, model, target, Format.A8W8)
    assert not settings.transforms and settings.weight_method is None


def test_pow2_alignment_puts_foldable_activations_on_the_power_of_two_grid():
    from pipeline.quant.ranges import choose_range

    model = _residual_block()
    batches = _batches(16, (1, 3, 6, 6))
    steps = [("cross_layer_equalization", {}), ("pow2_alignment", {"method": "minmax"})]
    result = apply_transforms(model, make_transforms(steps), TransformContext(batches, 16))
    applied = result.report["pow2_alignment"]["applied"]
    assert {a["tensor"] for a in applied} <= {"re", "rd"} and applied
    hist = collect_histograms(result.model, batches(), progress=False)
    for entry in applied:
        lo, hi, _ = choose_range(hist[entry["tensor"]], "minmax", bits=8, symmetric=True)
        k = np.log2(hi / 127)
        assert abs(k - round(k)) < 1e-4, (entry, hi)  # the range is 127 x a power of two
    for batch in batches():
        ref, got = _run(model, batch)[0], _run(result.model, batch)[0]
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6


def test_bias_absorption_float_consumer_bias_keeps_the_float_model_for_a_later_adaround():
    """consumer_bias "float" gives the consumer W c: the float model stays exact even with the quantizer
    at hand ("quantized", W_q c, moves it by (W_q - W) c, which AdaRound would then take as its target)."""
    model = _residual_block()
    batches = _batches(16, (1, 3, 6, 6))
    quantize = lambda m: _quantized(m, batches)  # noqa: E731

    def max_error(cfg):
        result = apply_transforms(model, make_transforms([("bias_absorption", cfg)]),
                                  TransformContext(batches, 16, quantize=quantize))
        assert result.report["bias_absorption"]["applied"]
        return max(float(np.abs(_run(result.model, b)[0] - _run(model, b)[0]).max()) for b in batches())

    exact = max_error({"consumer_bias": "float"})
    assert exact <= 1e-4
    assert max_error({"consumer_bias": "quantized"}) > 10 * exact


def test_a_preset_fills_only_what_the_recipe_left_out_in_compare_variants_and_the_cache_key(tiny_cnn_recipe):
    """`compare` rebuilds the recipe per format: a key the recipe left out must stay out (else a dumped
    default `calibration.method: minmax` turns the preset's percentile off), and writing that default
    out must rerun quantize rather than hit the silent recipe's cache."""
    import json

    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    path = tiny_cnn_recipe()
    out = path.parent / "cmp"
    result = CliRunner().invoke(app, ["compare", str(path), "--formats", "a8w8", "--out", str(out), "--runs", "2"])
    assert result.exit_code in (0, 4), result.output
    (variant,) = [p for p in out.iterdir() if p.is_dir()]
    used = json.loads((variant / "quantize" / "stage.json").read_text())["metrics"]["settings"]
    assert used["activation_method"] == "mse" and used["preset"] == "cnn"  # 8-bit activations

    run = ["run", str(path), "--out", str(path.parent / "run"), "--quiet"]
    assert CliRunner().invoke(app, run).exit_code in (0, 4)
    data = yaml.safe_load(path.read_text())
    data["calibration"]["method"] = "minmax"  # the default, now written out: the preset no longer fills it
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, run[:-1])
    assert result.exit_code in (0, 4), result.output
    assert "quantize   " in result.output and "quantize   cached" not in result.output
    used = json.loads((path.parent / "run" / "quantize" / "stage.json").read_text())["metrics"]["settings"]
    assert used["activation_method"] == "minmax"


def test_layer_errors_reduced_in_one_graph_equal_numpy_on_every_value():
    """compare_values runs both models side by side and sums inside the graph; the same sums in numpy over
    every value of the exposed tensors (masked rescoring included), and models of other opsets refused
    into the exposing path, which agrees too."""
    from pipeline.core.metrics import ErrorSums
    from pipeline.core.onnx_io import expose_outputs, make_session
    from pipeline.quant.layer_error import compare_values, layer_errors, quantized_view

    model = _residual_block()
    batches = list(_batches(6, (1, 3, 6, 6))())
    stats = collect_histograms(model, batches, progress=False)
    qmodel, _, _ = quantize_qdq(model, stats, target=get_target("xdna2"), fmt=Format.A8W8, method="minmax")
    view = quantized_view(qmodel)
    pairs = {t: view[t] for t in ("t", "re", "rd", "cp")}
    sums, masked = compare_values(model, qmodel, batches, pairs, masked=["cp"])
    f_session = make_session(expose_outputs(model, list(pairs)).SerializeToString(), optimize=False)
    q_session = make_session(expose_outputs(qmodel, list(pairs.values())).SerializeToString(), optimize=False)
    f_names, q_names = [o.name for o in f_session.get_outputs()], [o.name for o in q_session.get_outputs()]
    want = {t: ErrorSums() for t in pairs}
    want_masked = ErrorSums()
    for batch in batches:
        f_out = dict(zip(f_names, f_session.run(None, batch)))
        q_out = dict(zip(q_names, q_session.run(None, batch)))
        for t, v in pairs.items():
            want[t].update(f_out[t], q_out[v])
        keep = f_out["cp"] > -1e3  # MASKED_BELOW: nothing here is masked, so the same sums again
        want_masked.update(f_out["cp"][keep], q_out[pairs["cp"]][keep])
    for t in pairs:
        assert sums[t].sqnr_db == pytest.approx(want[t].sqnr_db, abs=1e-3), t
        assert sums[t].cosine == pytest.approx(want[t].cosine, abs=1e-6), t
        assert sums[t].max_abs == pytest.approx(want[t].max_abs, rel=1e-5), t
    assert masked["cp"].sqnr_db == pytest.approx(want_masked.sqnr_db, abs=1e-3)
    other_opset = type(qmodel)()
    other_opset.CopyFrom(qmodel)
    for opset in other_opset.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 19
    exposed, _ = compare_values(model, other_opset, batches, pairs)
    assert all(exposed[t].sqnr_db == pytest.approx(want[t].sqnr_db, abs=0.05) for t in pairs)
    # The ReLU6 inputs are quantized on the ReLU6's range: not layers of their own in the ranking.
    assert {e.tensor for e in layer_errors(model, qmodel, batches)} & {"ce", "cd"} == set()


def _stream_model(head: str = "conv", relu_after_add: bool = False, seed: int = 3):
    """stem 1x1 -> two inverted-residual blocks (expand 1x1 -> ReLU6 -> depthwise 3x3 -> ReLU6 -> project
    1x1, + the stream) -> head. The stem writes stream channels two decades apart (rows scaled 20 ... 0.05),
    as MobileNetV2's projections do; the stream t0 -> t1 -> t2 is read by both expands and the head (a 1x1
    conv; or a GlobalAveragePool, which cannot take a scale). `relu_after_add`: ResNet-style, a Relu after
    each Add carries the stream on."""
    rng = np.random.default_rng(seed)
    c, e = 6, 12
    inits = {"w0": rng.standard_normal((c, 3, 1, 1)) * np.array([20, 0.2, 1, 0.05, 3, 0.5])[:, None, None, None],
             "b0": rng.standard_normal(c) * 0.1, "lo": np.array(0.0), "hi": np.array(6.0)}
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["t0"], name="stem")]
    stream = "t0"
    for i in (1, 2):
        inits.update({f"we{i}": rng.standard_normal((e, c, 1, 1)) * 0.3, f"be{i}": rng.standard_normal(e) * 0.1,
                      f"wd{i}": rng.standard_normal((e, 1, 3, 3)) * 0.3, f"bd{i}": rng.standard_normal(e) * 0.1,
                      f"wp{i}": rng.standard_normal((c, e, 1, 1)) * 0.3, f"bp{i}": np.zeros(c)})
        nodes += [
            helper.make_node("Conv", [stream, f"we{i}", f"be{i}"], [f"ce{i}"], name=f"expand{i}"),
            helper.make_node("Clip", [f"ce{i}", "lo", "hi"], [f"re{i}"], name=f"relu6_e{i}"),
            helper.make_node("Conv", [f"re{i}", f"wd{i}", f"bd{i}"], [f"cd{i}"], name=f"depthwise{i}", group=e,
                             pads=[1, 1, 1, 1]),
            helper.make_node("Clip", [f"cd{i}", "lo", "hi"], [f"rd{i}"], name=f"relu6_d{i}"),
            helper.make_node("Conv", [f"rd{i}", f"wp{i}", f"bp{i}"], [f"p{i}"], name=f"project{i}"),
            helper.make_node("Add", [stream, f"p{i}"], [f"a{i}" if relu_after_add else f"t{i}"], name=f"add{i}"),
        ]
        if relu_after_add:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"t{i}"], name=f"relu{i}"))
        stream = f"t{i}"
    if head == "conv":
        inits["wh"] = rng.standard_normal((4, c, 1, 1)) * 0.5
        nodes.append(helper.make_node("Conv", [stream, "wh"], ["y"], name="head"))
    else:
        nodes.append(helper.make_node("GlobalAveragePool", [stream], ["y"], name="pool"))
    return _model(nodes, inits, [("x", [1, 3, 6, 6])], ["y"])


@pytest.mark.parametrize("relu_after_add", [False, True], ids=["inverted-residual", "relu-after-add"])
def test_residual_equalization_levels_the_stream_and_keeps_the_float_function(relu_after_add):
    model = _stream_model(relu_after_add=relu_after_add)
    batches = _batches(32, (1, 3, 6, 6))
    result = apply_transforms(model, make_transforms([("residual_equalization", {})]), TransformContext(batches, 32))
    report = result.report["residual_equalization"]
    [stream] = report["applied"]
    assert stream["tensor"] == "t2" and stream["tensors"] == (7 if relu_after_add else 5)
    assert sorted(stream["writers"]) == ["project1", "project2", "stem"]
    assert sorted(stream["readers"]) == ["expand1", "expand2", "head"]
    # The quietest stream channel's share of the per-tensor int8 range grows (by the square root of the
    # spread with the default weights: half the levelling goes to the readers' weights).
    assert stream["worst_channel_share_after"] > 5 * stream["worst_channel_share_before"]
    assert {"t0", "t1", "t2", "p1", "p2"} <= result.stale
    for batch in batches():
        ref, got = _run(model, batch)[0], _run(result.model, batch)[0]
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6


def test_residual_equalization_cuts_the_int8_error_of_an_unbalanced_stream():
    model = _stream_model()
    batches = _batches(32, (1, 3, 6, 6))
    plain = _layer_error(model, _quantized(model, batches), batches)
    result = apply_transforms(model, make_transforms([("residual_equalization", {})]), TransformContext(batches, 32))
    levelled = _layer_error(model, _quantized(result.model, batches), batches)
    assert levelled < 0.5 * plain  # relative squared error of the head's output, A8W8 min/max ranges


def test_residual_equalization_leaves_a_stream_with_a_reader_that_takes_no_scale():
    model = _stream_model(head="pool")
    batches = _batches(8, (1, 3, 6, 6))
    result = apply_transforms(model, make_transforms([("residual_equalization", {})]), TransformContext(batches, 8))
    report = result.report["residual_equalization"]
    assert not report["applied"] and not result.stale
    [why] = report["skipped"]
    assert "GlobalAveragePool 'pool'" in why["reason"] or "graph output" in why["reason"]
    # The stream ending in a graph output (the residual block alone) is refused for that reason.
    alone = apply_transforms(_residual_block(), make_transforms([("residual_equalization", {})]),
                             TransformContext(_batches(8, (1, 3, 6, 6)), 8))
    assert "graph output" in alone.report["residual_equalization"]["skipped"][0]["reason"]


def test_bias_absorption_pads_explicitly_before_a_padded_conv_and_keeps_one_grid():
    """A ReLU6 output that a 3x3 depthwise conv reads: centred too, the conv's zero padding made an
    explicit Pad of the shifted zero (exact); alignment folds through it with one scale, equalization (a
    scale per channel) refuses it, and the quantizer gives the Pad's output its input's grid."""
    import onnx

    model = _residual_block()
    batches = _batches(16, (1, 3, 6, 6))
    result = apply_transforms(model, make_transforms([("bias_absorption", {"padded": "pad"})]), TransformContext(batches, 16))
    applied = {a["activation"]: a for a in result.report["bias_absorption"]["applied"]}
    assert set(applied) == {"relu6_e", "relu6_d"} and applied["relu6_e"]["pads"]
    onnx.checker.check_model(result.model)
    nodes = {n.name: n for n in result.model.graph.node}
    [pad] = [n for n in result.model.graph.node if n.op_type == "Pad"]
    assert nodes["depthwise"].input[0] == pad.output[0] and pad.input[0] == "re"
    assert list(next(a for a in nodes["depthwise"].attribute if a.name == "pads").ints) == [0, 0, 0, 0]
    pad_value = next(numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name == pad.input[2])
    assert float(pad_value) == pytest.approx(-applied["relu6_e"]["shift"])
    for batch in batches():
        np.testing.assert_allclose(_run(result.model, batch)[0], _run(model, batch)[0], rtol=1e-4, atol=1e-4)

    aligned = apply_transforms(result.model, make_transforms([("pow2_alignment", {"method": "minmax"})]),
                               TransformContext(batches, 16))
    assert pad.output[0] in {a["tensor"] for a in aligned.report["pow2_alignment"]["applied"]}
    for batch in batches():
        np.testing.assert_allclose(_run(aligned.model, batch)[0], _run(model, batch)[0], rtol=1e-4, atol=1e-4)
    cle = apply_transforms(result.model, make_transforms([("cross_layer_equalization", {})]), TransformContext(batches, 16))
    assert any(s["tensor"] == pad.output[0] and "pads with" in s["reason"]
               for s in cle.report["cross_layer_equalization"]["skipped"])

    qmodel = _quantized(result.model, batches)
    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    scale_of = {n.input[0]: float(inits[n.input[1]]) for n in qmodel.graph.node if n.op_type == "QuantizeLinear"}
    assert scale_of[pad.output[0]] == scale_of["re"]
    # The pad value is written on the data's grid (one integer of the data's type) ...
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    qpad = next(n for n in qmodel.graph.node if n.op_type == "Pad")
    data_dq, value_dq = producer[qpad.input[0]], producer[qpad.input[2]]
    assert value_dq.input[1:3] == data_dq.input[1:3]
    # ... so the emulation drops the Q/DQ pair after the Pad, and computes exactly what the graph does.
    from pipeline.core.emulation import drop_redundant_activation_pairs, fold_constant_dequantize
    from pipeline.core.onnx_io import copy_model, make_session

    emulated = drop_redundant_activation_pairs(fold_constant_dequantize(copy_model(qmodel)))
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == qpad.output[0] for n in emulated.graph.node)
    # On the int8 grid the Pad pads the integers (a quarter of the bytes), its value the integer of v.
    made = {o: n for n in emulated.graph.node for o in n.output}
    epad = next(n for n in emulated.graph.node if n.op_type == "Pad")
    assert made[epad.input[0]].op_type == "QuantizeLinear"
    pad_value = next(numpy_helper.to_array(t) for t in emulated.graph.initializer if t.name == epad.input[2])
    assert pad_value.dtype == np.int8
    fast = make_session(qmodel.SerializeToString(), npu_emulation=True)
    for batch in batches():
        np.testing.assert_array_equal(fast.run(None, batch)[0], _run(qmodel, batch)[0])


def test_a_shifted_relu6_keeps_its_old_zero_on_the_int8_grid():
    """After bias absorption a ReLU6's zeros (most of its values) sit at the Clip's lower bound -c: the
    quantizer widens the step just enough that -c is a grid point, so they round to themselves."""
    model = _residual_block()
    batches = _batches(16, (1, 3, 6, 6))
    result = apply_transforms(model, make_transforms([("bias_absorption", {"padded": "pad"})]), TransformContext(batches, 16))
    qmodel = _quantized(result.model, batches)
    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    floats = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    clips = {n.output[0]: float(floats[n.input[1]].ravel()[0]) for n in result.model.graph.node if n.op_type == "Clip"}
    assert set(clips) == {"re", "rd"} and all(v < 0 for v in clips.values())
    checked = set()
    for node in qmodel.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in clips:
            steps = -clips[node.input[0]] / float(inits[node.input[1]].ravel()[0])
            assert abs(steps - round(steps)) < 1e-4 and 1 <= round(steps) <= 127
            checked.add(node.input[0])
    assert checked == set(clips)


def test_bias_absorption_after_equalization_centres_what_equalization_left():
    """Equalization rescales the ReLU6 outputs between a pair; the statistics bias absorption reads after
    it must be those of x / s, or the shift is half of a stale maximum and the range ends up lopsided."""
    model = _residual_block()
    for init in model.graph.initializer:  # no channel saturates: equalization moves the largest one too
        if init.name == "be":
            init.CopyFrom(numpy_helper.from_array(np.zeros(8, np.float32), "be"))
    batches = _batches(16, (1, 3, 6, 6), scale=0.1)  # small inputs: no channel near 6 before equalization
    steps = [("cross_layer_equalization", {}), ("bias_absorption", {"padded": "pad"})]
    result = apply_transforms(model, make_transforms(steps), TransformContext(batches, 16))
    assert result.report["cross_layer_equalization"]["applied"]
    applied = {a["activation"]: a for a in result.report["bias_absorption"]["applied"]}
    exposed = result.model
    del exposed.graph.output[:]
    exposed.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("re", "rd")])
    values = [_run(exposed, batch) for batch in batches()]
    for i, name in enumerate(("relu6_e", "relu6_d")):
        top = max(float(v[i].max()) for v in values)
        bottom = min(float(v[i].min()) for v in values)
        c = applied[name]["shift"]
        assert bottom == pytest.approx(-c, rel=1e-4) and top == pytest.approx(c, rel=1e-3)  # centred on 0


def test_graph_outputs_keep_their_range_method_when_the_bulk_is_clipped_by_squared_error():
    """The CNN preset's 8-bit ranges (mse) clip for a tensor's bulk; a graph output is the answer (the top
    logit, a far box) and keeps the general method, so its largest values are not cut."""
    model = _residual_block()
    batches = _batches(16, (1, 3, 6, 6))
    hist = collect_histograms(model, batches(), progress=False)
    common = dict(target=get_target("xdna2"), fmt=Format("a8w8"), method="mse")
    _, ranges, _ = quantize_qdq(model, hist, **common, output_method="minmax")
    (output,) = [o.name for o in model.graph.output]
    inner = [name for name in ranges if name != output and ranges[name]["bits"] == 8]
    assert ranges[output]["method"] == "minmax" and inner and all(ranges[n]["method"].endswith("mse") for n in inner)
    clipped = quantize_qdq(model, hist, **common)[1][output]
    top = max(abs(hist[output].min), abs(hist[output].max))
    assert ranges[output]["hi"] >= top > clipped["hi"]  # minmax covers the output; mse cut it
