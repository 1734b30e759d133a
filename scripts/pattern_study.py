"""The figures of README's "No silent death" table: the tiny pattern models of tests/pattern_models.py
(YOLO head, CTC recognizer, keypoint head) quantized with the range guard off and on, through the CLI.

    PYTHONPATH=. python scripts/pattern_study.py [OUT_DIR]   (default: build/pattern_study)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from typer.testing import CliRunner  # noqa: E402

from pipeline.cli import app  # noqa: E402
from tests.pattern_models import (  # noqa: E402
    ctc_features, ctc_recognizer, export_keypoint_head, export_yolo, write_recipe, yolo_images,
)

KEYS = ("sqnr_db", "sqnr_db_worst_channel", "dead_channels", "dead_channel_list", "boxes_matched", "boxes_precision",
        "float_boxes", "quantized_boxes", "step_agreement", "nonblank_agreement", "string_agreement", "char_error_rate")


def run(recipe: Path, output: str) -> None:
    code = CliRunner().invoke(app, ["run", str(recipe), "--quiet", "--force"]).exit_code
    run_dir = recipe.parent / f"run_{recipe.stem}"
    m = json.loads((run_dir / "validate" / "metrics.json").read_text())["outputs"][output]
    guard = json.loads((run_dir / "artifact" / "manifest.json").read_text())["range_guard"]["findings"]
    figures = {k: round(m[k], 2) if isinstance(m[k], float) else m[k] for k in KEYS if k in m}
    print(f"{recipe.stem:<22} exit {code}  {figures}  guard: {[(f['kind'], f['action']) for f in guard]}")


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    yolo = export_yolo(out / "yolo.onnx")
    calib, val = yolo_images(48, 1), yolo_images(32, 2)
    for fmt in ("a8w8", "xint8"):
        for guard in (False, True):
            run(write_recipe(out, f"yolo_{fmt}_guard_{'on' if guard else 'off'}", yolo, "image", [1, 3, 64, 64], calib,
                             val, validation={"outputs": {"pred": {"task": "detection"}}},
                             quantization={"format": fmt, "range_guard": {"enabled": guard}}), "pred")
    run(write_recipe(out, "yolo_a8w8_concat_float", yolo, "image", [1, 3, 64, 64], calib, val,
                     validation={"outputs": {"pred": {"task": "detection"}}},
                     quantization={"range_guard": {"min_bits": 15}}), "pred")
    run(write_recipe(out, "yolo_a16w8", yolo, "image", [1, 3, 64, 64], calib, val,
                     validation={"outputs": {"pred": {"task": "detection"}}}, quantization={"format": "a16w8"}), "pred")
    ctc = ctc_recognizer(out / "ctc.onnx", margin=0.1, blank_gain=40.0)
    for guard in (False, True):
        run(write_recipe(out, f"ctc_guard_{'on' if guard else 'off'}", ctc, "features", [1, 24, 4], ctc_features(32, 1),
                         ctc_features(24, 2), validation={"outputs": {"logits": {"task": "ctc"}}},
                         quantization={"range_guard": {"enabled": guard}}), "logits")
    head = export_keypoint_head(out / "keypoints.onnx")
    x = np.random.default_rng(3).uniform(0, 1, (40, 3, 8, 8)).astype(np.float32)
    for guard in (False, True):
        run(write_recipe(out, f"keypoints_guard_{'on' if guard else 'off'}", head, "image", [1, 3, 8, 8], x[:24],
                         x[24:], validation={"task": "regression"}, quantization={"range_guard": {"enabled": guard}}),
            "keypoints")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "pattern_study")
