"""The task registry and the per-output evaluator on arrays whose answers are known by construction;
gates per output, metrics the data cannot give, the dead-channel gate and its waiver; the recipe syntax."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from pipeline.core.tasks import OutputEvaluator, known_metrics, plan_outputs, task_kinds
from pipeline.core.tasks.ctc import CtcSettings, ctc_greedy_decode, edit_distance
from pipeline.core.tasks.classification import ClassificationSettings
from pipeline.core.tasks.detection import DetectionSettings, decode_detections, match_boxes
from pipeline.core.tasks.dense import DenseSettings
from pipeline.core.tasks.regression import RegressionSettings
from pipeline.errors import RecipeError
from pipeline.gates import evaluate_gates
from pipeline.recipe import Gate, recipe_from_dict

from .conftest import RECIPES


def _stream(settings, refs, gots, labels=None, name="y"):
    ev = OutputEvaluator(name, settings)
    for r, g in zip(refs, gots):
        ev.update(r, g)
    return ev.result(labels)


def test_the_builtin_tasks_are_registered():
    assert list(task_kinds()) == ["classification", "embedding", "regression", "detection", "ctc", "dense"]
    assert "boxes_matched" in known_metrics("detection") and "sqnr_db" in known_metrics("detection")
    assert "boxes_matched" not in known_metrics("ctc")


def test_classification_takes_one_argmax_per_position_not_one_over_the_flattened_tensor():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, (10, 1, 8, 5)).astype(np.float32)
    got = ref.copy()
    got[:, :, 0] = np.roll(got[:, :, 0], 1, axis=-1)  # position 0 of every sample disagrees (almost surely)
    m = _stream(ClassificationSettings(), ref, got)
    per_position = (ref.argmax(-1) == got.argmax(-1)).mean() * 100
    assert m["class_axis"] == 2 and m["positions"] == 80
    assert m["top1_agreement"] == pytest.approx(per_position) and 85.0 <= m["top1_agreement"] < 100.0


def test_classification_confident_positions_and_labels():
    ref = np.array([[[4.0, 0.0, 0.0]], [[0.1, 0.0, 0.05]], [[0.0, 3.0, 0.0]], [[0.0, 0.1, 0.12]]], np.float32)
    got = np.array([[[4.0, 0.0, 0.0]], [[0.0, 0.1, 0.0]], [[3.0, 0.0, 0.0]], [[0.0, 0.12, 0.1]]], np.float32)
    m = _stream(ClassificationSettings(confidence=0.5), ref, got, labels=np.array([0, 0, 1, 2]))
    # Confident (softmax top-1 > 0.5): samples 0 and 2; sample 2 disagrees.
    assert m["confident_share"] == 50.0 and m["top1_agreement_confident"] == 50.0
    assert m["top1_agreement"] == 25.0
    assert (m["accuracy_float"], m["accuracy"]) == (100.0, 25.0)
    unsure = _stream(ClassificationSettings(confidence=0.99), ref, got)
    assert "top1_agreement_confident" not in unsure and "top1_agreement_confident" in unsure["not_measured"]


def test_integer_outputs_are_compared_exactly_and_get_no_sqnr():
    ref = np.array([[1, 2, 3], [0, 0, 1]], np.int64)[:, None]
    got = np.array([[1, 2, 0], [0, 0, 1]], np.int64)[:, None]
    m = _stream(None, ref, got)
    assert m["exact_agreement"] == pytest.approx(100 * 5 / 6) and m["sample_agreement"] == 50.0
    assert not {"sqnr_db", "cosine_mean", "dead_channels"} & set(m)


def test_a_single_value_output_gets_no_cosine_but_a_relative_error():
    ref = np.array([[[1.0]], [[2.0]], [[-1.0]]], np.float32)
    got = ref * 1.1
    m = _stream(None, ref, got)
    assert "cosine_mean" not in m and m["rel_error"] == pytest.approx(0.1, rel=1e-5)


def test_dead_channels_are_constant_when_quantized_and_varying_in_float():
    rng = np.random.default_rng(1)
    ref = rng.uniform(0, 1, (20, 1, 8, 10)).astype(np.float32)  # channels on axis 1: 0-3 boxes, 4-7 scores
    ref[:, :, :4] *= 300
    got = ref.copy()
    got[:, :, 4:] = 0.0  # the scores rounded away
    got[:, :, 0] += 0.5
    ref[:, :, 5] = 0.25  # a float-constant channel is not dead, quantized constant or not
    ref[:, :, 7] = rng.uniform(-1e-33, 1e-33, ref[:, :, 7].shape)  # float noise: silent, not dead, not worst
    m = _stream(RegressionSettings(channel_axis=1), ref, got)
    assert m["channel_axis"] == 1 and m["channels"] == 8 and m["silent_channels"] == 1
    assert m["dead_channels"] == 2 and m["dead_channel_list"] == "4, 6"
    assert m["sqnr_db"] > 25 and m["sqnr_db_worst_channel"] == 0.0
    assert _stream(None, ref, got)["channel_axis"] == 2  # rank 3 by default: the last axis


def test_ctc_decode_and_metrics():
    assert ctc_greedy_decode(np.array([0, 3, 3, 0, 3, 1, 1, 0]), blank=0) == (3, 3, 1)
    assert edit_distance((1, 2, 3), (1, 3)) == 1 and edit_distance((), (1, 2)) == 2
    eye = np.eye(4, dtype=np.float32)
    ref = eye[[0, 2, 2, 0, 3, 0, 0, 1]][None]  # decodes to (2, 3, 1)
    got = eye[[0, 2, 2, 0, 2, 0, 0, 1]][None]  # decodes to (2, 2, 1): one substitution
    m = _stream(CtcSettings(), [ref, ref], [got, ref])
    assert m["step_agreement"] == pytest.approx(100 * 15 / 16) and m["nonblank_steps"] == 8
    assert m["nonblank_agreement"] == pytest.approx(100 * 7 / 8) and m["string_agreement"] == 50.0
    assert m["char_error_rate"] == pytest.approx(100 * 1 / 6)


def test_detection_decode_nms_and_matching():
    s = DetectionSettings(score_threshold=0.3, nms_iou=0.5)
    # anchors x [cx, cy, w, h, class0, class1]
    pred = np.array([
        [50, 50, 20, 20, 0.9, 0.1],  # kept
        [52, 50, 20, 20, 0.8, 0.1],  # same class, IoU 0.82 with the first: suppressed
        [52, 50, 20, 20, 0.1, 0.7],  # other class: kept
        [150, 150, 10, 10, 0.2, 0.1],  # below threshold
    ], np.float32)
    boxes, classes, scores = decode_detections(pred, s)
    assert classes.tolist() == [0, 1] and scores.tolist() == pytest.approx([0.9, 0.7])
    assert boxes[0].tolist() == [40, 40, 60, 60]
    moved = pred.copy()
    moved[2, 4:] = [0.7, 0.1]  # the second box changes class: no longer matched
    assert match_boxes((boxes, classes, scores), decode_detections(moved, s), 0.5) == 1
    m = _stream(s, [pred.T[None]], [moved.T[None]])
    assert (m["float_boxes"], m["quantized_boxes"], m["boxes_matched"]) == (2, 1, 50.0)
    assert m["channel_axis"] == 1


def test_dense_map_iou():
    ref = np.zeros((1, 1, 4, 4), np.float32)
    ref[..., :2, :] = 0.9  # 8 pixels in
    got = np.zeros_like(ref)
    got[..., :1, :] = 0.9  # 4 of them
    m = _stream(DenseSettings(threshold=0.5), [ref], [got])
    assert m["map_iou"] == 50.0 and m["pixel_agreement"] == 75.0 and m["map_iou_min"] == 50.0


def test_plan_outputs_legacy_and_per_output():
    plan = plan_outputs(["a", "b"], {}, output=None, task="embedding")
    assert plan.task_output == "a" and plan.task == "embedding" and plan.settings["b"] is None
    plan = plan_outputs(["a", "b"], {"b": DenseSettings()}, output="b", task="classification")
    assert plan.task_output == "b" and plan.task == "dense"
    with pytest.raises(RecipeError, match="no output 'c'"):
        plan_outputs(["a", "b"], {"c": DenseSettings()}, output=None, task="classification")
    with pytest.raises(RecipeError, match="give the task once"):
        plan_outputs(["a"], {"a": DenseSettings()}, output=None, task="classification", task_given=True)


# ---------------------------------------------------------------------------------------------- gates

METRICS = {"task_output": "pred", "outputs": {
    "pred": {"task": "detection", "dtype": "float32", "sqnr_db": 25.9, "dead_channels": 80, "channels": 84,
             "channel_axis": 1, "dead_channel_list": "4-83", "sqnr_db_worst_channel": 0.0, "float_boxes": 0,
             "not_measured": {"boxes_matched": "the float model detects no box"}},
    "label": {"task": None, "dtype": "int64", "exact_agreement": 99.0},
}}


def test_gate_on_an_unmeasurable_metric_fails_with_the_reason():
    (result, dead) = evaluate_gates([Gate(metric="boxes_matched", min=50)], METRICS)
    assert not result.passed and result.value is None and "detects no box" in result.describe()
    assert not dead.passed and dead.default and "4-83" in dead.note and "allow_dead_channels" in dead.note


def test_gates_read_their_output_and_reject_what_it_cannot_report():
    (result, _) = evaluate_gates([Gate(metric="exact_agreement", output="label", min=98)], METRICS)
    assert result.passed and result.output == "label"
    with pytest.raises(RecipeError, match="'sqnr_db' is not measured for output 'label'"):
        evaluate_gates([Gate(metric="sqnr_db", output="label", min=20)], METRICS)
    with pytest.raises(RecipeError, match="no output 'boxes'"):
        evaluate_gates([Gate(metric="sqnr_db", output="boxes", min=20)], METRICS)


def test_the_dead_channel_gate_is_waived_only_with_a_reason():
    data = yaml.safe_load((RECIPES / "digits_cnn.yaml").read_text())
    data["validation"]["outputs"] = {"pred": {"task": "detection", "allow_dead_channels": "class 3 is unused"}}
    data["validation"]["output"] = "pred"
    del data["validation"]["task"]
    data["gates"] = []
    recipe = recipe_from_dict(data)
    (dead,) = evaluate_gates([], METRICS, validation=recipe.validation)
    assert dead.passed and "waived: class 3 is unused" in dead.note
    data["validation"]["outputs"]["pred"]["allow_dead_channels"] = ""
    with pytest.raises(RecipeError, match="allow_dead_channels"):
        recipe_from_dict(data)


# ---------------------------------------------------------------------------------------------- recipe

def _recipe(**validation):
    data = yaml.safe_load((RECIPES / "digits_cnn.yaml").read_text())
    data["validation"].update(validation)
    return data


def test_recipe_per_output_sections_and_gate_outputs():
    data = _recipe(outputs={"boxes": {"task": "detection", "layout": "channels_last", "objectness": True},
                            "text": {"task": "ctc", "blank": 95}})
    del data["validation"]["task"]
    data["gates"] = [{"metric": "boxes_matched", "min": 90}, {"metric": "string_agreement", "output": "text", "min": 80}]
    recipe = recipe_from_dict(data)
    assert recipe.validation.task_output_name() == "boxes"
    assert recipe.validation.outputs["text"].blank == 95 and recipe.gates[1].output == "text"


@pytest.mark.parametrize("change, fragment", [
    ({"outputs": {"y": {"task": "detect"}}}, "validation.outputs.y: unknown task 'detect'"),
    ({"outputs": {"y": {"blank": 0}}}, "validation.outputs.y: 'task' is missing"),
    ({"outputs": {"y": {"task": "ctc", "nms_iou": 0.5}}}, "validation.outputs.y.nms_iou: unknown key"),
    ({"outputs": {"y": {"task": "detection", "nms_iou": 2}}}, "validation.outputs.y.nms_iou"),
    ({"output": "y", "outputs": {"y": {"task": "ctc"}}}, "task 'classification' and outputs.y.task 'ctc' disagree"),
])
def test_recipe_output_errors_name_the_field(change, fragment):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(_recipe(**change), source="r.yaml")
    assert fragment in str(err.value)


def test_recipe_gate_on_a_metric_its_output_cannot_report_is_rejected_at_load():
    data = _recipe(outputs={"text": {"task": "ctc"}})
    data["gates"] = [{"metric": "boxes_matched", "output": "text", "min": 50}]
    with pytest.raises(RecipeError, match=r"gates.0.metric: 'boxes_matched' is not measured for task 'ctc' \(output 'text'"):
        recipe_from_dict(data)


def test_detection_channels_last_with_objectness_and_corner_boxes():
    s = DetectionSettings(layout="channels_last", box_format="xyxy", objectness=True, box_coords=5,
                          score_threshold=0.3)
    # anchors x [x1, y1, x2, y2, angle (ignored), objectness, class0, class1]
    pred = np.array([[0, 0, 10, 10, 0.3, 0.9, 0.9, 0.1],    # score 0.81, class 0
                     [20, 20, 30, 30, 0.1, 0.4, 0.9, 0.2]],  # 0.36, class 0
                    np.float32)
    boxes, classes, scores = decode_detections(pred, s)
    assert boxes.tolist() == [[0, 0, 10, 10], [20, 20, 30, 30]] and scores.tolist() == pytest.approx([0.81, 0.36])
    dim = pred.copy()
    dim[1, 5] = 0.2  # objectness down: 0.18, below the threshold
    m = _stream(s, [pred[None]], [dim[None]])
    assert (m["float_boxes"], m["quantized_boxes"], m["boxes_matched"], m["boxes_precision"]) == (2, 1, 50.0, 100.0)
    assert m["channel_axis"] == 2


def test_dead_channel_gate_fails_an_output_but_waives_a_recurrent_state():
    """A state fed back to the model is judged through the outputs it feeds: reported, not gated."""
    dead = {"dead_channels": 2, "channels": 128, "channel_axis": 2, "dead_channel_list": [70, 78],
            "sqnr_db_worst_channel": 19.7}
    metrics = {"outputs": {"y": dict(dead), "stateN": dict(dead)}}
    results = {r.output: r for r in evaluate_gates([], metrics, states={"stateN": "state"})}
    assert not results["y"].passed and "fix:" in results["y"].note
    assert results["stateN"].passed and "recurrent state fed back to input 'state'" in results["stateN"].note


def test_an_ungated_ctc_dense_or_detection_output_keeps_a_default_task_floor():
    """No recipe gate on a recognizer's output: its task is still held to half the float model's
    characters (PP-OCR's recognizer in A8W8 once read 4.5% of them with no dead channel); a recipe gate
    on the output, any metric, replaces the floor."""
    metrics = {"task_output": "text", "outputs": {
        "text": {"task": "ctc", "nonblank_agreement": 4.5, "string_agreement": 0.0},
        "maps": {"task": "dense", "map_iou": 93.2},
        "boxes": {"task": "detection", "not_measured": {"boxes_matched": "the float model detects no box"}},
        "logits": {"task": "classification", "top1_agreement": 10.0},
    }}
    results = {r.output: r for r in evaluate_gates([], metrics)}
    assert set(results) == {"text", "maps"}  # none where unmeasurable; classification has no floor
    text = results["text"]
    assert not text.passed and text.default and text.metric == "nonblank_agreement" and "below 50%" in text.note
    assert results["maps"].passed and results["maps"].min == 50.0
    own = evaluate_gates([Gate(metric="string_agreement", min=0)], metrics)  # the recipe's own gate on it
    assert [r.output for r in own] == ["text", "maps"] and own[0].passed
