"""Accuracy study of a recipe: calibration methods x formats, then each accuracy transform on and off.

    .venv/bin/python scripts/accuracy_study.py recipes/minilm_l6.yaml [--formats a8w8,a16w8] [--samples N]
        [--transforms] [--out build/study]

Runs export/prepare/calibrate once (cached in <out>/<recipe name>/), then quantizes the prepared model
with every (format, method) from the same statistics and validates it on the recipe's validation set
with NPU numerics (unfused QDQ), exactly as the validate stage does. With --transforms it also measures,
in the recipe's own format and method, no transform / each transform alone / the recipe's combination.
With --int8 (transformers in int8, issue 9) it measures each int8 technique alone and combined, through
the quantize flow: cosine, NN agreement, the int8 x int8 MAC share (`pipeline.quant.mac_share`, the audit's
definition) and the time each took; `--heldout-sets K` also scores K sets of 200 calibration sentences the
statistics never saw. Every model is saved in <out>/<recipe name>/int8/ for an independent audit.
Prints markdown tables; the figures in the reports of issues 5 and 9 come from this script.
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


INT8_VARIANTS = [  # (label, transforms, flow settings)
    ("plain A8W8", [], {}),
    ("previous recipe: SmoothQuant 0.3", [("smoothquant", {"alpha": 0.3})], {}),
    ("16-bit values, int8 MAC inputs", [], {"free_16bit": True}),
    ("residual SmoothQuant 0.5", [("smoothquant", {"alpha": 0.5, "residual": True})], {}),
    ("outlier split (8, 4)", [("outlier_split", {"channels": 8, "ratio": 4})], {}),
    ("output-error ranges", [], {"output_error_ranges": True}),
    ("16-bit values + residual SmoothQuant", [("smoothquant", {"alpha": 0.5, "residual": True})], {"free_16bit": True}),
    ("16-bit values + outlier split", [("outlier_split", {"channels": 8, "ratio": 4})], {"free_16bit": True}),
    ("16-bit values + split + residual SmoothQuant",
     [("outlier_split", {"channels": 8, "ratio": 4}), ("smoothquant", {"alpha": 0.5, "residual": True})],
     {"free_16bit": True}),
    ("all: + output-error ranges (the recipe)",
     [("outlier_split", {"channels": 8, "ratio": 4}), ("smoothquant", {"alpha": 0.5, "residual": True})],
     {"free_16bit": True, "output_error_ranges": True}),
    ("16-bit values + output-error ranges", [], {"free_16bit": True, "output_error_ranges": True}),
    ("16-bit values + split + output-error ranges", [("outlier_split", {"channels": 8, "ratio": 4})],
     {"free_16bit": True, "output_error_ranges": True}),
    ("all + MSE weight ranges",
     [("outlier_split", {"channels": 8, "ratio": 4}), ("smoothquant", {"alpha": 0.5, "residual": True})],
     {"free_16bit": True, "output_error_ranges": True, "weight_method": "mse"}),
]


def int8_table(recipe, out: Path, samples: int | None, heldout_sets: int = 0, only: str = "") -> str:
    """Each int8 technique alone and combined (INT8_VARIANTS), in the recipe's format and method."""
    from onnx import save

    from pipeline.quant.flow import QuantizeSettings, run_quantize_flow
    from pipeline.quant.mac_share import mac_shares

    model, stats, batches, labels = prepare(recipe, out)
    batches = batches[:samples] if samples else batches
    used = recipe.calibration.samples
    extra = list(open_dataset(recipe, "calibration", limit=used + 200 * heldout_sets))[used:] if heldout_sets else []
    sets = {"validation": batches, **{f"held-out {i + 1}": extra[200 * i: 200 * (i + 1)] for i in range(heldout_sets)}}
    target, fmt = recipe.target_and_format()
    q = recipe.quantization
    saved = out / "int8"
    saved.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (label, steps, flags) in enumerate(INT8_VARIANTS):
        if only and str(index) not in only.split(","):
            continue
        start = time.perf_counter()
        settings = QuantizeSettings(target=target, fmt=fmt, method=recipe.calibration.method,
                                    percentile=recipe.calibration.percentile, exclude_nodes=tuple(q.exclude_nodes),
                                    transforms=steps, transform_samples=min(q.transform_samples, used),
                                    promoted_method=q.fallback.promoted_method, **flags)
        outcome = run_quantize_flow(model, stats, settings,
                                    calibration=lambda limit: open_dataset(recipe, "calibration", limit=limit))
        seconds = time.perf_counter() - start
        save(outcome.model, str(saved / f"variant{index}.onnx"))
        share = mac_shares(outcome.model).share_int8
        scores = {name: evaluate(recipe, model, outcome.model, b, None) for name, b in sets.items() if b}
        nn = [m["nn_agreement"] for m in scores.values()]
        cells = [f"{m['cosine_mean']:.4f} / {m['nn_agreement']:.1f}" for m in scores.values()]
        rows.append((label, *cells, f"{np.mean(nn):.2f}", f"{100 * share:.1f}", f"{seconds:.0f}", f"variant{index}.onnx"))
        print(f"  {label}: " + " | ".join(cells) + f" | int8 MACs {100 * share:.1f}% | {seconds:.0f} s", flush=True)
    header = ("technique", *(f"{name}: cosine / NN %" for name in sets), "mean NN %", "int8 x int8 MACs %",
              "seconds (transforms + ranges + quantize)", "model")
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
    parser.add_argument("--int8", action="store_true", help="each int8 technique alone and combined (issue 9)")
    parser.add_argument("--heldout-sets", type=int, default=0, help="with --int8: also score K x 200 held-out sentences")
    parser.add_argument("--variants", default="", help="with --int8: comma-separated variant indices (default: all)")
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
    if args.int8:
        print(f"## {recipe.name}: int8 techniques (NPU numerics)\n", flush=True)
        print(int8_table(recipe, out, args.samples, args.heldout_sets, args.variants) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
