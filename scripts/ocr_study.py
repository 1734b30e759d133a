"""The figures of README's "Real OCR models" table: PP-OCR's detector, recognizer and direction classifier
(trained weights from the rapidocr-onnxruntime wheel) quantized as a new user would run them: the ONNX
file copied next to a recipe, rendered text data (`pipeline.models.text_lines`), the CLI.

    PYTHONPATH=. python scripts/ocr_study.py [OUT_DIR] [--formats a8w8,xint8] [--fallback]

Per model and format: the task metrics against the float model, the int8 x int8 MAC share, what prepare
folded and fused, the model family the preset was chosen by, and the stage times. `--fallback` adds a
recognizer run with the accuracy-aware fallback allowed to move 10% of the MACs to 16 bits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from typer.testing import CliRunner  # noqa: E402

from pipeline.cli import app  # noqa: E402
from pipeline.models.ppocr import model_path  # noqa: E402

MODELS = {  # kind: (input shape, data builder, calibration count, validation count, validation section)
    "det": ([1, 3, 480, 480], "text_pages", 32, 12, {"outputs": {"sigmoid_0.tmp_0": {"task": "dense", "threshold": 0.3}}}),
    "rec": ([1, 3, 48, 320], "text_lines", 64, 48, {"outputs": {"softmax_11.tmp_0": {"task": "ctc", "blank": 0}}}),
    "cls": ([1, 3, 48, 192], "rotated_text_lines", 64, 48, {"task": "classification"}),
}
KEYS = ("map_iou", "map_iou_min", "nonblank_agreement", "string_agreement", "char_error_rate", "top1_agreement",
        "accuracy", "sqnr_db")


def recipe(out: Path, kind: str, fmt: str, fallback: bool) -> Path:
    shape, builder, calibration, validation, section = MODELS[kind]
    size_arg = {"size": shape[2]} if builder == "text_pages" else {"width": shape[3]}
    data = lambda split, n: {"kind": "builder", "builder": f"pipeline.models.text_lines:{builder}",  # noqa: E731
                             "args": {"split": split, "count": n, **size_arg}}
    quantization = {"target": "xdna2", "format": fmt}
    if fallback:
        calibration -= 16
        quantization["fallback"] = {"enabled": True, "holdout": 16, "rungs": ["a16", "a16w8"], "min_mac_share_int8": 0.9}
    name = f"ppocr_{kind}_{fmt}" + ("_fallback" if fallback else "")
    spec = {
        "name": name, "model": {"onnx": f"{kind}.onnx"}, "inputs": [{"name": "x", "shape": shape}],
        "calibration": {"data": data("calibration", MODELS[kind][2]), "samples": calibration},
        "validation": {"data": data("validation", validation), **section},
        "quantization": quantization,
        "gates": [{"metric": "string_agreement", "min": 80}] if fallback else [],
        "output": name,
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run(path: Path, output: str | None) -> None:
    result = CliRunner().invoke(app, ["run", str(path), "--quiet"])
    code = result.exit_code
    if code not in (0, 4):  # 4: a gate failed, the figures are still there
        print(f"{path.stem}: exit {code}\n{result.output}")
        return
    run_dir = path.parent / path.stem
    metrics = json.loads((run_dir / "validate" / "metrics.json").read_text())
    if output:
        metrics = {**metrics, **metrics["outputs"][output]}
    prepare = json.loads((run_dir / "prepare" / "stage.json").read_text())["metrics"]
    manifest = json.loads((run_dir / "artifact" / "manifest.json").read_text())
    family = manifest["quantization"].get("applied", {}).get("family")
    shares = manifest["quantization"].get("mac_shares", {})
    times = json.loads((run_dir / "timings.json").read_text()) if (run_dir / "timings.json").is_file() else {}
    figures = {k: round(metrics[k], 2) for k in KEYS if isinstance(metrics.get(k), (int, float))}
    print(f"{path.stem:<28} exit {code} {figures}")
    print(f"{'':<28} int8 MACs {shares.get('mac_share_int8')}, fused {prepare.get('hard_activations_fused')}, "
          f"folded {prepare.get('affine_folded_into_conv')}, family {family}, "
          f"seconds {times}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="build/ocr_study")
    parser.add_argument("--formats", default="a8w8")
    parser.add_argument("--fallback", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for kind in MODELS:
        shutil.copy(model_path(kind), out / f"{kind}.onnx")
    outputs = {kind: next(iter(MODELS[kind][4].get("outputs", {})), None) for kind in MODELS}
    for fmt in args.formats.split(","):
        for kind in MODELS:
            run(recipe(out, kind, fmt, False), outputs[kind])
    if args.fallback:
        run(recipe(out, "rec", "a8w8", True), outputs["rec"])


if __name__ == "__main__":
    main()
