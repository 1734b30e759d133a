"""Real OCR models through the pipeline as a new user runs them: PP-OCR's recognizer and direction
classifier with their trained weights (`pipeline.models.ppocr`, from the rapidocr-onnxruntime wheel),
an ONNX file next to a recipe written from the README, on rendered text lines
(`pipeline.models.text_lines`).

Before prepare folded the learnable affine blocks and fused the four-op hardswish, and before the family
check counted MACs, the recognizer in A8W8 matched 3% of the float model's characters (CER 96%)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.onnx_io import make_session
from pipeline.core.tasks.ctc import ctc_greedy_decode, edit_distance
from pipeline.models.ppocr import characters, model_path
from pipeline.models.text_lines import line_texts, text_lines
from pipeline.quant.presets import model_family

from .test_formats import check_artifact


def test_the_rendered_lines_are_text_the_float_recognizer_reads():
    session = make_session(model_path("rec"))
    alphabet = characters()
    texts = line_texts("validation", count=16)
    read = ["".join(alphabet[k] for k in ctc_greedy_decode(session.run(None, sample)[0][0].argmax(-1), blank=0))
            for sample in text_lines("validation", count=16)]
    errors = sum(edit_distance(tuple(r), tuple(t)) for r, t in zip(read, texts)) / sum(len(t) for t in texts)
    assert errors < 0.05, list(zip(read, texts))


def _recipe(tmp_path: Path, kind: str, shape: list[int], builder: str, count: int, validation: dict,
            gates: list[dict], **quantization) -> Path:
    shutil.copy(model_path(kind), tmp_path / f"{kind}.onnx")
    data = lambda split, n: {"kind": "builder", "builder": f"pipeline.models.text_lines:{builder}",  # noqa: E731
                             "args": {"split": split, "count": n, "width": shape[3]}}
    recipe = {
        "name": f"ppocr_{kind}", "model": {"onnx": f"{kind}.onnx"},
        "inputs": [{"name": "x", "shape": shape, "dtype": "float32"}],
        "calibration": {"data": data("calibration", count), "samples": count},
        "validation": {"data": data("validation", 24), **validation},
        "quantization": {"target": "xdna2", "format": "a8w8", **quantization},
        "gates": gates, "output": f"out_{kind}",
    }
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _run(recipe: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["run", str(recipe), "--quiet"])
    return result.exit_code, result.output


def test_direction_classifier_a8w8(tmp_path: Path):
    recipe = _recipe(tmp_path, "cls", [1, 3, 48, 192], "rotated_text_lines", 32, {"task": "classification"},
                     [{"metric": "top1_agreement", "min": 95}])
    code, output = _run(recipe)
    assert code == 0, output
    out = tmp_path / "out_cls"
    metrics = json.loads((out / "validate" / "metrics.json").read_text())
    assert metrics["top1_agreement"] >= 95 and metrics["accuracy"] >= 90, metrics  # upright vs turned, labelled
    summary = check_artifact(out / "artifact", "xdna2", "a8w8")
    assert summary["npu_mac_share"] == 1.0


@pytest.mark.slow
def test_ctc_recognizer_a8w8_holds_and_a_broken_conversion_fails_its_gates(tmp_path: Path):
    # It reads 96.9% of the non-blank steps at CER 1.9% (AdaRound on quantized inputs; 90% and 3.7% on float
    # inputs): the gates leave a margin for other CPUs and fail a recognizer that stops reading.
    gates = [{"metric": "nonblank_agreement", "min": 88}, {"metric": "char_error_rate", "max": 6}]
    task = {"outputs": {"softmax_11.tmp_0": {"task": "ctc", "blank": 0}}}
    recipe = _recipe(tmp_path, "rec", [1, 3, 48, 320], "text_lines", 48, task, gates)
    code, output = _run(recipe)
    assert code == 0, output
    out = tmp_path / "out_rec"
    prepare = json.loads((out / "prepare" / "stage.json").read_text())["metrics"]
    # paddle2onnx's four-op hardswish fused, the learnable affine blocks folded into the convolutions
    assert prepare["hard_activations_fused"]["hardswish"] >= 20, prepare
    assert sum(prepare["affine_folded_into_conv"].values()) >= 60, prepare
    assert model_family(onnx.load(str(out / "prepare" / "model.onnx"))) == "cnn"  # an attention neck, conv MACs
    metrics = json.loads((out / "validate" / "metrics.json").read_text())["outputs"]["softmax_11.tmp_0"]
    assert metrics["nonblank_agreement"] >= 88 and metrics["char_error_rate"] <= 6, metrics
    assert check_artifact(out / "artifact", "xdna2", "a8w8")["npu_mac_share"] == 1.0
    print(f"PP-OCRv4 recognizer A8W8: non-blank agreement {metrics['nonblank_agreement']:.1f}%, "
          f"strings {metrics['string_agreement']:.1f}%, CER {metrics['char_error_rate']:.1f}%")

    # Without the CNN techniques (preset none) the recognizer reads nothing: its task gates fail the run.
    broken = _recipe(tmp_path, "rec", [1, 3, 48, 320], "text_lines", 48, task, gates, preset="none")
    code, output = _run(broken)
    assert code == 4 and "char_error_rate" in output, output
