"""Transformers in int8 (issue 9): 16-bit values that cost no int8 MACs, outlier handling that keeps
MatMul inputs int8, and the int8 x int8 MAC share as an independent audit of the QDQ model counts it.

The models are built here: a post-LN residual block (LayerNorm -> MatMul -> Relu -> MatMul -> residual
Add -> LayerNorm) whose LayerNorm has an outlier channel and whose FFN has one channel that is large in
both the activation and the weight row, as in MiniLM. Sessions are real onnxruntime ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.core.formats import Format
from pipeline.core.onnx_io import make_session
from pipeline.core.metrics import compare_outputs
from pipeline.quant.fallback import FallbackConfig, SearchSpace, Shares, search
from pipeline.quant.flow import QuantizeSettings, run_quantize_flow
from pipeline.quant.mac_share import mac_shares
from pipeline.quant.output_ranges import output_error_ranges
from pipeline.quant.qdq import quantize_qdq
from pipeline.quant.requant import plan_bits
from pipeline.quant.statistics import collect_histograms
from pipeline.quant.transforms import TransformContext, apply_transforms, make_transforms
from pipeline.quant.transforms.outlier_split import choose_channels
from pipeline.targets import get_target

T, D, H = 16, 16, 64
AUDIT = Path("/work/shared/tools/qdq_audit.py")  # the independent audit, where this machine has it


def _block(seed: int = 0, *, gamma_outlier: float = 25.0, ffn_outlier: float = 30.0) -> onnx.ModelProto:
    """x -> LN1 -> h; h -> MatMul(W1) + b1 -> Relu -> MatMul(W2) + b2 -> r; Add(r, h) -> LN2 -> y."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(D)
    gamma[3] = gamma_outlier  # an outlier embedding dimension, on every token
    w1 = rng.standard_normal((D, H)) * 0.2
    w1[:, 5] *= ffn_outlier  # FFN channel 5: huge activation ...
    w2 = rng.standard_normal((H, D)) * 0.05
    w2[5] *= 40.0  # ... and the largest weight row, the same channel
    inits = {"g1": gamma, "be1": rng.standard_normal(D) * 0.1, "w1": w1, "b1": rng.standard_normal(H) * 0.1,
             "w2": w2, "b2": rng.standard_normal(D) * 0.1, "g2": np.ones(D), "be2": np.zeros(D)}
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g1", "be1"], ["h"], name="ln1", axis=-1),
        helper.make_node("MatMul", ["h", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["g"], name="relu"),
        helper.make_node("MatMul", ["g", "w2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["r"], name="add2"),
        helper.make_node("Add", ["r", "h"], ["s"], name="residual"),
        helper.make_node("LayerNormalization", ["s", "g2", "be2"], ["y"], name="ln2", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, T, D])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _batches(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, T, D)).astype(np.float32)} for _ in range(n)]


def _run(model, batches, *, npu=False) -> np.ndarray:
    session = make_session(model.SerializeToString(), npu_emulation=npu, optimize=False)
    return np.concatenate([session.run(None, b)[0].reshape(1, -1) for b in batches])


def _cosine(reference, model, batches) -> float:
    return compare_outputs([_run(reference, batches)], [_run(model, batches, npu=True)])["cosine_mean"]


def _quantize(model, batches, **kw):
    stats = collect_histograms(model, batches, progress=False)
    return quantize_qdq(model, stats, target=get_target("xdna2"), fmt=Format.A8W8, method="minmax", **kw)


def _flow(model, batches, transforms=(), **settings):
    stats = collect_histograms(model, batches, progress=False)
    config = QuantizeSettings(target=get_target("xdna2"), fmt=Format.A8W8, method="minmax",
                              transforms=list(transforms), transform_samples=len(batches), **settings)
    return run_quantize_flow(model, stats, config, calibration=lambda limit: batches[:limit] if limit else batches)


def _macs(model, name):
    node = next(n for n in model.graph.node if n.name == name)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    out = shapes[node.output[0]]
    return int(np.prod(out)) * numpy_helper.to_array(next(i for i in model.graph.initializer
                                                           if i.name == node.input[1])).shape[0]


# --- the 16-bit plan and the MAC share ---------------------------------------------------------------

def test_plan_keeps_mac_readers_of_a_16_bit_value_at_int8():
    model = _block()
    plan = plan_bits(model, {"h", "g", "s", "r"}, wide=())
    # h: read by mm1 (int8 copy) and the residual Add (16 bits); g: read by mm2 only -> stays int8.
    assert plan.wide16 == {"h", "s", "r"} and plan.int8_readers == {"h": {"mm1"}}
    wide = plan_bits(model, {"h"}, wide={"mm2"})  # an A16W8 node promotes what it reads
    assert wide.wide16 == {"h", "g"} and wide.int8_readers == {"h": {"mm1"}}


def test_a_16_bit_value_sliced_into_an_attention_matmul_reaches_it_as_int8():
    """onnxruntime puts a Slice's output on its input's grid: the Slice itself must get the int8 copy, or
    the MatMul reading the slice reads 16 bits (PP-OCR's SVTR attention: q and k sliced out of one
    promoted projection) and the audit counts MACs int8 the fallback had counted int8."""
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((D, 2 * D)) * 0.3, "start0": np.array([0]), "end0": np.array([D]),
             "start1": np.array([D]), "end1": np.array([2 * D]), "axis": np.array([2]), "perm_dummy": np.zeros(1)}
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["qk"], name="proj"),
        helper.make_node("Slice", ["qk", "start0", "end0", "axis"], ["q"], name="slice_q"),
        helper.make_node("Slice", ["qk", "start1", "end1", "axis"], ["k"], name="slice_k"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="attention"),
        helper.make_node("Softmax", ["scores"], ["y"], name="softmax", axis=-1),
        helper.make_node("Relu", ["qk"], ["side"], name="side"),  # a non-MAC reader keeps qk at 16 bits
    ]
    graph = helper.make_graph(
        nodes, "sliced", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, T, T]),
         helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, T, 2 * D])],
        [numpy_helper.from_array(np.asarray(v, np.float32 if k == "w" else np.int64), k) for k, v in inits.items()
         if k != "perm_dummy"],
    )
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    plan = plan_bits(model, {"qk"}, wide=())
    assert plan.wide16 == {"qk"} and plan.int8_readers == {"qk": {"slice_q", "slice_k"}}
    batches = _batches(8)
    q, _, info = _quantize(model, batches, promote={"qk": 16}, wide_nodes=())
    assert mac_shares(q).nodes["attention"] == "int8"


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "Resize", "Pad"])
def test_a_16_bit_value_pooled_resized_or_padded_into_a_conv_reaches_it_as_int8(op: str):
    """These ops put their output on their input's grid in onnxruntime's quantizer, as a Slice does: the
    Conv after them read 16 bits, every MAC of it, while the plan (and the fallback's budget) counted int8."""
    rng = np.random.default_rng(0)
    extra = {"Resize": ["", "scales"], "Pad": ["pads"]}.get(op, [])
    attrs = {"Resize": {"mode": "nearest"}, "Pad": {}}.get(op, {"kernel_shape": [2, 2], "strides": [2, 2]})
    inits = {"w1": rng.standard_normal((8, 4, 3, 3)) * 0.3, "w2": rng.standard_normal((4, 8, 1, 1)) * 0.3,
             "scales": np.array([1, 1, 2, 2]), "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1])}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["t"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node(op, ["t", *extra], ["p"], name="between", **attrs),
             helper.make_node("Conv", ["p", "w2"], ["y"], name="c2"),
             helper.make_node("Relu", ["t"], ["side"], name="side")]  # a non-MAC reader keeps t at 16 bits
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes, "between", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("side", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.int64 if k == "pads" else np.float32), k) for k, v in inits.items() if k in used])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert plan_bits(model, {"t"}, wide=()).int8_readers == {"t": {"between"}}
    batches = [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(4)]
    q, _, _ = _quantize(model, batches, promote={"t": 16}, wide_nodes=())
    assert mac_shares(q).nodes == {"c1": "int8", "c2": "int8"}


def test_mac_share_counts_a_requantizing_pair_as_int8_and_a_16_bit_reader_as_16():
    model = _block()
    batches = _batches(8)
    macs1, macs2 = _macs(model, "mm1"), _macs(model, "mm2")
    everything = {t: 16 for t in collect_histograms(model, batches, progress=False).names}
    q, _, info = _quantize(model, batches, promote=everything, wide_nodes=())
    # mm1 reads the 16-bit LayerNorm output through DQ16 -> Q8 -> DQ8: int8 x int8.
    assert info["requantized_to_int8"] == {"h": ["mm1"]}
    shares = mac_shares(q)
    assert shares.nodes == {"mm1": "int8", "mm2": "int8"} and shares.share_int8 == 1.0
    assert shares.total == macs1 + macs2
    # The legacy rule (no wide_nodes): a MatMul reading a 16-bit value reads 16 bits: counted 16-bit.
    legacy, _, _ = _quantize(model, batches, promote={"h": 16})
    assert mac_shares(legacy).nodes["mm1"] == "16"
    a16w8, _, _ = _quantize(model, batches, promote=everything, wide_nodes={"mm2"})
    assert mac_shares(a16w8).share_int8 == pytest.approx(macs1 / (macs1 + macs2))
    # A node left float (a BF16 island, the CPU) is float.
    island, _, _ = _quantize(model, batches, exclude_nodes=["mm2"])
    assert mac_shares(island).nodes["mm2"] == "float"


@pytest.mark.skipif(not AUDIT.is_file(), reason="the independent audit tool is not on this machine")
def test_mac_share_agrees_with_the_independent_audit(tmp_path):
    model = _block()
    batches = _batches(8)
    everything = {t: 16 for t in collect_histograms(model, batches, progress=False).names}
    for name, kw in {"requant": dict(promote=everything, wide_nodes=()),
                     "a16w8": dict(promote=everything, wide_nodes={"mm2"}),
                     "legacy": dict(promote={"h": 16}), "island": dict(exclude_nodes=["mm1"])}.items():
        q, _, _ = _quantize(model, batches, **kw)
        path = tmp_path / f"{name}.onnx"
        onnx.save(q, str(path))
        audit = json.loads(subprocess.run([sys.executable, str(AUDIT), str(path)], capture_output=True, text=True,
                                          check=True).stdout)
        ours = mac_shares(q).to_json()
        for key in ("mac_share_int8", "mac_share_16", "mac_share_float"):
            assert ours[key] == pytest.approx(audit[key], abs=1e-4), (name, key)


# --- outlier handling ------------------------------------------------------------------------------

def _transform(model, batches, *steps):
    ctx = TransformContext(lambda: iter(batches), len(batches), None)
    return apply_transforms(model, make_transforms(steps), ctx)


def test_residual_smoothquant_keeps_the_float_function_and_smooths_the_layernorm_output():
    model = _block()
    batches = _batches(8)
    plain = _transform(model, batches, ("smoothquant", {"alpha": 0.5}))
    assert "h" in {e["tensor"] for e in plain.report["smoothquant"]["skipped"]}  # the residual Add stops it
    result = _transform(model, batches, ("smoothquant", {"alpha": 0.5, "residual": True}))
    np.testing.assert_allclose(_run(result.model, batches), _run(model, batches), rtol=1e-4, atol=1e-4)
    applied = {e["tensor"]: e for e in result.report["smoothquant"]["applied"]}
    assert applied["h"]["folded_into"] == "LayerNormalization 'ln1'" and "restored_by" in applied["h"]
    assert applied["h"]["act_range_after"] < applied["h"]["act_range_before"] / 2
    # The residual Add reads the restoring Mul; the Mul's constant is on its own int8 grid.
    residual = next(n for n in result.model.graph.node if n.name == "residual")
    mul = next(n for n in result.model.graph.node if n.op_type == "Mul" and n.output[0] in residual.input)
    s = numpy_helper.to_array(next(i for i in result.model.graph.initializer if i.name == mul.input[1]))
    steps = s / (s.max() / 127)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)


def test_outlier_split_keeps_the_function_and_gives_the_channel_its_own_16_bit_matmul():
    model = _block()
    batches = _batches(8)
    result = _transform(model, batches, ("outlier_split", {"channels": 2, "ratio": 16}))
    np.testing.assert_allclose(_run(result.model, batches), _run(model, batches), rtol=1e-4, atol=1e-4)
    split = {e["tensor"]: e for e in result.report["outlier_split"]["applied"]}
    assert split["g"]["channels"] == [5] and split["g"]["rest_max"] < split["g"]["channel_max"][0] / 4
    assert result.wide_nodes and {"g"} <= result.promote16
    stats = collect_histograms(result.model, batches, progress=False)
    q, _, _ = quantize_qdq(result.model, stats, target=get_target("xdna2"), fmt=Format.A8W8, method="minmax",
                           promote={t: 16 for t in result.promote16}, wide_nodes=result.wide_nodes)
    kinds = mac_shares(q).nodes
    assert all(kinds[n] == "16" for n in result.wide_nodes)
    assert kinds["mm1"] == kinds["mm2"] == "int8" and mac_shares(q).share_int8 > 0.95


def test_choose_channels_only_splits_real_outliers():
    x = np.ones(64)
    w = np.ones(64)
    assert choose_channels(x, w, 2, 16) == []
    x[[7, 9, 11]] = [100.0, 50.0, 30.0]
    assert choose_channels(x, w, 2, 16) == [7, 9] and choose_channels(x, w, 4, 40) == [7, 9]


def test_output_error_ranges_clip_what_the_weights_ignore_and_keep_what_they_use():
    """The range of a MatMul input is scored by the MatMul's output error: a huge channel whose weight row
    is zero can be clipped; the same channel with a real weight row must be kept."""
    rng = np.random.default_rng(3)

    def model(row_scale):
        w = rng.standard_normal((D, D)).astype(np.float32)
        w[0] *= row_scale
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, D])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, T, D])], [numpy_helper.from_array(w, "w")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    batches = _batches(4)
    for b in batches:
        b["x"][0, :, 0] *= 40.0  # channel 0: forty times the others
    for row_scale, clipped in ((0.0, True), (1.0, False)):
        m = model(row_scale)
        stats = collect_histograms(m, batches, progress=False)
        (choice,) = output_error_ranges(m, stats, batches).values()
        assert (choice.hi < 0.9 * stats["x"].max) == clipped, choice
        assert choice.error_db >= choice.minmax_db


def test_an_output_error_range_never_clips_a_residual_reader():
    """h feeds mm1 and the residual Add: a range chosen for mm1 goes to mm1's int8 copy when h is 16-bit,
    and nowhere when h is one int8 value for both (the Add would be clipped too)."""
    model = _block()
    batches = _batches(8)
    clip = {"h": (-0.5, 0.5), "g": (-1.0, 1.0)}
    _, shared, _ = _quantize(model, batches, wide_nodes=(), int8_ranges=clip)
    assert shared["h"]["method"] != "output-error" and shared["g"]["method"] == "output-error"  # g: mm2 only
    _, split, _ = _quantize(model, batches, promote={"h": 16}, wide_nodes=(), int8_ranges=clip)
    assert split["h"]["bits"] == 16 and split["h"]["int8_copy"] == {"lo": -0.5, "hi": 0.5, "method": "output-error"}


# --- the flow and the fallback -----------------------------------------------------------------------

def test_flow_keeps_matmuls_int8_and_beats_plain_int8():
    model = _block()
    calib, held = _batches(16), _batches(16, seed=7)
    plain = _flow(model, calib)
    techniques = _flow(model, calib, [("outlier_split", {}), ("smoothquant", {"alpha": 0.5, "residual": True})],
                       free_16bit=True, output_error_ranges=True)
    assert plain.info["mac_shares"]["mac_share_int8"] == 1.0
    assert techniques.info["mac_shares"]["mac_share_int8"] > 0.95  # the split channel's side MatMul is 16-bit
    assert techniques.info["output_error_ranges"]
    cos_plain, cos_new = _cosine(model, plain.model, held), _cosine(model, techniques.model, held)
    assert cos_new > 0.999 and (1 - cos_new) < (1 - cos_plain) / 4, (cos_plain, cos_new)


def _space(score, rank_nodes, macs, min_int8):
    def shares(config):
        moved = sum(macs[n] for n in config.wide | config.bf16)
        total = sum(macs.values())
        return Shares(total, total - moved, moved, 0, 0, len(macs), len(macs), 0)

    return SearchSpace(score=score, gates=lambda m: m["cosine_mean"] >= 0.99, shares=shares,
                       rank_values=lambda: [], rank_nodes=rank_nodes, rungs=("a16", "a16w8", "bf16"),
                       min_int8=min_int8)


def test_fallback_respects_min_mac_share_int8():
    """Moving "big" (70% of MACs) alone would pass, moving both smalls too; with a floor of 66% int8 x int8
    the search skips "big" and passes with the smalls, and nothing it scores breaks the floor."""
    macs = {"big": 70, "small1": 15, "small2": 15}
    ranking = lambda rung, config: ["big", "small1", "small2"]  # noqa: E731  (most sensitive first)
    gained = {"big": 0.012, "small1": 0.006, "small2": 0.006}
    calls = []

    def score(config):
        calls.append(config)
        return {"cosine_mean": 0.98 + sum(gained[n] for n in config.wide | config.bf16)}

    free = search(_space(score, ranking, macs, min_int8=0.0))
    assert free.passed and free.config.wide == {"big"} and free.chosen.shares.mac_share_int8 == pytest.approx(0.3)
    calls.clear()
    bound = search(_space(score, ranking, macs, min_int8=0.66))
    assert bound.passed and bound.config.wide == {"small1", "small2"}
    assert bound.chosen.shares.mac_share_int8 == pytest.approx(0.7)
    assert all("big" not in c.wide | c.bf16 for c in calls)
    assert all(p.shares.mac_share_int8 >= 0.66 for p in bound.points)
    strict = search(_space(score, ranking, macs, min_int8=0.9))  # one small at most: never enough
    assert not strict.passed and all(p.shares.mac_share_int8 >= 0.85 - 1e-9 for p in strict.points)


def test_fallback_baseline_below_the_bound_is_reported_not_searched():
    space = _space(lambda c: {"cosine_mean": 0.5}, lambda rung, c: ["big"], {"big": 1}, min_int8=1.0)
    space.shares = lambda c: Shares(10, 5, 5, 0, 0, 1, 1, 0)
    result = search(space)
    assert not result.passed and len(result.points) == 1 and "min_mac_share_int8" in result.notes[-1]
    assert result.config == FallbackConfig()


# --- through the CLI: a model int8 breaks fails its gate, never a silent pass ------------------------

def _block_recipe(tmp_path: Path, quantization: dict, *, name: str) -> Path:
    import yaml

    onnx.save(_block(), str(tmp_path / "block.onnx"))
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((40, T, D)).astype(np.float32))
    np.savez(tmp_path / "val.npz", x=rng.standard_normal((16, T, D)).astype(np.float32))
    recipe = {
        "name": name, "model": {"onnx": "block.onnx"}, "inputs": [{"name": "x", "shape": [1, T, D]}],
        "calibration": {"data": {"kind": "npz", "path": "calib.npz"}, "samples": 24, "method": "minmax"},
        "validation": {"data": {"kind": "npz", "path": "val.npz"}, "samples": 16, "task": "embedding"},
        "quantization": {"target": "xdna2", "format": "a8w8", **quantization},
        "gates": [{"metric": "cosine_mean", "min": 0.999}],
        "output": f"out-{name}",
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_plain_int8_fails_its_gate_and_the_techniques_pass_it(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    plain = runner.invoke(app, ["run", str(_block_recipe(tmp_path, {}, name="plain")), "--quiet"])
    assert plain.exit_code == 4, plain.output  # a gate failure, reported, the artifact still written
    manifest = json.loads((tmp_path / "out-plain" / "artifact" / "manifest.json").read_text())
    assert manifest["gates_passed"] is False and manifest["metrics"]["cosine_mean"] < 0.99
    techniques = {"transforms": [{"outlier_split": {"channels": 2, "ratio": 16}},
                                 {"smoothquant": {"alpha": 0.5, "residual": True}}],
                  "free_16bit": True, "mac_input_ranges": "output_error",
                  "fallback": {"enabled": True, "holdout": 16, "rungs": ["a16w8"], "min_mac_share_int8": 0.9}}
    fixed = runner.invoke(app, ["run", str(_block_recipe(tmp_path, techniques, name="fixed")), "--quiet"])
    assert fixed.exit_code == 0, fixed.output
    manifest = json.loads((tmp_path / "out-fixed" / "artifact" / "manifest.json").read_text())
    assert manifest["gates_passed"] is True and manifest["quantization"]["mac_shares"]["mac_share_int8"] >= 0.9
    report = (tmp_path / "out-fixed" / "artifact" / "report.md").read_text()
    assert "MACs int8 x int8" in report


def test_fallback_gates_must_name_recipe_gates(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    path = _block_recipe(tmp_path, {"fallback": {"enabled": True, "gates": ["nn_agreement"]}}, name="typo")
    result = CliRunner().invoke(app, ["run", str(path), "--quiet"])
    assert result.exit_code == 2 and "quantization.fallback.gates" in result.output


def test_xint8_values_promoted_to_16_bits_keep_power_of_two_scales():
    """XINT8 requantizes by shifts: a value free_16bit promotes (int16) needs a power-of-two scale too."""
    model = _block()
    batches = _batches(8)
    stats = collect_histograms(model, batches, progress=False)
    everything = {t: 16 for t in stats.names}
    q, _, _ = quantize_qdq(model, stats, target=get_target("xdna2"), fmt=Format.XINT8, method="minmax",
                           promote=everything, wide_nodes=())
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    wide = 0
    for node in q.graph.node:
        if node.op_type == "QuantizeLinear":
            scale = float(inits[node.input[1]])
            assert scale == 2.0 ** round(np.log2(scale)), node.name
            wide += inits[node.input[2]].dtype == np.int16
    assert wide
