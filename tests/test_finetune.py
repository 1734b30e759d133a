"""End-to-end fine-tuning of a QDQ model (`pipeline.quant.finetune`): the torch evaluation reproduces the
emulated QDQ model, only integer values move, the held-out check keeps the better model, and a model the
torch evaluation cannot reproduce is left as it was with the reason in the report."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.core.formats import Format
from pipeline.quant.finetune import FinetuneSettings, _blended, finetune
from pipeline.quant.finetune.torch_graph import QDQTorchGraph
from pipeline.quant.qdq import quantize_qdq
from pipeline.quant.statistics import collect_histograms
from pipeline.targets import get_target

from .graph_builders import conv_relu_chain
from .graph_builders import run_unoptimized as _run
from .graph_builders import tiny_model as _model


def _data(n, shape, seed):
    rng = np.random.default_rng(seed)
    data = [{"x": (rng.standard_normal(shape) * 0.8 + 0.3).astype(np.float32)} for _ in range(n)]
    return lambda: iter(data)


def _quantized(model, batches, fmt):
    hist = collect_histograms(model, batches(), progress=False)
    return quantize_qdq(model, hist, target=get_target("xdna2"), fmt=Format(fmt), method="minmax")[0]


def _head_model(seed=4):
    """A depthwise-separable ReLU6 block with a residual, a hardswish, pooling and a classifier head with
    a sigmoid branch concatenated: the operators MobileNet-style backbones and detector heads use."""
    rng = np.random.default_rng(seed)
    c, e = 4, 8
    inits = {
        "w0": rng.standard_normal((c, 3, 3, 3)) * 0.4, "b0": rng.standard_normal(c) * 0.1,
        "we": rng.standard_normal((e, c, 1, 1)) * 0.5, "be": rng.standard_normal(e) * 0.1,
        "wd": rng.standard_normal((e, 1, 3, 3)) * 0.5, "bd": rng.standard_normal(e) * 0.1,
        "wp": rng.standard_normal((c, e, 1, 1)) * 0.3, "bp": rng.standard_normal(c) * 0.1,
        "wf": rng.standard_normal((5, c)) * 0.5, "bf": rng.standard_normal(5) * 0.1,
        "lo": np.array(0.0), "hi": np.array(6.0),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="stem", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("HardSwish", ["c0"], ["t"], name="hswish"),
        helper.make_node("Conv", ["t", "we", "be"], ["ce"], name="expand"),
        helper.make_node("Clip", ["ce", "lo", "hi"], ["re"], name="relu6_e"),
        helper.make_node("Conv", ["re", "wd", "bd"], ["cd"], name="depthwise", group=e, pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["cd", "lo", "hi"], ["rd"], name="relu6_d"),
        helper.make_node("Conv", ["rd", "wp", "bp"], ["cp"], name="project"),
        helper.make_node("Add", ["t", "cp"], ["s"], name="residual"),
        helper.make_node("MaxPool", ["s"], ["m"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["m"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
        helper.make_node("Sigmoid", ["logits"], ["scores"], name="sigmoid"),
        helper.make_node("Concat", ["logits", "scores"], ["y"], name="concat", axis=1),
    ]
    return _model(nodes, inits, [("x", [1, 3, 12, 12])], ["y"])


def _sqnr(ref, got):
    return 10 * np.log10(float((ref.astype(np.float64) ** 2).sum()) / max(float(((got - ref) ** 2).sum()), 1e-30))


@pytest.mark.parametrize("fmt", ["a8w8", "xint8"])
def test_torch_evaluation_reproduces_the_emulated_qdq_model(fmt):
    import torch

    model = _head_model()
    batches = _data(16, (1, 3, 12, 12), seed=1)
    qmodel = _quantized(model, batches, fmt)
    graph = QDQTorchGraph(qmodel)
    assert len(graph.learned) == 10  # five weights, five biases
    quantized_error = []
    for feed in list(batches())[:6]:
        want = _run(qmodel, feed)[0]
        with torch.no_grad():
            got = graph(feed)[0].numpy()
        # Float accumulation order differs (torch vs onnxruntime), so a value at a rounding midpoint may
        # land one step apart; far above the quantization error itself.
        assert _sqnr(want, got) > 45
        quantized_error.append(_sqnr(_run(model, feed)[0], want))
    assert max(quantized_error) < 45


def test_finetune_keeps_only_what_carries_over_and_moves_integers_only():
    model = _head_model(seed=6)
    batches = _data(40, (1, 3, 12, 12), seed=2)
    qmodel = _quantized(model, batches, "xint8")
    tuned, report = finetune(qmodel, model, batches, FinetuneSettings(epochs=6, samples=40, batch=4, check_samples=10))
    assert report["samples"] == 30 and report["held_out"] == 10
    assert report["kept"] in ("finetuned", "original")
    if report["kept"] == "finetuned":
        assert report["check_sqnr_db_after"] > report["check_sqnr_db_before"]
    else:
        assert tuned is qmodel
    # Fresh samples: the kept model is no worse than the one it started from by more than noise.
    fresh = list(_data(24, (1, 3, 12, 12), seed=9)())
    before = np.mean([_sqnr(_run(model, f)[0], _run(qmodel, f)[0]) for f in fresh])
    after = np.mean([_sqnr(_run(model, f)[0], _run(tuned, f)[0]) for f in fresh])
    assert after > before - 0.5
    # Same graph, same scales and zero points (XINT8's power-of-two scales included): integers only.
    assert [n.op_type for n in tuned.graph.node] == [n.op_type for n in qmodel.graph.node]
    old = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    moved = 0
    for t in tuned.graph.initializer:
        new = numpy_helper.to_array(t)
        assert new.dtype == old[t.name].dtype and new.shape == old[t.name].shape
        if t.data_type in (TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8) and new.size == 1:
            np.testing.assert_array_equal(new, old[t.name])  # scales and zero points
        if t.data_type == TensorProto.INT8 and new.size > 1:
            assert new.min() >= min(-127, int(old[t.name].min()))  # narrow-range weights stay narrow
        moved += int(np.sum(new != old[t.name]))
    assert (moved > 0) == (report["kept"] == "finetuned")


def test_finetune_gains_on_a_model_whose_activation_noise_adds_up():
    """Three int8 convolutions in a row: the rounding noise of each layer's activations reaches the output,
    which layer-wise methods do not see; fine-tuning against the output recovers part of it on samples it
    did not train on."""
    model = conv_relu_chain()
    batches = _data(48, (1, 3, 8, 8), seed=7)
    qmodel = _quantized(model, batches, "a8w8")
    tuned, report = finetune(qmodel, model, batches, FinetuneSettings(epochs=8, samples=48, batch=4, check_samples=12))
    assert report["kept"] == "finetuned", report
    assert report["stacked"]  # no batch-1 shape baked in: samples run stacked
    fresh = list(_data(32, (1, 3, 8, 8), seed=11)())
    before = np.mean([_sqnr(_run(model, f)[0], _run(qmodel, f)[0]) for f in fresh])
    after = np.mean([_sqnr(_run(model, f)[0], _run(tuned, f)[0]) for f in fresh])
    assert after > before + 0.3, (before, after)


def test_finetune_leaves_a_model_it_cannot_reproduce_as_it_was():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Erf", ["c"], ["y"], name="erf")]
    model = _model(nodes, {"w": rng.standard_normal((4, 3, 3, 3)), "b": np.zeros(4)}, [("x", [1, 3, 6, 6])], ["y"])
    batches = _data(16, (1, 3, 6, 6), seed=1)
    qmodel = _quantized(model, batches, "a8w8")
    tuned, report = finetune(qmodel, model, batches, FinetuneSettings(epochs=1, samples=16))
    assert tuned is qmodel and report["kept"] == "original"
    assert "Erf" in report["skipped"] and "erf" in report["skipped"]
    few = _data(3, (1, 3, 6, 6), seed=1)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    plain = _model(nodes, {"w": rng.standard_normal((4, 3, 3, 3)), "b": np.zeros(4)}, [("x", [1, 3, 6, 6])], ["y"])
    tuned, report = finetune(_quantized(plain, few, "a8w8"), plain, few, FinetuneSettings(epochs=1))
    assert report["kept"] == "original" and "too few" in report["skipped"]


def test_finetune_runs_in_the_quantize_stage_from_a_recipe(tiny_cnn_recipe, tmp_path):
    import json

    from pipeline.api import run_stage
    from pipeline.recipe import load_recipe

    recipe = load_recipe(tiny_cnn_recipe(quantization={
        "target": "xdna2", "format": "a8w8",
        "transforms": ["cross_layer_equalization", {"finetune": {"epochs": 2, "batch": 4}}]}))
    out = tmp_path / "run"
    for stage in ("export", "prepare", "calibrate", "quantize"):
        run_stage(recipe, stage, out=out, progress=False)
    report = json.loads((out / "quantize" / "transforms.json").read_text())["transforms"]["finetune"]
    assert report["settings"]["epochs"] == 2 and report["samples"] == 12 and report["held_out"] == 4
    assert report["kept"] in ("finetuned", "original") and len(report["epoch_sqnr_db"]) == 2
    with pytest.raises(Exception, match="learning_rate"):
        load_recipe(tiny_cnn_recipe(quantization={
            "target": "xdna2", "format": "a8w8", "transforms": [{"finetune": {"learning_rate": -1}}]}))


def test_finetune_refuses_a_torch_evaluation_that_does_not_match_onnxruntime(monkeypatch):
    """If the torch evaluation of some operator were wrong, training would tune another model: the one-sample
    check against onnxruntime catches it and the model is left as it was (a deliberately wrong Relu here)."""
    from pipeline.quant.finetune import torch_graph

    model = conv_relu_chain()
    batches = _data(16, (1, 3, 8, 8), seed=7)
    qmodel = _quantized(model, batches, "a8w8")
    monkeypatch.setitem(torch_graph._EVALUATORS, "Relu", lambda node, args: args[0])
    tuned, report = finetune(qmodel, model, batches, FinetuneSettings(epochs=1, samples=16))
    assert tuned is qmodel and report["kept"] == "original"
    assert "does not reproduce" in report["skipped"]


def test_samples_are_stacked_only_where_the_model_gives_each_its_own_outputs():
    from pipeline.quant.finetune import _stacks

    rng = np.random.default_rng(2)
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1])
    inits = {"w": rng.standard_normal((4, 3, 3, 3)), "b": np.zeros(4), "shape": np.array([1, -1])}
    batches = _data(8, (1, 3, 6, 6), seed=1)
    # A Reshape to [1, -1]: two stacked samples would come out as one row of both.
    baked = _model([conv, helper.make_node("Reshape", ["c", "shape"], ["y"], name="reshape")], inits,
                   [("x", [1, 3, 6, 6])], ["y"])
    baked.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.array([1, -1], np.int64), "shape"))
    flat = _model([conv, helper.make_node("Flatten", ["c"], ["y"], name="flatten")], inits, [("x", [1, 3, 6, 6])], ["y"])
    feeds = list(batches())[:2]
    assert not _stacks(QDQTorchGraph(_quantized(baked, batches, "a8w8")), feeds)
    assert _stacks(QDQTorchGraph(_quantized(flat, batches, "a8w8")), feeds)


def test_a_fine_tune_that_breaks_the_model_is_not_kept():
    """A learning rate of 50 grid steps wrecks the weights: the held-out check sees the collapse and the
    quantized model comes back as it was, with the figures in the report (never a silent pass)."""
    model = conv_relu_chain()
    batches = _data(32, (1, 3, 8, 8), seed=7)
    qmodel = _quantized(model, batches, "a8w8")
    tuned, report = finetune(qmodel, model, batches,
                             FinetuneSettings(epochs=2, samples=32, batch=4, learning_rate=50.0, check_samples=8))
    assert report["kept"] == "original" and tuned is qmodel
    assert report["check_sqnr_db_after"] < report["check_sqnr_db_before"] - 10


def test_blends_are_convex_mixes_of_two_samples_of_the_batch_and_token_ids_are_left():
    rng = np.random.default_rng(0)
    group = [{"x": np.full((1, 2, 3), float(k), np.float32)} for k in range(4)]
    blended = _blended(group, 0.3, np.random.default_rng(5))
    again = _blended(group, 0.3, np.random.default_rng(5))
    for k, (feed, repeat) in enumerate(zip(blended, again)):
        x = feed["x"]
        assert x.shape == (1, 2, 3) and x.dtype == np.float32 and np.array_equal(x, repeat["x"])
        assert len(np.unique(x)) == 1 and 0 <= x.flat[0] <= 3 and x.flat[0] != k  # w * own + (1 - w) * another
    tokens = [{"ids": rng.integers(0, 100, (1, 8)), "x": np.zeros((1, 8), np.float32)} for _ in range(3)]
    assert _blended(tokens, 0.3, rng) is tokens  # integer inputs cannot be blended: the batch as it is
    assert _blended(group, 1.0, rng) is group  # blend 1: off
