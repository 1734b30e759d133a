"""`make bench`: the cost of calibration on MiniLM, as ratios to plain float inference.

For each N (50, 200, 800 calibration sentences) two fresh child processes run over the same N samples of
the same prepared model: one plain float inference (the baseline), one our streaming calibration
(statistics of every float activation). Each child reports its wall time and peak RSS (getrusage), so
neither measurement inherits the other's memory. Results: a table on stdout and a JSON file.

Targets (issue 2): time ratio <= 1.3; calibration peak RSS at N=800 <= 1.1 x at N=50.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main"]

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "minilm_l6.yaml"


def _child(mode: str, model_path: Path, n: int, recipe_path: Path, method: str) -> dict:
    import numpy as np  # noqa: F401  (imported before timing, like the library itself)

    from .data import open_dataset
    from .core.onnx_io import load_onnx, make_session
    from .recipe import load_recipe

    recipe = load_recipe(recipe_path)
    data = open_dataset(recipe, "calibration", limit=n, state_model=model_path)
    batches = list(data)  # tokenise up front: both modes time the model only
    model = load_onnx(model_path)
    start = time.perf_counter()
    if mode == "infer":
        session = make_session(model_path)
        for batch in batches:
            session.run(None, batch)
    else:
        from .quant.ranges import choose_range
        from .quant.statistics import collect_histograms

        collector = collect_histograms(model, batches, progress=False)
        for name in collector.names:  # the range computation is part of calibrating
            choose_range(collector[name], method, bits=8, symmetric=True, percentile=99.999)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_kib() / 1024, "samples": len(batches)}


def _peak_rss_kib() -> int:
    """This process's peak RSS. getrusage's ru_maxrss survives execve, so a child spawned by a parent that
    had loaded torch would report the parent's peak; /proc's VmHWM belongs to this address space alone."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _spawn(mode: str, model: Path, n: int, recipe: Path, method: str) -> dict:
    cmd = [sys.executable, "-m", "pipeline.bench", "--child", mode, "--model", str(model), "-n", str(n),
           "--recipe", str(recipe), "--method", method]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"bench child failed ({' '.join(cmd)}):\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/bench.json"))
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 800])
    parser.add_argument("--method", default="percentile", choices=["minmax", "percentile", "entropy", "mse", "auto"])
    parser.add_argument("--child", choices=["infer", "calibrate"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("-n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.model, args.n, args.recipe, args.method)))
        return 0

    from .api import run_stage
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    for stage in ("export", "prepare"):
        run_stage(recipe, stage, force=False, progress=False)
    model = recipe.output_dir() / "prepare" / "model.onnx"
    rows = []
    for n in args.sizes:
        infer = _spawn("infer", model, n, args.recipe, args.method)
        calib = _spawn("calibrate", model, n, args.recipe, args.method)
        rows.append({
            "n": n,
            "samples": calib["samples"],
            "infer_seconds": round(infer["seconds"], 3),
            "calibrate_seconds": round(calib["seconds"], 3),
            "time_ratio": round(calib["seconds"] / infer["seconds"], 3),
            "infer_peak_rss_mib": round(infer["peak_rss_mib"], 1),
            "calibrate_peak_rss_mib": round(calib["peak_rss_mib"], 1),
            "rss_ratio": round(calib["peak_rss_mib"] / infer["peak_rss_mib"], 3),
        })
        print(f"N={n}: done", file=sys.stderr)
    first, last = rows[0], rows[-1]
    summary = {
        "method": args.method,
        "rows": rows,
        "max_time_ratio": max(r["time_ratio"] for r in rows),
        "rss_growth": round(last["calibrate_peak_rss_mib"] / first["calibrate_peak_rss_mib"], 3),
        "targets": {"max_time_ratio": 1.3, "rss_growth": 1.1},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    from .report import format_table

    header = ("N", "infer s", "calib s", "time ratio", "infer RSS MiB", "calib RSS MiB", "RSS ratio")
    table = [
        (r["n"], r["infer_seconds"], r["calibrate_seconds"], r["time_ratio"], r["infer_peak_rss_mib"],
         r["calibrate_peak_rss_mib"], r["rss_ratio"])
        for r in rows
    ]
    print(format_table(header, table))
    print(f"calibration RSS growth N={last['n']} vs N={first['n']}: {summary['rss_growth']} (target <= 1.1); "
          f"max time ratio {summary['max_time_ratio']} (target <= 1.3); method {args.method}")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
