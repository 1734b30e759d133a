"""`npu-pipeline compare`: one recipe in several formats (and targets), side by side, and the cheapest
variant that meets a bar.

Each variant is the recipe with `quantization.target`/`format` overridden, run by the ordinary pipeline
into `<out>/<target>-<format>/`. The cache is shared: export, prepare and calibrate read no
quantization setting, so once one variant has finished, each later variant's folder is seeded with
hard links to those stages (copies across file systems) and the runner, finding the same keys, reports
them cached. (Calibrate's key also records whether statistics are needed: BF16 needs none, so it runs
its own, empty, calibrate.) A variant that fails, a gate included, is recorded and the others go on.

Per variant: accuracy metrics (validate), the worst per-layer SQNR (layer_errors.json), the NPU share of
nodes and MACs (placement), the CPU EP latency of the quantized model (p50 over `runs` runs after a
warm-up, in this process, every usable core), and the model file's size.

Cheapest: the NPU's formats cost, fastest first, XINT8 < A8W8 (= U8S8, the CPU's) < A16W8 < BF16 (AMD's
order of NPU speed); then lower CPU latency; then the smaller model. The bar is `--bar METRIC>=VALUE`
(or `<=`), or else every gate of the recipe.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, PipelineError, RecipeError

__all__ = ["Bar", "Variant", "CompareResult", "compare", "parse_bar", "FORMAT_COST"]

FORMAT_COST = {"xint8": 0, "a8w8": 1, "u8s8": 1, "a16w8": 2, "bf16": 3}


@dataclass(frozen=True)
class Bar:
    metric: str
    op: str  # ">=" or "<="
    value: float

    def holds(self, value: float | None) -> bool:
        if value is None:
            return False
        return value >= self.value if self.op == ">=" else value <= self.value

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


def parse_bar(text: str) -> Bar:
    match = re.fullmatch(r"\s*([A-Za-z_0-9]+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*", text)
    if not match:
        raise DataError(f"--bar '{text}': write METRIC>=VALUE or METRIC<=VALUE (e.g. accuracy>=99, accuracy_drop<=0.5)")
    try:
        return Bar(match.group(1), match.group(2), float(match.group(3)))
    except ValueError:
        raise DataError(f"--bar '{text}': '{match.group(3)}' is not a number") from None


@dataclass
class Variant:
    target: str
    format: str
    run_dir: Path
    status: str = "not run"  # "passed", "gates failed", "not offered: ...", "failed: ..."
    seconds: float = 0.0
    stages: dict[str, bool] = field(default_factory=dict)  # stage -> cached
    figures: dict = field(default_factory=dict)
    meets_bar: bool = False
    error_code: int | None = None

    @property
    def label(self) -> str:
        return f"{self.target}-{self.format}"

    @property
    def built(self) -> bool:
        return self.status in ("passed", "gates failed")

    def cost_key(self) -> tuple:
        return (FORMAT_COST.get(self.format, 9), self.figures.get("cpu_p50_ms", float("inf")),
                self.figures.get("model_mib", float("inf")))


@dataclass
class CompareResult:
    recipe: str
    out: Path
    variants: list[Variant]
    bar: str | None
    chosen: Variant | None
    seconds: float

    def table(self) -> str:
        from ..report import format_table

        header = ("variant", "status", "accuracy %", "top-1 agr. %", "out SQNR dB", "worst layer SQNR dB",
                  "NPU nodes", "NPU MACs", "CPU p50 ms", "model MiB", "stages cached", "time s", "bar")
        rows = []
        for v in self.variants:
            f = v.figures
            rows.append((v.label, v.status if len(v.status) < 60 else v.status[:57] + "...", _fmt(f.get("accuracy")),
                         _fmt(f.get("top1_agreement")), _fmt(f.get("sqnr_db")), _fmt(f.get("worst_layer_sqnr_db")),
                         _pct(f.get("npu_node_share")), _pct(f.get("npu_mac_share")), _fmt(f.get("cpu_p50_ms"), 3),
                         _fmt(f.get("model_mib"), 3), f"{sum(v.stages.values())}/{len(v.stages)}" if v.stages else "-",
                         f"{v.seconds:.1f}", ("meets" if v.meets_bar else "misses") if v.built else "-"))
        return format_table(header, rows)

    def summary(self) -> str:
        if self.bar is None:
            return "no bar: give --bar METRIC>=VALUE, or gates in the recipe, to choose a variant"
        if self.chosen is None:
            return f"no variant meets the bar ({self.bar})"
        return (f"cheapest variant meeting the bar ({self.bar}): {self.chosen.label} "
                f"(artifact: {self.chosen.run_dir / 'artifact'})")

    def to_json(self) -> dict:
        return {
            "recipe": self.recipe, "bar": self.bar, "seconds": round(self.seconds, 3),
            "chosen": self.chosen.label if self.chosen else None,
            "cost_order": "NPU format (xint8 < a8w8 = u8s8 < a16w8 < bf16), then CPU p50 latency, then model size",
            "variants": [{"variant": v.label, "target": v.target, "format": v.format, "status": v.status,
                          "run_dir": str(v.run_dir), "seconds": round(v.seconds, 3), "stages_cached": v.stages,
                          "meets_bar": v.meets_bar, **v.figures} for v in self.variants],
        }

    def write(self) -> list[Path]:
        from ..core.fileio import dump_json, write_output
        from . import plots

        write_output(self.out / "compare.json", dump_json(self.to_json()), option="--out")
        metric = self.bar.split()[0] if self.bar and not self.bar.startswith("gates") else "accuracy"
        ranked = sorted(self.variants, key=lambda v: (not v.built, v.cost_key()))
        points = [(v.label, i, v.figures.get(metric), v is self.chosen) for i, v in enumerate(ranked)]
        bar_value = float(self.bar.split()[-1]) if self.bar and not self.bar.startswith("gates") else None
        lines = self.table().splitlines()
        header = [h.strip() for h in re.split(r"\s{2,}", lines[0])]
        body = [[c.strip() for c in re.split(r"\s{2,}", ln, maxsplit=len(header) - 1)] for ln in lines[2:]]
        sections = [f"<p>{plots.escape(self.summary())}</p>",
                    plots.tradeoff_chart(points, ylabel=metric, bar=bar_value),
                    plots.table(header, body),
                    f"<p class=note>{plots.escape(self.to_json()['cost_order'])}. CPU p50: onnxruntime's CPU EP on "
                    "this machine, not the NPU. Worst layer SQNR: the lowest per-layer SQNR of layer_errors.json.</p>"]
        write_output(self.out / "compare.html", plots.page(f"compare: {self.recipe}", sections), option="--out")
        return [self.out / "compare.json", self.out / "compare.html"]


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def compare(
    recipe: Path,
    *,
    formats: Sequence[str],
    targets: Sequence[str] = (),
    out: Path | None = None,
    bar: str | None = None,
    force: bool = False,
    runs: int = 30,
    on_variant: Callable[[Variant], None] | None = None,
) -> CompareResult:
    """Run every (target, format) variant of `recipe`; see the module doc. Raises the first variant's
    error only when no variant could be built at all (bad data, say), so the exit code says why."""
    from ..recipe import load_recipe

    start = time.perf_counter()
    base = load_recipe(recipe)
    formats = [f.strip().lower() for f in formats if f.strip()]
    targets = [t.strip().lower() for t in targets if t.strip()] or [base.quantization.target]
    if not formats:
        raise DataError("--formats: give at least one format (xint8, a8w8, a16w8, bf16, u8s8)")
    parsed = parse_bar(bar) if bar else None
    if parsed is not None and parsed.metric not in _METRICS:
        raise DataError(f"--bar: unknown metric '{parsed.metric}' (use one of: {', '.join(sorted(_METRICS))})")
    out = Path(out).resolve() if out else (Path.cwd() / "build" / f"{base.name}-compare").resolve()
    # Only what the recipe says: a key it left out stays out, so the presets fill the same keys they fill
    # for the recipe itself (a dumped default `calibration.method: minmax` would turn the CNN preset's
    # activation ranges off).
    data = base.model_dump(mode="json", exclude_unset=True)
    data.pop("output", None)
    variants, errors, seed = [], [], None
    for target in targets:
        for fmt in formats:
            variant = Variant(target, fmt, out / f"{target}-{fmt}")
            variants.append(variant)
            spec = _variant_recipe(data, base, target, fmt, source=str(recipe))
            if isinstance(spec, str):
                variant.status = f"not offered: {spec}"
            else:
                if seed is not None and not force:
                    seed_cache(seed, variant.run_dir, spec)
                err = _run(variant, spec, force=force, runs=runs)
                if err is not None:
                    errors.append(err)
                elif seed is None:
                    seed = variant.run_dir
            if on_variant is not None:
                on_variant(variant)
    if errors and not any(v.built for v in variants):
        raise errors[0]
    for v in variants:
        if v.built:
            v.meets_bar = parsed.holds(v.figures.get(parsed.metric)) if parsed else v.figures.get("gates_passed", False)
            if parsed and parsed.metric not in v.figures:
                raise DataError(f"--bar: {v.label} has no '{parsed.metric}' for this task "
                                f"(measured: {', '.join(sorted(_METRICS & set(v.figures)))})")
    passing = sorted((v for v in variants if v.built and v.meets_bar), key=Variant.cost_key)
    bar_text = str(parsed) if parsed else ("gates of the recipe" if base.gates else None)
    chosen = passing[0] if passing and bar_text else None
    return CompareResult(base.name, out, variants, bar_text, chosen, time.perf_counter() - start)


_METRICS = {"accuracy", "accuracy_drop", "top1_agreement", "cosine_mean", "cosine_min", "nn_agreement", "sqnr_db",
            "max_abs_error", "worst_layer_sqnr_db", "npu_node_share", "npu_mac_share", "cpu_p50_ms", "model_mib"}


def _variant_recipe(data: dict, base, target: str, fmt: str, *, source: str):
    """The recipe with target and format set, named after the variant; a string says why it cannot be."""
    from ..recipe import recipe_from_dict

    d = copy.deepcopy(data)
    d.setdefault("quantization", {})["target"] = target
    d["quantization"]["format"] = fmt
    d["name"] = f"{base.name}-{target}-{fmt}"  # as its folder: artifacts of two variants never share a name
    try:
        return recipe_from_dict(d, source=f"{source} (target {target}, format {fmt})", base_dir=base.base_dir)
    except RecipeError as err:
        return str(err).split(": ", 1)[-1]


def _run(variant: Variant, spec, *, force: bool, runs: int) -> PipelineError | None:
    from ..api import run_recipe

    start = time.perf_counter()
    try:
        result = run_recipe(spec, out=variant.run_dir, force=force, progress=False, check_gates=False)
    except PipelineError as err:  # one variant's failure is its own row; the others go on
        variant.status = f"failed: {err}"
        variant.error_code = err.exit_code
        variant.seconds = time.perf_counter() - start
        return err
    variant.stages = {o.name: o.cached for o in result.outcomes}
    gates_passed = all(g.passed for g in result.gates)
    variant.status = "passed" if gates_passed else "gates failed"
    variant.figures = _figures(result.artifact, runs=runs)
    variant.figures["gates_passed"] = gates_passed
    variant.seconds = time.perf_counter() - start
    return None


def _figures(artifact: Path, *, runs: int) -> dict:
    manifest = json.loads((artifact / "manifest.json").read_text())
    metrics = manifest["metrics"]
    figures = {k: metrics[k] for k in ("accuracy", "accuracy_drop", "top1_agreement", "cosine_mean", "cosine_min",
                                       "nn_agreement", "sqnr_db", "max_abs_error") if k in metrics}
    layers = artifact / "layer_errors.json"
    if layers.is_file():
        values = [layer["sqnr_db"] for layer in json.loads(layers.read_text()).get("layers", [])]
        figures["worst_layer_sqnr_db"] = min(values) if values else None
    placement = manifest["placement"]
    figures["npu_node_share"] = placement["npu_node_share"]
    figures["npu_mac_share"] = placement["npu_mac_share"]
    figures["model_mib"] = (artifact / "model.onnx").stat().st_size / 2**20
    figures["cpu_p50_ms"] = cpu_latency(artifact / "model.onnx", manifest["signature"]["inputs"], runs=runs)
    return figures


def cpu_latency(model: Path, signature: list[dict], *, runs: int, warmup: int = 5) -> float:
    """p50 (ms) of the CPU EP, full optimizations, every usable core; feeds built before timing."""
    import numpy as np

    from .common import CPU, ep_session, random_feeds

    session = ep_session(model.read_bytes(), [CPU], optimize=True)
    feeds = random_feeds(signature)
    for _ in range(warmup):
        session.run(None, feeds)
    times = np.empty(max(runs, 1), dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(len(times)):
        t = clock()
        session.run(None, feeds)
        times[i] = clock() - t
    return float(np.median(times)) / 1e6


def seed_cache(source_run: Path, run_dir: Path, recipe) -> list[str]:
    """Hard-link (else copy) into `run_dir` each finished stage of `source_run` that reads no quantization
    setting, where `recipe` needs exactly the key that stage has there; returns the stages seeded."""
    from ..api import STAGES, stage_by_name
    from ..runner import RunContext, StageRecord, run_lock

    seeded = []
    ctx = RunContext(recipe, run_dir, progress=False)
    with run_lock(run_dir):
        for api_name in STAGES:
            stage = stage_by_name(api_name)
            if "quantization" in stage.sections:
                break  # this stage and every later one depend on the format
            source = StageRecord.load(source_run / stage.folder_name())
            if source is None or any(StageRecord.load(run_dir / a) is None for a in stage.after):
                break
            if source.key != stage.key(ctx):
                continue  # this variant needs another result (BF16's calibrate): the runner makes it
            existing = StageRecord.load(run_dir / stage.name)
            if existing is not None and existing.key == source.key:
                continue
            scratch = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{stage.name}."))  # the runner's leftover pattern
            try:
                shutil.copytree(source_run / stage.name, scratch, copy_function=_link_or_copy, dirs_exist_ok=True)
                trash = run_dir / f".{stage.name}.old.{os.getpid()}"
                if (run_dir / stage.name).exists():
                    os.replace(run_dir / stage.name, trash)
                os.replace(scratch, run_dir / stage.name)
                shutil.rmtree(trash, ignore_errors=True)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(scratch)
            seeded.append(stage.name)
    return seeded


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # stage files are replaced, never rewritten in place: sharing them is safe
    except OSError:
        shutil.copy2(src, dst)
