"""Bench children (`python -m pipeline.bench.child MODE ...`): each measurement in a fresh process, so none
inherits another's memory. Prints one JSON line.

    pipeline RECIPE DIR        every stage of RECIPE into DIR: seconds and peak RSS per stage
    float RECIPE DIR           plain float inference of the prepared model over the calibration and the
                               validation samples (data decoded before the clock starts; the decoding is
                               timed on its own), and the quantized model in validate's NPU emulation
                               over the validation samples (what validate runs besides the float model)
    scan-infer RECIPE DIR N    float inference of N calibration samples
    scan-calibrate RECIPE DIR N  calibration statistics (and ranges) of N calibration samples
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux: clear_refs 5); a no-op where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mib() -> float:
    """This process's peak RSS since the last reset. getrusage's ru_maxrss survives execve (a child of a
    parent that had loaded torch would report the parent's peak); /proc's VmHWM is this address space's."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _process_age_s() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    import os

    ticks = os.sysconf("SC_CLK_TCK")
    start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start


def pipeline(recipe_path: str, out: str) -> dict:
    from ..api import STAGES, run_stage
    from ..recipe import load_recipe

    recipe = load_recipe(recipe_path)
    startup = _process_age_s()
    stages = {}
    for name in STAGES:
        _reset_peak()
        start = time.perf_counter()
        outcome = run_stage(recipe, name, out=Path(out), force=True, progress=False)
        seconds = time.perf_counter() - start
        stages[name] = {"seconds": round(seconds, 3), "peak_rss_mib": round(_peak_rss_mib(), 1),
                        **({"skipped": True} if outcome.record.metrics.get("skipped") else {})}
    return {"startup_s": round(startup, 3), "stages": stages}


def _samples(recipe, section: str, limit: int | None = None) -> list[dict]:
    from ..data import open_dataset

    return list(open_dataset(recipe, section, limit=limit))


def _timed_samples(recipe, section: str) -> tuple[list[dict], float]:
    start = time.perf_counter()
    batches = _samples(recipe, section)
    return batches, round(time.perf_counter() - start, 3)


def _time_inference(model: Path, batches: list[dict], *, npu_emulation: bool = False) -> dict:
    from ..core.onnx_io import make_session

    _reset_peak()
    start = time.perf_counter()
    session = make_session(model, npu_emulation=npu_emulation)
    for batch in batches:
        session.run(None, batch)
    return {"seconds": round(time.perf_counter() - start, 3), "peak_rss_mib": round(_peak_rss_mib(), 1),
            "samples": len(batches)}


def float_inference(recipe_path: str, out: str) -> dict:
    # The same libraries resident as in the pipeline child (torch for export, every stage's imports), so
    # that peak RSS compares like with like: what a stage adds over plain inference, not over an empty process.
    import torch  # noqa: F401

    from .. import api  # noqa: F401
    from ..recipe import load_recipe

    recipe = load_recipe(recipe_path)
    model = Path(out) / "prepare" / "model.onnx"
    (calibration, calibration_s), (validation, validation_s) = (_timed_samples(recipe, "calibration"),
                                                                 _timed_samples(recipe, "validation"))
    result = {"calibration": {**_time_inference(model, calibration), "data_s": calibration_s},
              "validation": {**_time_inference(model, validation), "data_s": validation_s}}
    # The model validate emulates (quantize's BF16-rounding copy where there is one, as validate picks it).
    quantized = next((p for p in (Path(out) / "quantize" / n for n in ("emulated.onnx", "model.onnx")) if p.is_file()), None)
    if quantized is not None:
        result["emulated_validation"] = _time_inference(quantized, validation, npu_emulation=True)
    return result


def _prepared(recipe_path: str, out: str):
    from ..api import run_stage
    from ..recipe import load_recipe

    recipe = load_recipe(recipe_path)
    for name in ("export", "prepare"):
        run_stage(recipe, name, out=Path(out), force=False, progress=False)
    return recipe, Path(out) / "prepare" / "model.onnx"


def scan(mode: str, recipe_path: str, out: str, n: str) -> dict:
    recipe, model_path = _prepared(recipe_path, out)
    batches = _samples(recipe, "calibration", int(n))
    if mode == "scan-infer":
        return _time_inference(model_path, batches)
    from ..core.onnx_io import load_onnx
    from ..quant.ranges import choose_range
    from ..quant.statistics import collect_histograms

    model = load_onnx(model_path)
    _reset_peak()
    start = time.perf_counter()
    collector = collect_histograms(model, batches, progress=False)
    for name in collector.names:  # the range computation is part of calibrating
        choose_range(collector[name], recipe.calibration.method, bits=8, symmetric=True,
                     percentile=recipe.calibration.percentile)
    return {"seconds": round(time.perf_counter() - start, 3), "peak_rss_mib": round(_peak_rss_mib(), 1),
            "samples": len(batches)}


def main(argv: list[str]) -> int:
    mode, *rest = argv
    if mode == "pipeline":
        result = pipeline(*rest)
    elif mode == "float":
        result = float_inference(*rest)
    elif mode in ("scan-infer", "scan-calibrate"):
        result = scan(mode, *rest)
    else:
        raise SystemExit(f"unknown bench child mode {mode!r}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
