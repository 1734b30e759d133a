"""`npu-pipeline bench`: how fast an artifact runs, on every execution provider this machine offers.

For each artifact, each model (the quantized `model.onnx` and the float `model.float.onnx`) and each EP,
a fresh child process (`python -m pipeline.tools.latency --child`) measures, so that no measurement
inherits another's memory, caches or thread pools:

- session creation (for an NPU EP this is where the model is compiled), then the first run apart;
- `warmup` runs, not counted; then `runs` runs, each timed alone with `perf_counter_ns` around
  `session.run` on feeds built beforehand (the loop allocates nothing but what `session.run` returns);
- p50/p90/p99 latency, single-stream throughput (samples/s), peak RSS (VmHWM of the child);
- the harness overhead: the same loop around a function that does nothing, as a share of the mean
  latency (it is subtracted nowhere; it says how far the figures can be trusted);
- for an EP other than the CPU: which provider each node landed on (one profiled run), so that a model
  that silently fell back to the CPU says so.

Threads: `threads` intra-op threads (default: every core this process may use, or NPU_PIPELINE_THREADS),
one inter-op thread, the main thread pinned to the first core and each pool thread to the next.
An EP that is not installed gets a row saying so: nothing is estimated in its place.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .common import CPU, VITISAI, Artifact, default_threads, open_artifact, provider_name

__all__ = ["BenchRow", "BenchResult", "bench", "resolve_eps"]

NOT_AVAILABLE = "not available on this machine: not measured"


@dataclass
class BenchRow:
    artifact: str
    model: str  # "quantized", "float", or "model" for a bare ONNX file
    ep: str
    status: str  # "ok", or why nothing was measured
    figures: dict = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict:
        return {"artifact": self.artifact, "model": self.model, "ep": self.ep, "status": self.status, **self.figures}


@dataclass
class BenchResult:
    rows: list[BenchRow]
    settings: dict
    host: dict

    @property
    def overhead_pct(self) -> float | None:
        values = [r.figures["overhead_pct"] for r in self.rows if r.measured]
        return max(values) if values else None

    def not_measured(self) -> list[str]:
        return [f"{r.artifact} {r.model} on {r.ep}: {r.status}" for r in self.rows if not r.measured]

    def table(self) -> str:
        from ..report import format_table

        header = ("artifact", "model", "EP", "create ms", "1st run ms", "p50 ms", "p90 ms", "p99 ms", "samples/s",
                  "peak RSS MiB", "kernels on EP")
        rows = []
        for r in self.rows:
            if not r.measured:
                status = r.status if len(r.status) <= 90 else r.status[:60] + "...: not measured (see bench.json)"
                rows.append((r.artifact, r.model, _short(r.ep), status, "", "", "", "", "", "", ""))
                continue
            f = r.figures
            rows.append((r.artifact, r.model, _short(r.ep), f"{f['create_ms']:.1f}", f"{f['first_run_ms']:.3f}",
                         f"{f['p50_ms']:.3f}", f"{f['p90_ms']:.3f}", f"{f['p99_ms']:.3f}", f"{f['samples_per_s']:.0f}",
                         _mib(f["peak_rss_mib"]), _placement(f)))
        return format_table(header, rows)

    def to_json(self) -> dict:
        return {"settings": self.settings, "host": self.host, "max_overhead_pct": self.overhead_pct,
                "not_measured": self.not_measured(), "rows": [r.as_dict() for r in self.rows]}

    def write(self, out: Path) -> list[Path]:
        from ..core.fileio import dump_json, write_output
        from . import plots

        out = Path(out)
        write_output(out / "bench.json", dump_json(self.to_json()), option="--out")
        measured = [r for r in self.rows if r.measured]
        chart = plots.latency_chart([(f"{r.artifact} | {r.model} | {_short(r.ep)}", r.figures["p50_ms"],
                                      r.figures["p90_ms"], r.figures["p99_ms"]) for r in measured])
        s = self.settings
        sections = [
            f"<p class=note>{s['runs']} timed runs after {s['warmup']} warm-up runs; {s['threads']} intra-op "
            f"thread(s), 1 inter-op, pinned; inputs: {plots.escape(s['inputs'])}. Harness overhead at most "
            f"{self.overhead_pct if self.overhead_pct is not None else '-'}% of the mean latency.</p>",
            chart,
            plots.table(("artifact", "model", "EP", "status", "create ms", "p50 ms", "p90 ms", "p99 ms", "samples/s",
                         "peak RSS MiB", "kernels on EP"),
                        [(r.artifact, r.model, _short(r.ep), r.status, *_html_figures(r)) for r in self.rows]),
        ]
        if self.not_measured():
            sections.append("<h2>Not measured</h2><ul>" + "".join(f"<li>{plots.escape(t)}</li>" for t in self.not_measured()) + "</ul>")
        write_output(out / "bench.html", plots.page("bench: latency per model and execution provider", sections),
                     option="--out")
        return [out / "bench.json", out / "bench.html"]


def _mib(value: float | None) -> str:
    return "not measured (no /proc)" if value is None else f"{value:.0f}"


def _short(ep: str) -> str:
    return ep.removesuffix("ExecutionProvider")


def _placement(figures: dict) -> str:
    nodes = figures.get("nodes_by_provider")
    if not nodes:
        return "all (CPU EP)" if figures.get("providers") == [CPU] else "-"
    total = sum(nodes.values())
    on_ep = nodes.get(figures["ep"], 0)
    return f"{on_ep}/{total}" + (" (rest on CPU)" if on_ep < total else "")


def _html_figures(row: BenchRow) -> tuple:
    if not row.measured:
        return ("",) * 7
    f = row.figures
    return (f"{f['create_ms']:.1f}", f"{f['p50_ms']:.3f}", f"{f['p90_ms']:.3f}", f"{f['p99_ms']:.3f}",
            f"{f['samples_per_s']:.0f}", _mib(f["peak_rss_mib"]), _placement(f))


def resolve_eps(names: Sequence[str]) -> list[str]:
    """`all` -> CPU, VitisAI (measured or said missing) and every other EP onnxruntime offers here."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not names or any(n.strip().lower() == "all" for n in names):
        return list(dict.fromkeys([CPU, VITISAI, *available]))
    return list(dict.fromkeys(provider_name(n) for n in names))


def bench(
    artifacts: Sequence[Path],
    *,
    eps: Sequence[str] = ("all",),
    runs: int = 200,
    warmup: int = 20,
    threads: int = 0,
    inputs: Path | None = None,
    seed: int = 0,
    on_row: Callable[[BenchRow], None] | None = None,
) -> BenchResult:
    """Measure every (artifact, model, EP); rows in that order. Nothing is written here (see `write`)."""
    import onnxruntime as ort

    if runs < 10:
        raise DataError(f"--runs {runs}: at least 10 timed runs are needed for a p90 (100 for a p99 worth reading)")
    if warmup < 0:
        raise DataError("--warmup must be >= 0")
    threads = threads or default_threads()
    opened = [open_artifact(Path(a)) for a in artifacts]
    if inputs is not None:  # checked once here, so a bad file fails before any child starts
        from ..bundle import read_inputs

        for art in opened:
            read_inputs(Path(inputs), art.signature())
    else:
        from .common import random_feeds

        for art in opened:
            random_feeds(art.signature())
    ep_list = resolve_eps(eps)
    available = set(ort.get_available_providers())
    rows = []
    for art in opened:
        seen: dict[str, str] = {}
        for role, path in art.models.items():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            for ep in ep_list:
                if ep not in available:
                    row = BenchRow(art.name, role, ep, NOT_AVAILABLE)
                elif digest in seen:  # BF16 bundles: model.onnx is the float model itself
                    row = BenchRow(art.name, role, ep, f"same file as the {seen[digest]} model: see that row")
                else:
                    job = {"model": str(path), "ep": ep, "bundle": str(art.bundle) if art.bundle else None,
                           "signature": art.signature(), "inputs": str(inputs) if inputs else None, "seed": seed,
                           "runs": runs, "warmup": warmup, "threads": threads}
                    row = _spawn(art, role, ep, job)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
            seen.setdefault(digest, role)
    settings = {"runs": runs, "warmup": warmup, "threads": threads, "inter_op_threads": 1, "pinned": True,
                "inputs": str(inputs) if inputs else f"random (seed {seed}) of the model's signature",
                "eps": ep_list}
    host = {"cores_usable": len(os.sched_getaffinity(0)), "onnxruntime": ort.__version__,
            "available_providers": sorted(available), "python": sys.version.split()[0]}
    return BenchResult(rows, settings, host)


def _spawn(art: Artifact, role: str, ep: str, job: dict) -> BenchRow:
    cmd = [sys.executable, "-m", "pipeline.tools.latency", "--child", json.dumps(job)]
    # The child imports this very copy of the package, wherever it was imported from.
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return BenchRow(art.name, role, ep, f"failed: {reason[:300]}: not measured")
    figures = json.loads(lines[-1])
    if "error" in figures:
        return BenchRow(art.name, role, ep, f"failed: {figures['error'][:300]}: not measured")
    return BenchRow(art.name, role, ep, "ok", figures)


# ----------------------------------------------------------------------------------------- child


def _status_kib(field_name: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return None


def _measure(job: dict) -> dict:
    """Runs in the child: everything is imported and the feeds built before anything is timed."""
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="npu-bench-"))  # VitisAI cache, profile: never in the artifact
    try:
        return _measure_in(job, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _measure_in(job: dict, scratch: Path) -> dict:
    import numpy as np
    import onnxruntime as ort

    from .common import open_artifact, providers_for, random_feeds, session_options

    threads = int(job["threads"])
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[0]})  # the calling thread; pool threads get the next cores (session_options)
    model = Path(job["model"])
    art = open_artifact(Path(job["bundle"])) if job["bundle"] else open_artifact(model)
    if job["inputs"]:
        from ..bundle import read_inputs

        feeds = read_inputs(Path(job["inputs"]), job["signature"])
    else:
        feeds = random_feeds(job["signature"], seed=int(job["seed"]))
    providers = providers_for(job["ep"], art, cache_dir=scratch / "vitisai_cache")
    options = session_options(threads=threads, cores=cores)
    rss_before = _status_kib("VmRSS")
    clock = time.perf_counter_ns
    start = clock()
    try:
        session = ort.InferenceSession(str(model), options, providers=providers)
    except Exception as err:  # onnxruntime's own exception classes: reported, not raised
        return {"error": f"session creation: {type(err).__name__}: {str(err).strip().splitlines()[0]}"}
    create_ns = clock() - start
    run = session.run
    start = clock()
    run(None, feeds)
    first_ns = clock() - start
    for _ in range(int(job["warmup"])):
        run(None, feeds)
    n = int(job["runs"])
    times = np.empty(n, dtype=np.int64)
    loop_start = clock()
    for i in range(n):
        t = clock()
        run(None, feeds)
        times[i] = clock() - t
    loop_ns = clock() - loop_start
    peak_kib = _status_kib("VmHWM")
    overhead_ns = _harness_ns(feeds)
    mean_ns = float(times.mean())
    batch = int(next(iter(feeds.values())).shape[0]) if feeds and next(iter(feeds.values())).ndim else 1
    p50, p90, p99 = np.percentile(times, [50, 90, 99]) / 1e6
    figures = {
        "ep": job["ep"],
        "providers": session.get_providers(),
        "create_ms": create_ns / 1e6,
        "first_run_ms": first_ns / 1e6,
        "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
        "mean_ms": mean_ns / 1e6, "min_ms": float(times.min()) / 1e6, "max_ms": float(times.max()) / 1e6,
        "runs": n, "warmup": int(job["warmup"]), "batch": batch,
        "samples_per_s": batch * n / (float(times.sum()) / 1e9),
        "peak_rss_mib": peak_kib / 1024 if peak_kib else None,
        "rss_before_session_mib": rss_before / 1024 if rss_before else None,
        "harness_ns_per_run": overhead_ns,
        "overhead_pct": round(100.0 * overhead_ns / mean_ns, 4),
        # Time of the timed loop not inside a timed region (loop control, the store): also overhead.
        "untimed_loop_pct": round(100.0 * (loop_ns - float(times.sum())) / loop_ns, 4),
        "threads": threads,
    }
    if job["ep"] != CPU:
        figures["nodes_by_provider"] = _placement_by_profile(model, options, providers, feeds, scratch)
    return figures


def _harness_ns(feeds: dict) -> float:
    """Median cost per iteration of the timing loop around a call that does nothing (10 x 2,000 runs)."""
    import numpy as np

    def nothing(names, inputs):
        return None

    clock = time.perf_counter_ns
    times = np.empty(2000, dtype=np.int64)
    medians = []
    for _ in range(10):
        for i in range(len(times)):
            t = clock()
            nothing(None, feeds)
            times[i] = clock() - t
        medians.append(float(np.median(times)))
    return min(medians)


def _placement_by_profile(model: Path, options, providers: list, feeds: dict, scratch: Path) -> dict[str, int]:
    """{provider: nodes it ran} from one profiled run (onnxruntime records each node's provider)."""
    import onnxruntime as ort

    options.enable_profiling = True
    options.profile_file_prefix = str(scratch / "profile")
    session = ort.InferenceSession(str(model), options, providers=providers)
    session.run(None, feeds)
    trace = json.loads(Path(session.end_profiling()).read_text())
    counts: dict[str, int] = {}
    seen = set()
    for event in trace:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args and args.get("node_index") not in seen:
            seen.add(args.get("node_index"))
            counts[args["provider"]] = counts.get(args["provider"], 0) + 1
    return counts


def _child_main(spec: str) -> int:
    try:
        figures = _measure(json.loads(spec))
    except Exception as err:  # the parent turns this into a "failed: ...: not measured" row
        figures = {"error": f"{type(err).__name__}: {err}"}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(_child_main(sys.argv[2]))
    sys.exit("usage: npu-pipeline bench ARTIFACT... (this module's --child mode is internal)")
