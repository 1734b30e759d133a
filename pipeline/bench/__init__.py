"""`make bench`: the whole pipeline's cost on the reference models, as ratios to float inference.

For each recipe (default: digits_cnn, mobilenet_v2_a8w8, minilm_l6_a16w8, minilm_l6) a fresh child
process runs every stage in order into a scratch folder and records, per stage, its wall time and its peak
RSS (the kernel's high-water mark, reset before each stage). A second fresh child runs plain float
inference (the prepared model, onnxruntime with every optimization) over the same calibration and
validation samples, data decoded before the clock starts. Each stage is reported against the float
inference of the samples it reads (calibrate and quantize: the calibration samples; validate: the
validation samples), time and memory alike. Then, as before, calibration memory against the number of
samples (MiniLM at 50, 200, 800): it must stay flat.

Beside each ratio target, its floor: what the stage cannot avoid, measured in the same float child. Calibrate
must decode its samples and run the model on them (data + float inference); validate must decode its
samples, run the float model and the quantized model in NPU emulation (data + float + emulated). A target
below its floor cannot be met by making the stage's own work cheaper; the line says so.

Output: a table per recipe, a line saying which targets hold, and JSON (`--out`) for CI. The targets are
issue 12's: validate <= 2.5x and calibrate <= 1.3x float inference of their samples; end to end: digits
<= 15 s, MobileNetV2 <= 60 s, MiniLM A16W8 <= 90 s, MiniLM A8W8 with its accuracy work <= 180 s;
calibration peak RSS at 800 samples <= 1.1x at 50.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

__all__ = ["main", "TARGETS"]

RECIPES_DIR = Path(__file__).resolve().parent.parent.parent / "recipes"
DEFAULT_RECIPES = ("digits_cnn", "mobilenet_v2_a8w8", "minilm_l6_a16w8", "minilm_l6")
# (what, limit): a stage ratio against float inference, or an end-to-end time in seconds per recipe.
TARGETS = {
    "validate_ratio": 2.5,
    "calibrate_ratio": 1.3,
    "end_to_end_s": {"digits_cnn": 15.0, "mobilenet_v2_a8w8": 60.0, "minilm_l6_a16w8": 90.0, "minilm_l6": 180.0},
    "calibration_rss_growth": 1.1,
}
# The samples each stage reads, for its ratio: calibration or validation.
_SAMPLES_OF = {"calibrate": "calibration", "quantize": "calibration", "validate": "validation"}


def _child(*args: str) -> dict:
    command = [sys.executable, "-m", "pipeline.bench.child", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"bench child failed ({' '.join(command)}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_recipe(recipe: Path, scratch: Path) -> dict:
    """Every stage of `recipe` in one child, float inference of its samples in another; the ratios."""
    stages = _child("pipeline", str(recipe), str(scratch))
    floats = _child("float", str(recipe), str(scratch))
    rows = {}
    for name, record in stages["stages"].items():
        row = dict(record)
        samples = _SAMPLES_OF.get(name)
        if samples is not None and floats[samples]["seconds"] > 0:
            row["time_ratio"] = round(record["seconds"] / floats[samples]["seconds"], 3)
            row["rss_ratio"] = round(record["peak_rss_mib"] / floats[samples]["peak_rss_mib"], 3)
            row["samples"] = floats[samples]["samples"]
        rows[name] = row
    return {"recipe": str(recipe), "stages": rows, "float_inference": floats, "floors": floors(floats),
            "end_to_end_s": round(sum(r["seconds"] for r in rows.values()) + stages["startup_s"], 3),
            "startup_s": stages["startup_s"]}


def floors(floats: dict) -> dict:
    """Per stage with a ratio target, the seconds it cannot avoid and their ratio to float inference (see the
    module docstring): {stage: {"parts": {what: seconds}, "seconds": total, "ratio": total / float}}."""
    result = {}
    plans = {"calibrate": ("calibration", {}), "validate": ("validation", {"emulated model": "emulated_validation"})}
    for stage, (samples, extra) in plans.items():
        base = floats[samples]
        if "data_s" not in base or base["seconds"] <= 0 or any(key not in floats for key in extra.values()):
            continue
        parts = {"data": base["data_s"], "float model": base["seconds"],
                 **{what: floats[key]["seconds"] for what, key in extra.items()}}
        total = round(sum(parts.values()), 3)
        result[stage] = {"parts": parts, "seconds": total, "ratio": round(total / base["seconds"], 3)}
    return result


def calibration_memory(recipe: Path, scratch: Path, sizes: list[int]) -> dict:
    """Calibration time and peak RSS against plain inference at each N (fresh children each)."""
    rows = []
    for n in sizes:
        infer = _child("scan-infer", str(recipe), str(scratch), str(n))
        calib = _child("scan-calibrate", str(recipe), str(scratch), str(n))
        rows.append({"n": n, "infer_s": infer["seconds"], "calibrate_s": calib["seconds"],
                     "time_ratio": round(calib["seconds"] / infer["seconds"], 3),
                     "infer_rss_mib": infer["peak_rss_mib"], "calibrate_rss_mib": calib["peak_rss_mib"]})
    growth = round(rows[-1]["calibrate_rss_mib"] / rows[0]["calibrate_rss_mib"], 3)
    return {"recipe": str(recipe), "rows": rows, "rss_growth": growth}


def judge(results: dict, memory: dict | None) -> list[dict]:
    """Each target with its measured value and whether it holds."""
    verdicts = []
    for name, result in results.items():
        stages = result["stages"]
        for stage, key in (("validate", "validate_ratio"), ("calibrate", "calibrate_ratio")):
            ratio = stages.get(stage, {}).get("time_ratio")
            if ratio is not None and not stages[stage].get("skipped"):
                verdict = {"target": f"{name} {stage} <= {TARGETS[key]}x float", "value": ratio,
                           "holds": ratio <= TARGETS[key]}
                floor = result.get("floors", {}).get(stage)
                if floor is not None:
                    verdict["floor"] = floor["ratio"]
                    verdict["below_floor"] = TARGETS[key] < floor["ratio"]
                verdicts.append(verdict)
        limit = TARGETS["end_to_end_s"].get(name)
        if limit is not None:
            verdicts.append({"target": f"{name} end to end <= {limit:g} s", "value": result["end_to_end_s"],
                             "holds": result["end_to_end_s"] <= limit})
    if memory is not None:
        verdicts.append({"target": f"calibration RSS at N={memory['rows'][-1]['n']} <= "
                                   f"{TARGETS['calibration_rss_growth']}x N={memory['rows'][0]['n']}",
                         "value": memory["rss_growth"], "holds": memory["rss_growth"] <= TARGETS["calibration_rss_growth"]})
    return verdicts


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from ..report import format_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/bench.json"))
    parser.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES),
                        help="recipe names in recipes/ or paths (default: the reference models)")
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[50, 200, 800],
                        help="calibration sample counts for the memory scan on MiniLM (none: skip it)")
    args = parser.parse_args(argv)
    paths = [Path(r) if r.endswith((".yaml", ".yml")) else RECIPES_DIR / f"{r}.yaml" for r in args.recipes]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="npu-bench-") as scratch:
        for path in paths:
            print(f"bench: {path.stem} ...", file=sys.stderr, flush=True)
            results[path.stem] = bench_recipe(path, Path(scratch) / path.stem)
        memory = None
        if args.memory_sizes:
            print("bench: calibration memory scan ...", file=sys.stderr, flush=True)
            memory = calibration_memory(RECIPES_DIR / "minilm_l6_a16w8.yaml", Path(scratch) / "memory", args.memory_sizes)
    verdicts = judge(results, memory)
    report = {"recipes": results, "calibration_memory": memory, "targets": verdicts,
              "targets_held": sum(v["holds"] for v in verdicts), "targets_total": len(verdicts)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, result in results.items():
        rows = [(stage, r["seconds"], r.get("time_ratio", "-"), r["peak_rss_mib"], r.get("rss_ratio", "-"),
                 r.get("samples", "-")) for stage, r in result["stages"].items()]
        rows.append(("end to end", result["end_to_end_s"], "-", "-", "-", "-"))
        print(f"\n{name} (float inference: calibration {result['float_inference']['calibration']['seconds']:.2f} s, "
              f"validation {result['float_inference']['validation']['seconds']:.2f} s)")
        print(format_table(("stage", "seconds", "x float", "peak RSS MiB", "x float RSS", "samples"), rows))
        for stage, floor in result["floors"].items():
            parts = " + ".join(f"{what} {seconds:.2f} s" for what, seconds in floor["parts"].items())
            print(f"{stage} floor: {parts} = {floor['seconds']:.2f} s ({floor['ratio']}x float)")
    if memory is not None:
        print("\ncalibration memory (MiniLM): " + ", ".join(
            f"N={r['n']}: {r['calibrate_s']:.2f} s ({r['time_ratio']}x), {r['calibrate_rss_mib']:.0f} MiB" for r in memory["rows"]))
    held = [v for v in verdicts if v["holds"]]
    print(f"\ntargets: {len(held)}/{len(verdicts)} hold")
    for v in verdicts:
        floor = ""
        if "floor" in v:
            floor = f" (floor {v['floor']}x{': the target is below what the stage must compute' if v['below_floor'] else ''})"
        print(f"  {'holds' if v['holds'] else 'MISSED'}  {v['target']}: {v['value']}{floor}")
    print(f"written: {args.out}")
    return 0
