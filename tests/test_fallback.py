"""Accuracy-aware fallback (`pipeline.fallback`): the search on synthetic spaces, the pieces on tiny real
models, and the quantize stage end to end on the tiny CNN fixture."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.core.masks import MASKED_BELOW
from pipeline.quant.fallback import FallbackConfig, SearchSpace, Shares, compute_shares, search, value_groups
from pipeline.quant.layer_error import local_sqnr
from pipeline.targets.placement import Placement


def _shares(config: FallbackConfig, macs: dict[str, int]) -> Shares:
    total = sum(macs.values())
    moved = sum(m for n, m in macs.items() if n in config.bf16 or any(n in t for t in config.promote))
    cpu = sum(m for n, m in macs.items() if n in config.cpu)
    return Shares(total, total - moved - cpu, moved, 0, cpu, len(macs), len(macs) - len(config.cpu), len(config.cpu))


def _space(score, *, macs=None, values=None, nodes=None, max_off_int8=1.0, max_off_npu=0.0,
           rungs=("a16", "bf16", "cpu")):
    macs = macs or {f"n{i}": 10 for i in range(10)}
    calls = []

    def scored(config):
        calls.append(config)
        return {"cosine_mean": score(config)}

    space = SearchSpace(
        score=scored,
        gates=lambda m: m["cosine_mean"] >= 0.99,
        shares=lambda c: _shares(c, macs),
        rank_values=lambda: values if values is not None else [[f"n{i}:out"] for i in range(10)],
        rank_nodes=lambda rung, c: nodes if nodes is not None else [f"n{i}" for i in range(10)],
        rungs=rungs,
        max_off_int8=max_off_int8,
        max_off_npu=max_off_npu,
        max_nodes_off_npu=max_off_npu,
    )
    return space, calls


def test_search_stops_at_baseline_when_the_gate_holds():
    space, calls = _space(lambda c: 0.999)
    result = search(space)
    assert result.passed and result.config == FallbackConfig() and len(calls) == 1
    assert result.points[0].rung == "baseline"


def test_search_finds_the_shortest_passing_prefix_with_few_scorings():
    # Each promoted value adds 0.004: the gate (0.99) needs 5 of the 10 (0.97 + 5 * 0.004).
    space, calls = _space(lambda c: 0.97 + 0.004 * len(c.promote))
    result = search(space)
    assert result.passed
    assert result.config.promote == frozenset(f"n{i}:out" for i in range(5))
    assert result.chosen.rung == "a16" and result.chosen.units == 5
    assert len(calls) <= 2 + int(np.ceil(np.log2(10)))  # baseline, the full rung, then bisection


def test_search_climbs_to_bf16_when_16_bits_are_not_enough():
    space, _ = _space(lambda c: 0.9 + 0.05 * (len(c.promote) == 10) + 0.01 * len(c.bf16))
    result = search(space)
    assert result.passed
    assert len(result.config.promote) == 10 and len(result.config.bf16) == 4
    rungs = [p.rung for p in result.points]
    assert rungs[0] == "baseline" and "a16" in rungs and rungs[-1] == "bf16"
    assert any("a16: gates still fail" in note for note in result.notes)


def test_search_respects_the_share_budget():
    # 30% of MACs may leave int8: at most 3 of the 10 equal nodes; the gate is never reached.
    space, calls = _space(lambda c: 0.9 + 0.01 * len(c.promote), max_off_int8=0.3, rungs=("a16",))
    result = search(space)
    assert not result.passed
    assert len(result.config.promote) == 3
    assert all(1 - p.shares.mac_share_int8 <= 0.3 + 1e-9 for p in result.points)
    assert all(len(c.promote) <= 3 for c in calls)


def test_search_reports_a_rung_with_nothing_in_budget():
    space, _ = _space(lambda c: 0.5, max_off_int8=0.05, rungs=("a16",))
    result = search(space)
    assert not result.passed and any("not even one unit" in n for n in result.notes)


def test_cpu_rung_takes_nodes_out_of_bf16():
    space, _ = _space(lambda c: 0.9 + 0.1 * ("n0" in c.cpu), rungs=("bf16", "cpu"), values=[])
    assert not search(space).passed  # the CPU budget is 0 by default
    space, _ = _space(lambda c: 0.9 + 0.1 * ("n0" in c.cpu), rungs=("bf16", "cpu"), values=[], max_off_npu=0.5)
    result = search(space)
    assert result.passed and result.config.cpu == {"n0"} and "n0" not in result.config.bf16


def test_compute_shares_by_precision_and_device():
    placement = [
        Placement("mm1", "MatMul", "NPU", "", 100),
        Placement("mm2", "MatMul", "NPU", "", 300),
        Placement("ln", "LayerNormalization", "CPU", "", None),
        Placement("mm3", "MatMul", "NPU", "", 600),
        Placement("add", "Add", "NPU", "", None),
    ]
    kinds = {"mm1": "int8", "mm2": "int8", "mm3": "int8"}  # as an audit counts the all-int8 QDQ model
    # A promoted value changes no MAC's kind (its MAC readers read an int8 copy); A16W8 nodes do.
    config = FallbackConfig(promote=frozenset({"x"}), bf16=frozenset({"mm2"}), cpu=frozenset({"mm3"}))
    shares = compute_shares(placement, config, kinds)
    assert (shares.macs_int8, shares.macs_a16, shares.macs_bf16, shares.macs_cpu) == (100, 0, 300, 600)
    assert shares.mac_share_npu == pytest.approx(0.4) and shares.mac_share_int8 == pytest.approx(0.1)
    wide = compute_shares(placement, FallbackConfig(wide=frozenset({"mm1"}), cpu=frozenset({"mm3"})), kinds)
    assert (wide.macs_int8, wide.macs_a16, wide.macs_bf16, wide.macs_cpu) == (300, 100, 0, 600)
    # A node the base model already runs at 16 bits or in float stays so.
    base16 = compute_shares(placement, FallbackConfig(), {"mm1": "16", "mm2": "float", "mm3": "int8"})
    assert (base16.macs_int8, base16.macs_a16, base16.macs_bf16) == (600, 100, 300)
    assert (shares.nodes_total, shares.nodes_cpu) == (5, 2)
    assert shares.to_json()["node_share_npu"] == pytest.approx(0.6)


def _chain():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
        helper.make_node("Reshape", ["a", "shape"], ["b"], name="r"),
        helper.make_node("Transpose", ["b"], ["c"], name="t", perm=[1, 0]),
        helper.make_node("Relu", ["c"], ["d"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"),
         numpy_helper.from_array(np.array([4, 2], np.int64), "shape")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_value_groups_join_reshapes_and_transposes():
    groups = sorted(sorted(g) for g in value_groups(_chain(), ["x", "a", "b", "c", "d"]))
    assert groups == [["a", "b", "c"], ["d"], ["x"]]


def test_local_sqnr_measures_each_tensors_own_error_and_skips_masked_positions():
    model = _chain()
    x = np.array([[1.0, -2.0, 3.0, 0.5], [-1.5, 2.5, -3.0, 0.25]], np.float32)
    ranges = {"a": {"lo": -3.0, "hi": 3.0, "bits": 8}, "d": {"lo": -3.0, "hi": 3.0, "bits": 16}}
    scores = local_sqnr(model, ranges, [{"x": x}])
    assert 30 < scores["a"] < 60 and scores["d"] > scores["a"] + 40  # 16 bits: ~48 dB more
    # A "masked" value far below the range clips: scored as is it is ~0 dB, masked it is ignored.
    x_masked = x.copy()
    x_masked[0, 0] = 2 * MASKED_BELOW
    clipped = local_sqnr(model, {"a": ranges["a"]}, [{"x": x_masked}])["a"]
    masked = local_sqnr(model, {"a": ranges["a"]}, [{"x": x_masked}], masked=["a"])["a"]
    assert clipped < 1 and masked > 30


@pytest.fixture()
def tiny_run(tiny_cnn_recipe):
    """Runs the tiny CNN with extra quantization settings: 8 calibration samples for the statistics, the
    other 8 of the fixture's 16 held out; a gate on accuracy, which held-out data cannot measure."""
    import yaml

    from pipeline.api import run_recipe
    from pipeline.recipe import load_recipe

    def run(**quantization):
        path = tiny_cnn_recipe(
            quantization={"target": "xdna2", "format": "a8w8", **quantization},
            gates=[{"metric": "top1_agreement", "min": 99.9}, {"metric": "accuracy", "min": 0.0}],
        )
        data = yaml.safe_load(path.read_text())
        data["calibration"]["samples"] = 8
        path.write_text(yaml.safe_dump(data))
        return run_recipe(load_recipe(path), progress=False, check_gates=False)

    return run


def test_quantize_stage_runs_the_fallback_on_held_out_calibration_data(tiny_run):
    result = tiny_run(fallback={"enabled": True, "holdout": 8, "rungs": ["a16", "bf16"]},
                      cross_layer_equalization=True, bias_correction=True)
    quantize = result.run_dir / "quantize"
    report = json.loads((quantize / "fallback.json").read_text())
    assert report["notes"][0].startswith("held-out split: calibration samples 8..15")
    # accuracy needs labels, which the held-out calibration split does not have: left out, and said so.
    assert any("accuracy" in n for n in report["notes"])
    assert report["points"][0]["rung"] == "baseline"
    for point in report["points"]:
        assert set(point["shares"]) >= {"mac_share_int8", "mac_share_npu", "node_share_npu"}
    transforms = json.loads((quantize / "transforms.json").read_text())
    assert "bias_correction" in transforms["transforms"]
    if report["config"]["bf16_nodes"]:
        assert (quantize / "emulated.onnx").is_file()
    # The validation set was never used by the search: validate runs after, on the chosen model.
    assert json.loads((result.run_dir / "validate" / "metrics.json").read_text())["samples"] == 8
    layers = json.loads((result.run_dir / "validate" / "layer_errors.json").read_text())
    assert layers["layers"] and layers["float_model"].startswith("quantize/float.onnx")


def test_fallback_holdout_overlap_is_reported(tiny_cnn_recipe):
    from pipeline.recipe import load_recipe
    from pipeline.stages.quantize import holdout_batches

    recipe = load_recipe(tiny_cnn_recipe())  # 16 calibration samples, all used for statistics
    batches, note = holdout_batches(recipe, 4)
    assert len(batches) == 4 and "optimistic" in note


def test_bf16_islands_are_emulated(tiny_cnn_recipe):
    """A QDQ model with some nodes left float for BF16: those nodes' outputs are bf16-rounded."""
    from pipeline.core.formats import Format
    from pipeline.quant.fallback import npu_numerics
    from pipeline.quant.qdq import quantize_qdq
    from pipeline.quant.statistics import collect_histograms as collect_statistics
    from pipeline.recipe import load_recipe
    from pipeline.targets import get_target
    from pipeline.data import open_dataset
    from pipeline.api import run_stage

    recipe = load_recipe(tiny_cnn_recipe())
    for stage in ("export", "prepare"):
        run_stage(recipe, stage, progress=False)
    model = onnx.load(str(recipe.output_dir() / "prepare" / "model.onnx"))
    stats = collect_statistics(model, open_dataset(recipe, "calibration"), progress=False)
    gemm = next(n.name for n in model.graph.node if n.op_type == "Gemm")
    config = FallbackConfig(promote=frozenset({model.graph.input[0].name}), bf16=frozenset({gemm}))
    qmodel, _, _ = quantize_qdq(model, stats, target=get_target("xdna2"), fmt=Format.A8W8,
                                method="minmax", exclude_nodes=[gemm], promote={"x": 16})
    emulated = npu_numerics(qmodel, config)
    casts = [n for n in emulated.graph.node if n.op_type == "Cast"]
    assert casts and all(gemm in n.name or "bf16" in n.name for n in casts)
    assert npu_numerics(qmodel, FallbackConfig()) is qmodel


def test_fallback_moves_layers_until_a_strict_gate_holds(tiny_cnn_recipe):
    """SQNR >= 45 dB is out of int8's reach for the tiny CNN: the search must climb, and the model
    validate runs must be the one it chose (16-bit tensors in model.onnx, BF16 nodes emulated)."""
    import yaml

    from pipeline.api import run_recipe
    from pipeline.recipe import load_recipe

    path = tiny_cnn_recipe(quantization={"target": "xdna2", "format": "a8w8",
                                         "fallback": {"enabled": True, "holdout": 8}},
                           gates=[{"metric": "sqnr_db", "min": 45.0}])
    data = yaml.safe_load(path.read_text())
    data["calibration"]["samples"] = 8
    path.write_text(yaml.safe_dump(data))
    result = run_recipe(load_recipe(path), progress=False, check_gates=False)
    report = json.loads((result.run_dir / "quantize" / "fallback.json").read_text())
    rungs = [p["rung"] for p in report["points"]]
    assert rungs[0] == "baseline" and not report["points"][0]["passed"] and len(set(rungs)) > 1
    config = report["config"]
    assert config["promoted_to_16_bits"] and not config["cpu_nodes"]  # no CPU budget by default
    model = onnx.load(str(result.run_dir / "quantize" / "model.onnx"))
    int16 = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.domain == "com.microsoft"}
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert int16 >= set(config["promoted_to_16_bits"]) & quantized
    if config["bf16_nodes"]:
        assert "BF16 nodes rounded" in result.metrics["numerics"]
    if report["passed"]:
        assert report["chosen"]["passed"] and report["chosen"]["metrics"]["sqnr_db"] >= 45.0


@pytest.mark.slow
def test_minilm_recipe_int8_techniques_and_fallback_on_few_samples(tmp_path):
    """The shipped A8W8 MiniLM recipe on 24/16/24 calibration/held-out/validation sentences (the full run
    takes minutes): the outlier split and SmoothQuant apply, MatMuls stay int8 x int8 as an
    audit counts them (at least the recipe's min_mac_share_int8, in the artifact and at every point the
    fallback scored), the masked attention scores are rescored, and the artifact carries the reports."""
    from pipeline.api import run_recipe
    from pipeline.quant.mac_share import mac_shares
    from pipeline.recipe import load_recipe

    from .conftest import RECIPES

    recipe = load_recipe(RECIPES / "minilm_l6.yaml")
    q = recipe.quantization
    recipe = recipe.model_copy(update={
        "calibration": recipe.calibration.model_copy(update={"samples": 24}),
        "validation": recipe.validation.model_copy(update={"samples": 24}),
        "quantization": q.model_copy(update={"transform_samples": 16, "fallback": q.fallback.model_copy(
            update={"holdout": 16, "curve_points": 0})}),
    })
    result = run_recipe(recipe, out=tmp_path / "minilm", progress=False, check_gates=False)
    transforms = json.loads((result.artifact / "transforms.json").read_text())["transforms"]
    assert len(transforms["outlier_split"]["applied"]) >= 6  # at least the FFN down projections
    # Every Q/K/V input is smoothed: folded into the split's mask Mul, or via a residual-restoring Mul.
    smoothed = {a["tensor"] for a in transforms["smoothquant"]["applied"]}
    graph = onnx.load(str(result.run_dir / "quantize" / "float.onnx")).graph
    assert {n.input[0] for n in graph.node if n.name.endswith("/query/MatMul")} <= smoothed
    floor = q.fallback.min_mac_share_int8
    assert mac_shares(onnx.load(str(result.artifact / "model.onnx"))).share_int8 >= floor
    fallback = json.loads((result.artifact / "fallback.json").read_text())
    assert fallback["points"][0]["rung"] == "baseline"
    assert all(p["shares"]["mac_share_int8"] >= floor - 1e-9 for p in fallback["points"])
    assert fallback["notes"][0] == "held-out split: calibration samples 24..39 (not used for the statistics)"
    layers = json.loads((result.artifact / "layer_errors.json").read_text())["layers"]
    scores = [l for l in layers if l["tensor"].endswith("attention/self/Add_output_0")]  # Softmax inputs
    assert all("attention mask" in l.get("note", "") and l["sqnr_db"] > 5 for l in scores)  # not ~0 dB
    assert result.metrics["cosine_mean"] > 0.99
    assert (result.artifact / "report.html").is_file()


def test_layer_error_report_in_bf16_skips_integer_tensors():
    """BF16 numerics compare float node outputs by name; an int64 path (an attention mask's) is left out."""
    from pipeline.quant.bf16 import emulate_bf16
    from pipeline.quant.layer_error import layer_error_report

    nodes = [
        helper.make_node("Unsqueeze", ["ids", "axes"], ["u"], name="unsq"),
        helper.make_node("Cast", ["u"], ["uf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "uf"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    batches = [{"x": np.random.default_rng(1).standard_normal((1, 2, 4)).astype(np.float32),
                "ids": np.arange(4, dtype=np.int64).reshape(1, 4)}]
    report = layer_error_report(model, emulate_bf16(model), batches, bf16=True)
    names = {l["tensor"] for l in report["layers"]}
    assert names == {"uf", "m", "y"} and all(20 < l["sqnr_db"] <= 200 for l in report["layers"])


def test_value_ranking_leaves_out_the_inputs_of_fused_activations():
    """A Conv output only a ReLU6 reads takes the ReLU6's quantization whatever it is promoted to: the
    fallback must not spend steps promoting it (scored on the ReLU6's range, it would always rank first)."""
    from pipeline.core.formats import Format
    from pipeline.quant.fallback.heldout import HeldOutFallback
    from pipeline.quant.qdq import quantize_qdq
    from pipeline.quant.statistics import collect_histograms
    from pipeline.targets import get_target

    from .test_cnn_quant import _batches, _residual_block

    model = _residual_block()
    batches = list(_batches(6, (1, 3, 6, 6))())
    stats = collect_histograms(model, batches, progress=False)
    target = get_target("xdna2")

    def quantize(config):
        return quantize_qdq(model, stats, target=target, fmt=Format.A8W8, method="minmax",
                            promote={t: 16 for t in config.promote})

    search = HeldOutFallback(model, model, quantize, target, Format.A8W8, batches, "test", [], "regression",
                             None, settings=None)
    search._base = quantize(FallbackConfig())
    ranked = {t for group in search._rank_values() for t in group}
    assert "t" in ranked and not ranked & {"ce", "cd"}  # t: the residual Add reads it; ce, cd: only a ReLU6
