"""Accuracy study of a recipe: calibration methods x formats, then each accuracy transform on and off.

    .venv/bin/python scripts/accuracy_study.py recipes/minilm_l6.yaml [--formats a8w8,a16w8] [--samples N]
        [--transforms] [--out build/study]

Runs export/prepare/calibrate once (cached in <out>/<recipe name>/), then quantizes the prepared model
with every (format, method) from the same statistics and validates it on the recipe's validation set
with NPU numerics (unfused QDQ), exactly as the validate stage does. With --transforms it also measures,
in the recipe's own format and method, no transform / each transform alone / the recipe's combination.
Prints markdown tables; the figures in the report of issue 5 come from this script.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.api import run_stage  # noqa: E402
from pipeline.data import open_dataset  # noqa: E402
from pipeline.core.formats import Format  # noqa: E402
from pipeline.core.metrics import compare_outputs  # noqa: E402
from pipeline.core.onnx_io import load_onnx, make_session  # noqa: E402
from pipeline.core.tasks import task_metrics  # noqa: E402
from pipeline.quant.histogram import StatsCollector  # noqa: E402
from pipeline.quant.qdq import quantize_qdq  # noqa: E402
from pipeline.quant.ranges import range_methods  # noqa: E402
from pipeline.quant.statistics import collect_histograms  # noqa: E402
from pipeline.quant.transforms import TransformContext, apply_transforms, make_transforms  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.report import format_table  # noqa: E402
from pipeline.targets import get_target  # noqa: E402

METHODS = list(range_methods())


def evaluate(recipe, reference, npu_model, batches, labels) -> dict:
    """Validation metrics of `npu_model` against `reference` (both ModelProto), NPU numerics."""
    float_session = make_session(reference.SerializeToString())
    npu_session = make_session(npu_model.SerializeToString(), npu_emulation=True)
    names = [o.name for o in float_session.get_outputs()]
    index = names.index(recipe.validation.output or names[0])
    refs = np.concatenate([float_session.run(None, b)[index] for b in batches])
    gots = np.concatenate([npu_session.run(None, b)[index] for b in batches])
    return {**task_metrics(recipe.validation.task, refs, gots, labels), **compare_outputs([refs], [gots])}


def _columns(task: str) -> list[str]:
    if task == "classification":
        return ["top1_agreement", "accuracy", "sqnr_db"]
    return ["cosine_mean", "nn_agreement", "sqnr_db"]


def prepare(recipe, out: Path) -> tuple:
    for stage in ("export", "prepare", "calibrate"):
        run_stage(recipe, stage, out=out, force=False, progress=False)
    model = load_onnx(out / "prepare" / "model.onnx")
    stats = StatsCollector.load(out / "calibrate" / "stats.npz")
    data = open_dataset(recipe, "validation")
    return model, stats, list(data), data.labels


def method_table(recipe, out: Path, formats: list[Format], samples: int | None) -> str:
    model, stats, batches, labels = prepare(recipe, out)
    batches = batches[:samples] if samples else batches
    labels = labels[: len(batches)] if labels is not None else None
    target = get_target(recipe.quantization.target)
    cols = _columns(recipe.validation.task)
    rows = []
    for fmt in formats:
        for method in METHODS:
            start = time.perf_counter()
            qmodel, _, _ = quantize_qdq(model, stats, target=target, fmt=fmt, method=method,
                                        percentile=recipe.calibration.percentile,
                                        exclude_nodes=recipe.quantization.exclude_nodes)
            m = evaluate(recipe, model, qmodel, batches, labels)
            rows.append((fmt.value, method, *(_fmt(m.get(c)) for c in cols), f"{time.perf_counter() - start:.1f}"))
            print(f"  {fmt.value} {method}: " + ", ".join(f"{c} {_fmt(m.get(c))}" for c in cols), flush=True)
    return format_table(("format", "method", *cols, "seconds"), rows, markdown=True)


def transform_table(recipe, out: Path, samples: int | None, *, fmt: Format | None = None,
                    method: str | None = None) -> str:
    """Nothing, each transform alone, and combinations, in the recipe's format and method (or those given)."""
    data_for = open_dataset
    model, stats, batches, labels = prepare(recipe, out)
    batches = batches[:samples] if samples else batches
    labels = labels[: len(batches)] if labels is not None else None
    target, recipe_fmt = recipe.target_and_format()
    fmt = fmt or recipe_fmt
    method = method or recipe.calibration.method
    q = recipe.quantization
    common = dict(target=target, fmt=fmt, method=method, percentile=recipe.calibration.percentile,
                  exclude_nodes=q.exclude_nodes)
    n = min(q.transform_samples, recipe.calibration.samples)
    alpha = q.smoothquant if q.smoothquant is not None else 0.5
    variants = [
        ("none", []),
        ("cross-layer equalization", [("cross_layer_equalization", {})]),
        (f"SmoothQuant alpha={alpha}", [("smoothquant", {"alpha": alpha})]),
        ("bias correction", [("bias_correction", {})]),
        (f"SmoothQuant alpha={alpha} + bias correction", [("smoothquant", {"alpha": alpha}), ("bias_correction", {})]),
        ("equalization + bias correction", [("cross_layer_equalization", {}), ("bias_correction", {})]),
    ]
    cols = _columns(recipe.validation.task)
    rows = []
    for label, steps in variants:
        start = time.perf_counter()
        ctx = TransformContext(lambda: data_for(recipe, "calibration", limit=n), n,
                               lambda m: quantize_qdq(m, stats, **common)[0])
        result = apply_transforms(model, make_transforms(steps), ctx)
        used = collect_histograms(result.model, data_for(recipe, "calibration"), progress=False) if result.stale else stats
        qmodel, _, _ = quantize_qdq(result.model, used, **common)
        m = evaluate(recipe, model, qmodel, batches, labels)
        applied = {k: len(v["applied"]) for k, v in result.report.items()}
        rows.append((label, str(applied or "-"), *(_fmt(m.get(c)) for c in cols), f"{time.perf_counter() - start:.1f}"))
        print(f"  {label}: " + ", ".join(f"{c} {_fmt(m.get(c))}" for c in cols), flush=True)
    header = (f"transforms ({fmt.value}, {method})", "layers changed", *cols, "seconds")
    return format_table(header, rows, markdown=True)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--formats", default="", help="comma-separated; default: every quantized format the target takes")
    parser.add_argument("--samples", type=int, default=None, help="validation samples (default: the recipe's)")
    parser.add_argument("--transforms", action="store_true", help="also measure each accuracy transform")
    parser.add_argument("--no-methods", action="store_true", help="skip the method x format table")
    parser.add_argument("--transform-format", default=None, help="format of the transform table (default: the recipe's)")
    parser.add_argument("--transform-method", default=None, help="range method of the transform table")
    parser.add_argument("--out", type=Path, default=Path("build/study"))
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe)
    out = args.out / recipe.name
    target = get_target(recipe.quantization.target)
    formats = ([Format(f) for f in args.formats.split(",") if f] if args.formats
               else [f for f in target.formats if f is not Format.BF16])
    if not args.no_methods:
        print(f"## {recipe.name}: calibration method x format (validation, NPU numerics)\n", flush=True)
        print(method_table(recipe, out, formats, args.samples) + "\n", flush=True)
    if args.transforms:
        print(f"## {recipe.name}: accuracy transforms\n", flush=True)
        fmt = Format(args.transform_format) if args.transform_format else None
        method = args.transform_method or None
        print(transform_table(recipe, out, args.samples, fmt=fmt, method=method) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
