"""MobileNetV2 study: how far each quantized model is from the float one, and where the error comes from.

    .venv/bin/python scripts/mobilenet_study.py RUN_OR_RECIPE... [--out-root build] [--reference]
        [--weight-ranges] [--variants none,cle,...|all] [--json study.json]

Each argument is a finished run folder (`build/<name>/`, as `npu-pipeline run` writes it) or a recipe
YAML, which is run first (cached) into `--out-root/<name>`. For each run it runs the float model
(`prepare/model.onnx`) and the quantized one with NPU numerics (unfused `quantize/model.onnx`, or the
bfloat16-rounding `quantize/emulated.onnx`) on the validation crops (`pipeline.models.photo_crops`), and
prints the protocol of /work/shared/reference/measured.md: logit SQNR against float, top-1 agreement on
the crops the float model is sure of (top-1 probability > 0.5) and on all crops; and the stage times.

--reference adds float reference rows: bfloat16-rounded weights and biases only (activations float32), and
bfloat16 rounding at every op (`pipeline.bf16.emulate_bf16`, what the BF16 recipe validates).
It also adds the float model with int8 weights (per tensor, as A8W8/A16W8 quantize them, and per
channel) and float activations: which of weights and activations costs the accuracy.
--variants runs each recipe again (export..quantize only, into `--out-root/<name>+<variant>`) with one
accuracy technique switched on alone over a bare baseline, and with the shipped defaults minus one, so each
technique's gain and its quantize-stage seconds can be read off one table (`VARIANTS` below).
--weight-ranges prints, for every Conv/Gemm, max|W| over the tensor divided by the median per-output-
channel max|W| (how much of the per-tensor int8 grid the typical channel gets), the median over output
channels of each channel's SQNR when the tensor is quantized per tensor to int8, and the share of
channels left with 8 or fewer int8 levels, before (prepare/model.onnx, BN folded) and after the
transforms (quantize/float.onnx); and the cross-layer-equalization skip reasons by count.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.core.onnx_io import load_onnx, make_session  # noqa: E402
from pipeline.report import format_table  # noqa: E402

CONFIDENT = 0.5  # float top-1 probability above which a crop counts as one the float model is sure of


def logit_metrics(ref: np.ndarray, got: np.ndarray) -> dict:
    """SQNR of `got` against `ref` logits [N, C], and top-1 agreement on confident and on all crops."""
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    shifted = ref64 - ref64.max(axis=1, keepdims=True)
    top_prob = 1.0 / np.exp(shifted).sum(axis=1)  # softmax at the argmax
    confident = top_prob > CONFIDENT
    same = ref64.argmax(axis=1) == got64.argmax(axis=1)
    noise = float(((got64 - ref64) ** 2).sum())
    return {
        "sqnr_db": 10 * np.log10(float((ref64**2).sum()) / noise) if noise > 0 else float("inf"),
        "top1_confident": 100.0 * float(same[confident].mean()) if confident.any() else float("nan"),
        "top1_all": 100.0 * float(same.mean()),
        "confident": int(confident.sum()),
        "samples": len(ref),
    }


def run_models(models: dict[str, bytes | Path], npu: set[str], samples: int | None) -> dict[str, np.ndarray]:
    """Logits of every model on the validation crops, streamed: one crop in memory at a time."""
    from pipeline.models.photo_crops import imagenet_crops

    sessions = {name: make_session(m, npu_emulation=name in npu, threads=1) for name, m in models.items()}
    logits: dict[str, list] = {name: [] for name in models}
    for index, sample in enumerate(imagenet_crops("validation")):
        if samples is not None and index >= samples:
            break
        for name, session in sessions.items():
            logits[name].append(session.run(None, sample)[0])
    return {name: np.concatenate(rows) for name, rows in logits.items()}


def stage_seconds(run: Path) -> dict[str, float]:
    times = {}
    timings = run / "timings.json"  # the runner's per-stage seconds (stage.json does not carry them)
    recorded = json.loads(timings.read_text()) if timings.is_file() else {}
    for stage in ("export", "prepare", "calibrate", "quantize", "validate", "artifact"):
        record = run / stage / "stage.json"
        if record.is_file():
            data = json.loads(record.read_text())
            if stage in recorded or "seconds" in data:
                times[stage] = round(float(recorded.get(stage, data.get("seconds"))), 2)
            for step, seconds in data.get("metrics", {}).get("seconds", {}).items():  # the quantize steps
                times[f"{stage}.{step}"] = seconds
    return times


def reference_models(float_model: Path) -> dict[str, bytes]:
    """Float with bf16-rounded weights only, and float with bf16 rounding at every op."""
    from onnx import numpy_helper

    from pipeline.quant.bf16 import emulate_bf16, round_to_bf16

    model = load_onnx(float_model)
    weights_only = load_onnx(float_model)
    for init in weights_only.graph.initializer:
        values = numpy_helper.to_array(init)
        if values.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(round_to_bf16(values), init.name))
    per_tensor, per_channel = load_onnx(float_model), load_onnx(float_model)
    weight_names = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 1}
    for quantized, axis in ((per_tensor, None), (per_channel, 0)):
        for init in quantized.graph.initializer:
            if init.name in weight_names:
                init.CopyFrom(numpy_helper.from_array(fake_int8(numpy_helper.to_array(init), axis), init.name))
    return {
        "float, bf16-rounded weights only": weights_only.SerializeToString(),
        "float, bf16 at every op (our BF16 emulation)": emulate_bf16(model).SerializeToString(),
        "float activations, int8 per-tensor weights": per_tensor.SerializeToString(),
        "float activations, int8 per-channel weights": per_channel.SerializeToString(),
    }


def fake_int8(w: np.ndarray, axis: int | None) -> np.ndarray:
    """Symmetric int8 round trip (scale = max|w| / 127) per tensor, or per slice along `axis`."""
    if axis is None:
        scale = np.abs(w).max() / 127.0
    else:
        scale = np.abs(w).reshape(w.shape[0], -1).max(axis=1).reshape((-1,) + (1,) * (w.ndim - 1)) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32)


def weight_table(before: Path, after: Path | None) -> list[list]:
    """Per Conv/Gemm: output channels, max/median-channel-max ratio and per-tensor int8 SQNR, before/after."""
    from onnx import numpy_helper

    def weights(path: Path) -> dict[str, tuple[np.ndarray, int]]:
        model = load_onnx(path)
        inits = {t.name: t for t in model.graph.initializer}
        found = {}
        for node in model.graph.node:
            if node.op_type in ("Conv", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
                if node.op_type == "Gemm":
                    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                    w = w if trans_b else w.T  # rows = output features
                found[node.name] = (w, group)
        return found

    def stats(w: np.ndarray) -> tuple[float, float, float]:
        """(max / median channel max, median over channels of the channel's SQNR under per-tensor int8,
        share of channels whose max is under 1/16 of the tensor's: 8 or fewer int8 levels)."""
        per_channel = np.abs(w).reshape(len(w), -1).max(axis=1)
        ratio = float(per_channel.max() / max(float(np.median(per_channel)), 1e-30))
        err = (fake_int8(w.astype(np.float32), None).astype(np.float64) - w).reshape(len(w), -1)
        signal = (w.reshape(len(w), -1) ** 2).sum(axis=1)
        noise = np.maximum((err**2).sum(axis=1), 1e-300)
        sqnr = 10 * np.log10(np.maximum(signal, 1e-300) / noise)
        return ratio, float(np.median(sqnr)), 100.0 * float((per_channel < per_channel.max() / 16).mean())

    old, new = weights(before), weights(after) if after is not None else {}
    rows = []
    for name, (w, group) in old.items():
        kind = "depthwise" if group > 1 else ("1x1" if w.ndim == 4 and w.shape[2:] == (1, 1) else
                                               "3x3" if w.ndim == 4 else "linear")
        r0, s0, t0 = stats(w)
        r1, s1, t1 = stats(new[name][0]) if name in new else (float("nan"),) * 3
        short = name.replace("/features/features.", "f").replace("/conv/conv.", ".").replace("/Conv", "")
        rows.append([short, kind, len(w), round(r0, 1), round(r1, 1), round(s0, 1), round(s1, 1),
                     round(t0), round(t1)])
    return rows


def skip_reasons(transforms: Path) -> dict[str, int]:
    """CLE skip reasons with node names blanked, by count."""
    data = json.loads(transforms.read_text())
    cle = data.get("transforms", {}).get("cross_layer_equalization", {})
    counts: dict[str, int] = {}
    for entry in cle.get("skipped", []):
        reason = re.sub(r"'[^']*'", "X", entry["reason"])
        counts[reason] = counts.get(reason, 0) + 1
    counts["(applied)"] = len(cle.get("applied", []))
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# name -> (recipe overrides, what it measures). "none" is the bare baseline (no preset, no transform,
# minmax activations, max|w| weights); the others switch one technique on over it, or one off the preset.
_BARE = {"quantization": {"preset": "none", "weight_method": "minmax"}, "calibration": {"method": "minmax"}}
# As the CNN preset applies them with 8-bit activations (A8W8, XINT8).
_ABSORB = {"bias_absorption": {"consumer_bias": "float", "padded": "pad"}}
_SEQUENTIAL = {"adaround": {"quantized_inputs": True}}
_STREAM = "residual_equalization"
# Variants that name transforms drop the preset's power-of-two alignment (XINT8): compare XINT8 rows with that in mind.
VARIANTS = {
    "none": (_BARE, "no technique: minmax activations, max|w| weights"),
    "percentile": ({**_BARE, "calibration": {"method": "percentile"}}, "percentile activation ranges alone"),
    "mse_weights": ({**_BARE, "quantization": {"preset": "none", "weight_method": "mse"}}, "MSE weight ranges alone"),
    "cle": ({**_BARE, "quantization": {**_BARE["quantization"], "transforms": ["cross_layer_equalization"]}},
            "cross-layer equalization alone"),
    "bias_correction": ({**_BARE, "quantization": {**_BARE["quantization"], "transforms": ["bias_correction"]}},
                        "bias correction alone (float transform, round-to-nearest weights)"),
    "adaround": ({**_BARE, "quantization": {**_BARE["quantization"], "transforms": ["adaround"]}},
                 "AdaRound alone (with its bias correction)"),
    "adaround_no_bc": ({**_BARE, "quantization": {**_BARE["quantization"],
                                                 "transforms": [{"adaround": {"bias_correction": False}}]}},
                       "AdaRound alone, no bias correction"),
    "preset": ({}, "the shipped recipe: every default of the CNN preset"),
    # The preset's AdaRound for 8-bit activations (A8W8, XINT8) runs on the quantized model's inputs.
    "preset-residual_equalization": ({"quantization": {"transforms": ["cross_layer_equalization", _ABSORB, _SEQUENTIAL]}},
                                     "the preset without the residual streams' equalization"),
    "preset-cle": ({"quantization": {"transforms": [_STREAM, _ABSORB, _SEQUENTIAL]}}, "the preset without equalization"),
    "preset-bias_absorption": ({"quantization": {"transforms": [_STREAM, "cross_layer_equalization", _SEQUENTIAL]}},
                               "the preset without bias absorption"),
    "preset-padded": ({"quantization": {"transforms": [_STREAM, "cross_layer_equalization",
                                                       {"bias_absorption": {"consumer_bias": "float"}}, _SEQUENTIAL]}},
                      "the preset without centring the depthwise inputs (no explicit Pads)"),
    "preset-adaround": ({"quantization": {"transforms": [_STREAM, "cross_layer_equalization", _ABSORB]}},
                        "the preset without AdaRound"),
    "preset-sequential_adaround": ({"quantization": {"transforms": [_STREAM, "cross_layer_equalization", _ABSORB,
                                                                    "adaround"]}},
                                   "the preset with AdaRound on float inputs (one pass for every layer)"),
    "preset-free_16bit": ({"quantization": {"free_16bit": False}}, "the recipe without 16-bit non-MAC values"),
    "preset-mse_activations": ({"calibration": {"method": "percentile"}},
                               "the preset with percentile ranges for its 8-bit activations instead of mse"),
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_variant(recipe_path: Path, variant: str, out_root: Path) -> Path:
    """export..quantize of `recipe_path` with the variant's overrides, into out_root/<name>+<variant>."""
    import yaml

    from pipeline.api import stage_by_name
    from pipeline.recipe import recipe_from_dict
    from pipeline.runner import Runner

    data = yaml.safe_load(recipe_path.read_text())
    overrides, _ = VARIANTS[variant]
    data = _merge(data, overrides)
    data["name"] = f"{data['name']}.{variant.replace('+', '.plus.')}"  # a recipe name takes letters, digits, _ . -
    recipe = recipe_from_dict(data, source=f"{recipe_path}+{variant}", base_dir=recipe_path.resolve().parent)
    run_dir = out_root / recipe.name
    Runner(recipe, run_dir, progress=False).run([stage_by_name(s) for s in ("export", "prepare", "calibrate", "quantize")])
    return run_dir


def resolve_runs(items: list[str], out_root: Path) -> list[Path]:
    from pipeline.api import run_recipe
    from pipeline.errors import GateError
    from pipeline.recipe import load_recipe

    runs = []
    for item in items:
        path = Path(item)
        if path.suffix in (".yaml", ".yml"):
            recipe = load_recipe(path)
            try:
                result = run_recipe(recipe, out=out_root / recipe.name, progress=False)
                path = result.run_dir
            except GateError:  # the study is wanted all the more when a gate fails
                path = out_root / recipe.name
        if not (path / "prepare" / "model.onnx").is_file() or not (path / "quantize").is_dir():
            raise SystemExit(f"{path}: not a finished run folder (no prepare/model.onnx or quantize/)")
        runs.append(path)
    return runs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders or recipe files")
    parser.add_argument("--out-root", type=Path, default=Path("build"))
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--weight-ranges", action="store_true")
    parser.add_argument("--samples", type=int, default=None, help="only the first N validation crops")
    parser.add_argument("--variants", default="", help=f"comma-separated, or 'all': {', '.join(VARIANTS)}")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    runs = resolve_runs(args.runs, args.out_root)
    variants = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v]
    for item in args.runs:
        if Path(item).suffix in (".yaml", ".yml"):
            for variant in variants:
                runs.append(run_variant(Path(item), variant, args.out_root))
    float_model = runs[0] / "prepare" / "model.onnx"
    models: dict[str, bytes | Path] = {"float": float_model}
    npu = set()
    for run in runs:
        emulated = run / "quantize" / "emulated.onnx"
        models[run.name] = emulated if emulated.is_file() else run / "quantize" / "model.onnx"
        npu.add(run.name)
    if args.reference:
        models.update(reference_models(float_model))
    logits = run_models(models, npu, args.samples)
    rows, result = [], {"runs": {}, "reference": {}}
    by_name = {run.name: run for run in runs}
    for name in models:
        if name == "float":
            continue
        metrics = logit_metrics(logits["float"], logits[name])
        times = stage_seconds(by_name[name]) if name in by_name else {}
        (result["runs"] if name in npu else result["reference"])[name] = {**metrics, "seconds": times}
        rows.append([name, f"{metrics['sqnr_db']:.1f}", f"{metrics['top1_confident']:.1f}",
                     f"{metrics['top1_all']:.1f}", metrics["confident"], metrics["samples"],
                     " ".join(f"{k} {v:g}" for k, v in times.items()) or "-"])
    print(format_table(["model", "logit SQNR (dB)", "top-1 confident (%)", "top-1 all (%)", "confident",
                        "crops", "stage seconds"], rows, markdown=True))

    if args.weight_ranges:
        after = next((r / "quantize" / "float.onnx" for r in runs if (r / "quantize" / "float.onnx").is_file()), None)
        table = weight_table(float_model, after)
        result["weights"] = table
        print(f"\nweights: before = {float_model}, after = {after or '(no transformed model)'}")
        print(format_table(["layer", "kind", "out ch", "max / median ch-max, before", "after",
                            "median channel SQNR, per-tensor int8 (dB), before", "after",
                            "% channels <= 8 levels, before", "after"], table, markdown=True))
        for run in runs:
            transforms = run / "quantize" / "transforms.json"
            if transforms.is_file():
                reasons = skip_reasons(transforms)
                result.setdefault("cle", {})[run.name] = reasons
                print(f"\nCLE in {run.name}:")
                print(format_table(["reason", "pairs"], [[k, v] for k, v in reasons.items()], markdown=True))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result


if __name__ == "__main__":
    main()
