"""`npu-pipeline init`: a recipe that `check` and `run` accept as written.

- the digits CNN (trained weights, exported here with a dynamic batch) and a folder of PNG digits written
  from scikit-learn's bundled digits: init, check, run; exit 0 with an artifact;
- (slow) MobileNetV2 with ImageNet weights exported to ONNX and a folder of PNGs written from the photos
  shipped with scikit-image and scikit-learn: init then run gives an artifact, every gate held;
- the data kinds init recognises (npz with labels, WAV folder, nothing), a builder entry point, and an
  existing file it will not overwrite.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app

from .conftest import ROOT
from .test_intake import write_wav

torch = pytest.importorskip("torch")


def _invoke(args: list[str], cwd: Path):
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, args)
    finally:
        os.chdir(old)


def _export(module, example, path: Path, names=("image", "logits"), opset: int = 17) -> None:
    torch.onnx.export(module.eval(), example, str(path), input_names=[names[0]], output_names=[names[1]],
                      opset_version=opset, dynamo=False, dynamic_axes={names[0]: {0: "batch"}, names[1]: {0: "batch"}})


@pytest.fixture()
def digits_project(tmp_path: Path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    from pipeline.models.digits import build

    module, example = build(str(ROOT / "models" / "digits_cnn.pt"))
    _export(module, example, tmp_path / "digits.onnx")
    folder = tmp_path / "digit_pngs"
    folder.mkdir()
    images = load_digits().images
    for i in range(40):  # as a user would have them: 8-bit PNGs at the model's 32 x 32
        pixels = (images[-1 - i] / 16 * 255).round().astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32), Image.Resampling.BILINEAR).save(folder / f"digit_{i:02d}.png")
    return tmp_path


def test_init_then_run_on_an_onnx_digit_classifier(digits_project: Path):
    result = _invoke(["init", "digits.onnx", "--data", "digit_pngs"], digits_project)
    assert result.exit_code == 0, result.output
    recipe = digits_project / "digits.yaml"
    text = recipe.read_text()
    data = yaml.safe_load(text)
    assert data["inputs"] == [{"name": "image", "shape": [1, 1, 32, 32], "dtype": "float32"}]
    assert data["calibration"]["data"] == {"kind": "images", "path": "digit_pngs", "size": [32, 32], "layout": "nchw",
                                           "resize": "stretch", "channels": "gray", "scale": 1 / 255,
                                           "split": {"seed": 0, "validation": 0.3}}
    assert data["validation"]["task"] == "classification" and data["quantization"] == {"target": "xdna2", "format": "a8w8"}
    assert [g["metric"] for g in data["gates"]] == ["top1_agreement", "sqnr_db"]
    assert "# Still to decide:" in text and "DECIDE" in text and "decide: validation.task" in result.stdout

    check = _invoke(["check", "digits.yaml"], digits_project)
    assert check.exit_code == 0, check.output
    assert "calibration: digit_pngs/ (28 images)" in check.stdout and "validation: digit_pngs/ (12 images)" in check.stdout
    run = _invoke(["run", "digits.yaml", "--quiet"], digits_project)
    assert run.exit_code == 0, run.output
    metrics = json.loads((digits_project / "build/digits/artifact/manifest.json").read_text())["metrics"]
    assert metrics["samples"] == 12 and metrics["top1_agreement"] >= 90
    print(f"digits from init: top-1 agreement {metrics['top1_agreement']:.1f}%, SQNR {metrics['sqnr_db']:.2f} dB")

    again = _invoke(["init", "digits.onnx", "--data", "digit_pngs"], digits_project)
    assert again.exit_code == 2 and "exists" in again.stderr and "--force" in again.stderr


@pytest.mark.slow
def test_init_then_run_on_mobilenet_v2_onnx_and_photos(tmp_path: Path):
    from PIL import ImageOps

    from pipeline.models.mobilenet_v2 import build
    from pipeline.models.photo_crops import PHOTOS, load_photo

    module, example = build()
    _export(module, example, tmp_path / "mobilenet_v2.onnx", names=("pixel_values", "logits"), opset=13)
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:  # each photo (at most 512 px) and its mirror, its centre square and that one's mirror
        photo = load_photo(name)
        photo.thumbnail((512, 512))
        w, h = photo.size
        side = min(w, h)
        square = photo.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        for tag, image in (("full", photo), ("mirror", ImageOps.mirror(photo)), ("square", square),
                           ("square_mirror", ImageOps.mirror(square))):
            image.save(folder / f"{name}_{tag}.png")
    result = _invoke(["init", "mobilenet_v2.onnx", "--data", "photos", "-o", "mnv2.yaml"], tmp_path)
    assert result.exit_code == 0, result.output
    data = yaml.safe_load((tmp_path / "mnv2.yaml").read_text())
    assert data["calibration"]["data"]["resize"] == "center_crop"
    assert data["calibration"]["data"]["mean"] == [0.485, 0.456, 0.406] and data["inputs"][0]["shape"] == [1, 3, 224, 224]
    run = _invoke(["run", "mnv2.yaml", "--quiet"], tmp_path)
    assert run.exit_code == 0, run.output
    assert (tmp_path / "build/mobilenet_v2/artifact/model.onnx").is_file()
    metrics = json.loads((tmp_path / "build/mobilenet_v2/artifact/manifest.json").read_text())["metrics"]
    print(f"MobileNetV2 A8W8 from init: top-1 agreement {metrics['top1_agreement']:.1f}%, SQNR {metrics['sqnr_db']:.2f} dB")


def test_init_recognises_data_kinds_and_builders(tmp_path: Path):
    module = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    _export(module, (torch.randn(1, 6),), tmp_path / "mlp.onnx", names=("features", "scores"))
    np.savez(tmp_path / "table.npz", rows=np.zeros((10, 1, 6), np.float32), label=np.zeros(10, np.int64))
    result = _invoke(["init", "mlp.onnx", "--data", "table.npz", "-o", "mlp.yaml"], tmp_path)
    assert result.exit_code == 0, result.output
    data = yaml.safe_load((tmp_path / "mlp.yaml").read_text())
    assert data["calibration"]["data"] == {"kind": "npz", "path": "table.npz", "arrays": {"features": "rows"},
                                           "labels": "label", "split": {"seed": 0, "validation": 0.3}}
    assert _invoke(["run", "mlp.yaml", "--quiet"], tmp_path).exit_code == 0

    wavs = tmp_path / "wavs"
    wavs.mkdir()
    write_wav(wavs / "a.wav", np.zeros(16000), 16000)
    conv = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 9, stride=4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    conv(torch.zeros(1, 1, 400))
    _export(conv, (torch.zeros(1, 1, 400),), tmp_path / "kws.onnx", names=("audio", "scores"))
    assert _invoke(["init", "kws.onnx", "--data", "wavs"], tmp_path).exit_code == 0
    audio = yaml.safe_load((tmp_path / "kws.yaml").read_text())["calibration"]["data"]
    assert audio["kind"] == "audio" and audio["window"] == 400

    bare = _invoke(["init", "mlp.onnx", "-o", "bare.yaml"], tmp_path)
    assert bare.exit_code == 0 and "no --data given" in bare.stdout
    assert yaml.safe_load((tmp_path / "bare.yaml").read_text())["calibration"]["data"]["path"] == "CHANGE_ME.npz"

    (tmp_path / "tiny_builder.py").write_text(
        "import torch\n\ndef build():\n    torch.manual_seed(0)\n"
        "    return torch.nn.Linear(5, 2).eval(), (torch.randn(1, 5),)\n")
    builder = _invoke(["init", "tiny_builder:build", "--data", "table.npz", "-o", "tb.yaml"], tmp_path)
    assert builder.exit_code == 0, builder.output
    assert yaml.safe_load((tmp_path / "tb.yaml").read_text())["inputs"] == [{"name": "input", "shape": [1, 5], "dtype": "float32"}]


def test_init_then_run_on_a_streaming_audio_model(tmp_path: Path):
    """Silero-VAD-shaped ONNX (dynamic batch and length, a state [2, batch, 128] returned as `stateN`, a
    scalar int64 sample rate) and a folder of WAV files: init declares the state and the constant, run passes."""
    from .test_intake import TinyVad, _clips

    torch.manual_seed(0)
    example = (torch.randn(1, 512), torch.zeros(2, 1, 128), torch.tensor(16000))
    torch.onnx.export(TinyVad().eval(), example, str(tmp_path / "vad.onnx"), input_names=["input", "state", "sr"],
                      output_names=["output", "stateN"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "batch", 1: "samples"}, "state": {1: "batch"}, "stateN": {1: "batch"}})
    _clips(tmp_path / "clips")
    result = _invoke(["init", "vad.onnx", "--data", "clips"], tmp_path)
    assert result.exit_code == 0, result.output
    inputs = yaml.safe_load((tmp_path / "vad.yaml").read_text())["inputs"]
    assert inputs == [{"name": "input", "shape": [1, 16000], "dtype": "float32"},
                      {"name": "state", "shape": [2, 1, 128], "dtype": "float32", "from_output": "stateN"},
                      {"name": "sr", "shape": [], "dtype": "int64", "value": 16000}]
    assert "taken for a recurrent state" in result.stdout and "taken for the sample rate" in result.stdout
    run = _invoke(["run", "vad.yaml", "--quiet"], tmp_path)
    assert run.exit_code == 0, run.output
    # verify agrees with run on the bundle: the state [2, 1, 128] is no batch of 2 for the NPU rules.
    artifacts = [p for p in tmp_path.glob("**/artifact") if (p / "manifest.json").is_file()]
    verified = _invoke(["verify", str(artifacts[0])], tmp_path)
    assert verified.exit_code == 0, verified.output


def test_init_guesses_recognizer_and_text_map_tasks_and_leaves_the_range_method_to_the_preset(tmp_path: Path):
    """A `[N, T, C]` softmax is a CTC recognizer and a `[N, 1, H, W]` sigmoid a text detector's map: init
    names those tasks and gates that fail when the task breaks (an SQNR floor alone passed a recognizer
    reading nothing); and it writes no `method:`, which would switch the CNN preset's ranges off."""

    class Recognizer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=(4, 2), padding=1)
            self.head = torch.nn.Linear(8 * 12, 20)

        def forward(self, x):
            y = self.conv(x)  # [N, 8, 12, W/2]
            y = y.permute(0, 3, 1, 2).flatten(2)  # [N, T, 96]
            return torch.softmax(self.head(y), dim=-1)

    detector = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3, padding=1), torch.nn.Sigmoid())
    _export(Recognizer(), (torch.randn(1, 3, 48, 64),), tmp_path / "rec.onnx", names=("x", "probs"))
    _export(detector, (torch.randn(1, 3, 32, 32),), tmp_path / "det.onnx", names=("x", "maps"))
    for name, task, gates in (("rec", "ctc", ["nonblank_agreement", "string_agreement", "sqnr_db"]),
                              ("det", "dense", ["map_iou", "sqnr_db"])):
        result = _invoke(["init", f"{name}.onnx", "-o", f"{name}.yaml"], tmp_path)
        assert result.exit_code == 0, result.output
        text = (tmp_path / f"{name}.yaml").read_text()
        data = yaml.safe_load(text)
        assert data["validation"]["task"] == task and [g["metric"] for g in data["gates"]] == gates
        assert "method" not in data["calibration"] and f"decide: validation.task: {task} guessed" in result.stdout
