"""Every output validated, task metrics for real heads, no silent death (issues 8 and 10), end to end.

Tiny models with the patterns of the issue (tests/pattern_models.py) go through the real CLI: a YOLO
head concatenating boxes (0..320) and sigmoid scores, a CTC recognizer, a probability map, a per-position
classifier with an int64 ArgMax output and a [1, 1] score. The figures asserted are recomputed here from
the artifact's models where they can be (no recorded numbers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.onnx_io import make_session

from .pattern_models import (
    blob_images, ctc_features, ctc_recognizer, export_keypoint_head, export_map_net, export_yolo, sequence_classifier,
    write_recipe, yolo_images,
)

pytest.importorskip("torch")

runner = CliRunner()


def _run(recipe: Path, *extra: str):
    result = runner.invoke(app, ["run", str(recipe), "--quiet", *extra])
    return result.exit_code, result.output


def _metrics(recipe: Path) -> dict:
    return json.loads((recipe.parent / f"run_{recipe.stem}" / "validate" / "metrics.json").read_text())


def _manifest(recipe: Path) -> dict:
    return json.loads((recipe.parent / f"run_{recipe.stem}" / "artifact" / "manifest.json").read_text())


# ------------------------------------------------------------------------------------- YOLO-style head

DETECTION = {"outputs": {"pred": {"task": "detection", "layout": "channels_first", "box_format": "xywh"}}}


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("yolo")
    return folder, export_yolo(folder / "yolo.onnx"), yolo_images(48, 1), yolo_images(32, 2)


def _yolo_recipe(yolo, name: str, *, guard: bool, fmt: str = "a8w8", gates=None) -> Path:
    folder, model, calib, val = yolo
    return write_recipe(folder, name, model, "image", [1, 3, 64, 64], calib, val, validation=DETECTION,
                        quantization={"format": fmt, "range_guard": {"enabled": guard}},
                        gates=gates or [{"metric": "sqnr_db", "min": 20.0}])


def test_concat_of_boxes_and_scores_fails_loudly_without_the_guard(yolo):
    """The issue's detector: the whole-output SQNR gate passes while every score is rounded to 0."""
    recipe = _yolo_recipe(yolo, "yolo_noguard", guard=False)
    code, output = _run(recipe)
    assert code == 4, output
    pred = _metrics(recipe)["outputs"]["pred"]
    assert pred["sqnr_db"] >= 20.0  # the SQNR gate alone would have passed
    assert pred["dead_channels"] == 2 and pred["dead_channel_list"] == "4-5"  # both class-score channels
    assert pred["float_boxes"] > 100 and pred["quantized_boxes"] == 0 and pred["boxes_matched"] == 0.0
    gates = {(g["metric"], g["output"]): g for g in _manifest(recipe)["gates"]}
    assert gates[("sqnr_db", "pred")]["passed"]
    dead = gates[("dead_channels", "pred")]
    assert not dead["passed"] and dead["default"]
    for fragment in ("dead_channels of output 'pred' = 2", "(4-5)", "range_guard", "allow_dead_channels"):
        assert fragment in output, output


def test_range_guard_keeps_the_concat_at_16_bits_and_the_boxes_are_found(yolo):
    """A8W8 on XDNA2: the Concat output goes to 16 bits (on the NPU). Bound: 85% of float boxes. Measured:
    93.9% with the Concat at 16 bits, 93.9% with it float, 96.2% with every activation at 16 bits
    (A16W8): what is left is the int8 error of the score branch near the 0.25 threshold, not the Concat."""
    recipe = _yolo_recipe(yolo, "yolo_guard", guard=True,
                          gates=[{"metric": "boxes_matched", "min": 85.0}, {"metric": "boxes_precision", "min": 85.0}])
    code, output = _run(recipe)
    assert code == 0, output
    pred = _metrics(recipe)["outputs"]["pred"]
    assert pred["dead_channels"] == 0 and pred["boxes_matched"] >= 85.0
    guard = json.loads((recipe.parent / "run_yolo_guard" / "quantize" / "stage.json").read_text())["metrics"]["range_guard"]
    (finding,) = guard["findings"]
    assert finding["op_type"] == "Concat" and finding["tensor"] == "pred" and finding["action"] == "16-bit"
    assert finding["ratio"] > 100
    assert guard["promoted_to_16_bits"] == ["pred"]
    report = (recipe.parent / "run_yolo_guard" / "artifact" / "report.md").read_text()
    assert "## Range guard" in report and "16 bits" in report


def test_range_guard_under_xint8_keeps_the_concat_float_on_the_cpu(yolo):
    recipe = _yolo_recipe(yolo, "yolo_xint8", guard=True, fmt="xint8", gates=[{"metric": "boxes_matched", "min": 85.0}])
    code, output = _run(recipe)
    assert code == 0, output
    manifest = _manifest(recipe)
    assert manifest["range_guard"]["float_nodes"] == ["/Concat"]
    placement = json.loads((recipe.parent / "run_yolo_xint8" / "artifact" / "placement.json").read_text())
    assert {p["node"] for p in placement["placement"] if p["device"] == "CPU"} >= {"/Concat"}


# ------------------------------------------------------------------------------------- CTC recognizer

def _ctc(tmp_path: Path, name: str, *, margin: float, blank_gain: float, guard: bool, gates: list) -> Path:
    model = ctc_recognizer(tmp_path / f"{name}.onnx", margin=margin, blank_gain=blank_gain)
    return write_recipe(tmp_path, name, model, "features", [1, 24, 4], ctc_features(32, 1), ctc_features(24, 2),
                        validation={"outputs": {"logits": {"task": "ctc", "blank": 0}}},
                        quantization={"range_guard": {"enabled": guard}}, gates=gates)


CTC_GATES = [{"metric": "step_agreement", "min": 75.0}, {"metric": "sqnr_db", "min": 20.0},
             {"metric": "nonblank_agreement", "min": 95.0}, {"metric": "string_agreement", "min": 90.0}]


def _decode(logits: np.ndarray) -> list[tuple]:
    from pipeline.core.tasks.ctc import ctc_greedy_decode

    return [ctc_greedy_decode(row.argmax(-1), 0) for row in logits]


def test_ctc_recognizer_metrics_are_the_decoded_strings(tmp_path: Path):
    recipe = _ctc(tmp_path, "ctc_ok", margin=3.0, blank_gain=4.0, guard=True, gates=CTC_GATES)
    code, output = _run(recipe)
    assert code == 0, output
    m = _metrics(recipe)["outputs"]["logits"]
    # Recomputed from the artifact's models: float and NPU-emulated quantized, decoded here.
    run = recipe.parent / "run_ctc_ok" / "artifact"
    ref, got = make_session(run / "model.float.onnx"), make_session(run / "model.onnx", npu_emulation=True)
    x = np.load(tmp_path / "ctc_ok_val.npz")["features"]
    a = np.concatenate([ref.run(None, {"features": s[None]})[0] for s in x])
    b = np.concatenate([got.run(None, {"features": s[None]})[0] for s in x])
    expected = 100.0 * np.mean([p == q for p, q in zip(_decode(a), _decode(b))])
    assert m["string_agreement"] == pytest.approx(expected)
    real = a.argmax(-1) != 0
    assert m["nonblank_steps"] == int(real.sum()) > 0
    assert m["nonblank_agreement"] == pytest.approx(100.0 * (a.argmax(-1) == b.argmax(-1))[real].mean())


def test_broken_ctc_recognizer_fails_its_gates_where_step_agreement_and_sqnr_pass(tmp_path: Path):
    """The OCR recognizer of the issue: the blank swing (+-40) sets the int8 step (0.31), character logits
    0.1 apart fall into one step. Most steps are blank, so step agreement and SQNR still pass."""
    recipe = _ctc(tmp_path, "ctc_broken", margin=0.1, blank_gain=40.0, guard=False, gates=CTC_GATES)
    code, output = _run(recipe)
    assert code == 4, output
    gates = {g["metric"]: g for g in _manifest(recipe)["gates"]}
    assert gates["step_agreement"]["passed"] and gates["sqnr_db"]["passed"]
    assert not gates["nonblank_agreement"]["passed"] and not gates["string_agreement"]["passed"]
    assert gates["string_agreement"]["value"] < 50.0


def test_range_guard_repairs_the_broken_recognizer(tmp_path: Path):
    """The same model with the guard on: the Concat of blank (range 40) and characters (0.1) is found from
    the calibration histograms, its output goes to 16 bits, the gates hold."""
    recipe = _ctc(tmp_path, "ctc_guard", margin=0.1, blank_gain=40.0, guard=True, gates=CTC_GATES)
    code, output = _run(recipe)
    assert code == 0, output
    (finding,) = _manifest(recipe)["range_guard"]["findings"]
    assert finding["kind"] == "concat" and finding["tensor"] == "logits" and finding["action"] == "16-bit"


# ------------------------------------------------------------------ one tensor, two ranges, no Concat

def _keypoints(tmp_path: Path, name: str, *, guard: bool) -> Path:
    model = export_keypoint_head(tmp_path / "keypoints.onnx")
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (40, 3, 8, 8)).astype(np.float32)
    return write_recipe(tmp_path, name, model, "image", [1, 3, 8, 8], x[:24], x[24:],
                        validation={"task": "regression"}, quantization={"range_guard": {"enabled": guard}},
                        gates=[{"metric": "sqnr_db", "min": 30.0}])


def test_output_channel_groups_of_different_ranges_are_found_per_channel(tmp_path: Path):
    """Pixels (0..320) in channel 0 beside scores in channels 1-2 of one conv output: int8 rounds the
    scores to a constant (dead channels, exit 4) while the SQNR reads high; the guard finds the channel
    groups from per-channel calibration statistics of the output and keeps it at 16 bits."""
    code, output = _run(_keypoints(tmp_path, "kp_noguard", guard=False))
    assert code == 4 and "dead_channels of output 'keypoints'" in output, output
    before = _metrics(tmp_path / "kp_noguard.yaml")["outputs"]["keypoints"]
    assert before["sqnr_db"] >= 30.0 and before["dead_channels"] >= 1 and before["sqnr_db_worst_channel"] < 1.0
    recipe = _keypoints(tmp_path, "kp_guard", guard=True)
    code, output = _run(recipe)
    assert code == 0, output
    (finding,) = _manifest(recipe)["range_guard"]["findings"]
    assert finding["kind"] == "channels" and finding["small"] == "axis 1, channels 1-2"
    assert finding["action"] == "16-bit" and finding["op_type"] == "Add"
    keypoints = _metrics(recipe)["outputs"]["keypoints"]
    assert keypoints["dead_channels"] == 0 and keypoints["sqnr_db_worst_channel"] >= 20.0


# ------------------------------------------------------------------------------------- dense map

def test_dense_map_iou_of_thresholded_maps(tmp_path: Path):
    model = export_map_net(tmp_path / "map.onnx")
    recipe = write_recipe(tmp_path, "dense", model, "image", [1, 1, 16, 16], blob_images(24, 1), blob_images(16, 2),
                          validation={"outputs": {"prob_map": {"task": "dense", "threshold": 0.3}}},
                          gates=[{"metric": "map_iou", "min": 90.0}, {"metric": "map_iou_min", "min": 80.0}])
    code, output = _run(recipe)
    assert code == 0, output
    m = _metrics(recipe)["outputs"]["prob_map"]
    run = recipe.parent / "run_dense" / "artifact"
    ref, got = make_session(run / "model.float.onnx"), make_session(run / "model.onnx", npu_emulation=True)
    x = np.load(tmp_path / "dense_val.npz")["image"]
    a = np.concatenate([ref.run(None, {"image": s[None]})[0] for s in x]) > 0.3
    b = np.concatenate([got.run(None, {"image": s[None]})[0] for s in x]) > 0.3
    assert m["map_iou"] == pytest.approx(100.0 * (a & b).sum() / (a | b).sum())
    assert m["float_positive_share"] > 5.0  # the maps have regions to compare
    assert m["channels"] == 1 and m["dead_channels"] == 0  # a single-channel map is still checked


# ------------------------------------------------------------------------- per-position classes, ArgMax

def _seqcls(tmp_path: Path, gates: list, **validation) -> Path:
    model = sequence_classifier(tmp_path / "seqcls.onnx")
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (40, 6, 4)).astype(np.float32)
    return write_recipe(tmp_path, "seqcls", model, "x", [1, 6, 4], x[:24], x[24:], validation=validation, gates=gates)


def test_every_output_by_name_integer_exact_classes_per_position_gates_per_output(tmp_path: Path):
    recipe = _seqcls(tmp_path, [
        {"metric": "top1_agreement", "min": 80.0},  # the task output (logits)
        {"metric": "exact_agreement", "output": "label", "min": 80.0},
        {"metric": "rel_error", "output": "score2", "max": 0.5},
    ], outputs={"logits": {"task": "classification", "axis": -1}})
    code, output = _run(recipe)
    assert code == 0, output
    metrics = _metrics(recipe)
    assert set(metrics["outputs"]) == {"logits", "label", "score2"} and metrics["task_output"] == "logits"
    label, score, logits = (metrics["outputs"][k] for k in ("label", "score2", "logits"))
    assert label["dtype"] == "int64" and "sqnr_db" not in label and "cosine_mean" not in label
    assert "cosine_mean" not in score and "rel_error" in score  # one value per sample: no cosine
    assert logits["positions"] == 16 * 6 and logits["class_axis"] == 2
    # Recomputed: per-position agreement of the logits, exact agreement of the int64 ArgMax output.
    run = recipe.parent / "run_seqcls" / "artifact"
    ref, got = make_session(run / "model.float.onnx"), make_session(run / "model.onnx", npu_emulation=True)
    x = np.load(tmp_path / "seqcls_val.npz")["x"]
    a = [ref.run(None, {"x": s[None]}) for s in x]
    b = [got.run(None, {"x": s[None]}) for s in x]
    top_a = np.concatenate([r[0].argmax(-1) for r in a])
    top_b = np.concatenate([r[0].argmax(-1) for r in b])
    assert logits["top1_agreement"] == pytest.approx(100.0 * (top_a == top_b).mean())
    exact = np.concatenate([r[1] for r in a]) == np.concatenate([r[1] for r in b])
    assert label["exact_agreement"] == pytest.approx(100.0 * exact.mean())
    manifest = _manifest(recipe)
    assert [(g["output"], g["metric"]) for g in manifest["gates"]][:3] == [
        ("logits", "top1_agreement"), ("label", "exact_agreement"), ("score2", "rel_error")]


def test_gate_on_a_missing_output_is_rejected_by_check_and_before_validation_runs(tmp_path: Path):
    recipe = _seqcls(tmp_path, [{"metric": "sqnr_db", "output": "boxes", "min": 20.0}])
    result = runner.invoke(app, ["check", str(recipe)])
    assert result.exit_code == 2 and "gates.0.output: the model has no output 'boxes'" in result.output
    assert "logits, label, score2" in result.output
    code, output = _run(recipe)
    assert code == 2 and "no output 'boxes'" in output
    assert not (recipe.parent / "run_seqcls" / "validate").exists()


def test_gate_metric_the_output_cannot_report_is_rejected_by_check(tmp_path: Path):
    recipe = _seqcls(tmp_path, [{"metric": "sqnr_db", "output": "label", "min": 20.0}])  # int64: exact only
    assert runner.invoke(app, ["check", str(recipe)]).exit_code == 0  # dtype known once the model runs
    code, output = _run(recipe)
    assert code == 2 and "'sqnr_db' is not measured for output 'label'" in output and "int64" in output
    recipe = _seqcls(tmp_path, [{"metric": "boxes_matched", "min": 50.0}],
                     outputs={"logits": {"task": "classification"}})
    result = runner.invoke(app, ["check", str(recipe)])
    assert result.exit_code == 2 and "'boxes_matched' is not measured for task 'classification' (the task output" in result.output
