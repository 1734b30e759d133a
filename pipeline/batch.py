"""Convert many recipes at once (CI): parallel, isolated, sharded, with a summary table, JSON and JUnit XML.

Each recipe runs in its own worker process, a fresh interpreter started as `python -m pipeline.batch`, so a
recipe that crashes the interpreter (a segfault in a native library, the OOM killer, a timeout) costs that
recipe only: the worker writes its result to a JSON file, and a worker that dies before writing one is
reported as an error with its signal or exit status and the tail of its output. A process pool would lose
every queued recipe when one worker dies (`BrokenProcessPool`), which is why it is not used here.

Statuses and exit codes. A recipe *passed* (0); *failed*: the pipeline ran and judged the model: a stage
check failed (3), the model breaks a hard NPU rule (5), an accuracy gate failed (4); or is an *error*: the
recipe or its inputs are bad (2), or the worker crashed, timed out or hit a bug (1). JUnit reports
failures as <failure> and errors as <error>. The batch exits 0 only when every selected recipe passed,
else with the most severe code present, in the order 1 > 2 > 3 > 5 > 4: the further a recipe is from a
usable artifact, the more severe (nothing known, never started, no artifact, an artifact the NPU rejects,
an artifact short of its accuracy gates).

Sharding: `--shard i/n` (1 <= i <= n) keeps every n-th recipe of the list sorted by path, starting with the
i-th; n CI jobs given the same arguments cover every recipe exactly once. Duplicate recipe names (or two
recipes writing the same run folder) are refused before anything runs, in every shard alike.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import PipelineError
from .core.onnx_io import THREADS_ENV

__all__ = ["BatchError", "Shard", "RecipeOutcome", "BatchResult", "collect_recipes", "run_batch"]

# Most severe first (see the module docstring); any other code ranks after these.
SEVERITY = (1, 2, 3, 5, 4)
_FAILURE_CODES = {3, 4, 5}
_LOG_TAIL = 20_000  # characters of a worker's output kept for JUnit's <system-out>


class BatchError(PipelineError):
    """The batch cannot start: no recipes, a bad --shard, duplicate recipe names or run folders."""

    exit_code = 2


@dataclass(frozen=True)
class Shard:
    """The `index`-th (1-based) of `count` disjoint slices of a sorted recipe list."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        head, sep, tail = text.partition("/")
        if sep and head.strip().isdigit() and tail.strip().isdigit():
            shard = cls(int(head), int(tail))
            if 1 <= shard.index <= shard.count:
                return shard
        raise BatchError(f"--shard: {text!r} is not i/n with 1 <= i <= n (e.g. 1/4)")

    def select(self, items: Sequence) -> list:
        """Round-robin over the sorted list: shards differ in size by at most one recipe."""
        return [item for position, item in enumerate(items) if position % self.count == self.index - 1]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class RecipeOutcome:
    """One recipe's result: what the summary table, the JSON summary and the JUnit testcase show."""

    recipe: str
    name: str
    status: str  # "passed" | "failed" | "error"
    exit_code: int
    message: str = ""  # one line; empty when passed
    detail: str = ""  # the full message (may span lines)
    target: str | None = None
    format: str | None = None
    gates: list[dict] = field(default_factory=list)
    stages: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    artifact: str | None = None
    log: str = ""

    @property
    def gate_summary(self) -> str:
        if not self.gates:
            return "-"
        passed = sum(1 for g in self.gates if g["passed"])
        return f"{passed}/{len(self.gates)} {'pass' if passed == len(self.gates) else 'FAIL'}"

    @property
    def cache_summary(self) -> str:
        cached = sum(1 for s in self.stages.values() if s.get("cached"))
        return f"{cached}/{len(self.stages)}" if self.stages else "-"

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("log")
        return data


def _status_for(code: int) -> str:
    return "passed" if code == 0 else "failed" if code in _FAILURE_CODES else "error"


def one_line(message: str) -> str:
    """A possibly multi-line error message as one line (a recipe's error list is joined with '; ')."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    head, rest = lines[0], lines[1:]
    return f"{head} {'; '.join(rest)}" if head.endswith(":") else "; ".join(lines)


@dataclass
class BatchResult:
    outcomes: list[RecipeOutcome]
    jobs: int
    shard: Shard | None
    total: int  # recipes found before sharding
    seconds: float

    @property
    def exit_code(self) -> int:
        codes = {o.exit_code for o in self.outcomes if o.exit_code != 0}
        if not codes:
            return 0
        return min(codes, key=lambda c: SEVERITY.index(c) if c in SEVERITY else len(SEVERITY) + c)

    def counts(self) -> dict[str, int]:
        counts = {"passed": 0, "failed": 0, "error": 0}
        for outcome in self.outcomes:
            counts[outcome.status] += 1
        return counts

    def table(self) -> str:
        from .report import format_table

        rows = [
            (o.name, o.target or "-", o.format or "-", o.gate_summary, o.cache_summary, f"{o.seconds:.1f} s",
             o.status.upper() if o.status != "passed" else o.status, o.artifact or "-")
            for o in self.outcomes
        ]
        header = ("recipe", "target", "format", "gates", "cached", "time", "status", "artifact")
        lines = [format_table(header, rows)] if rows else ["(no recipes in this shard)"]
        lines += [o.message if o.message.startswith(f"{o.name}:") else f"{o.name}: {o.message}"
                  for o in self.outcomes if o.status != "passed"]
        counts = self.counts()
        shard = f", shard {self.shard} of {self.total} recipes" if self.shard else ""
        lines.append(
            f"{len(self.outcomes)} recipe(s){shard}: {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['error']} error(s) in {self.seconds:.1f} s with {self.jobs} job(s); exit code {self.exit_code}"
        )
        return "\n".join(lines)

    def summary(self) -> dict:
        return {
            "exit_code": self.exit_code,
            "counts": self.counts(),
            "jobs": self.jobs,
            "shard": str(self.shard) if self.shard else None,
            "recipes_total": self.total,
            "seconds": round(self.seconds, 2),
            "recipes": [o.as_dict() for o in self.outcomes],
        }

    def write_summary(self, path: Path) -> None:
        from .runner import dump_json

        _write_report(path, dump_json(self.summary()), "--summary")

    def write_junit(self, path: Path) -> None:
        _write_report(path, junit_xml(self), "--junit")


def _write_report(path: Path, text: str, option: str) -> None:
    from .core.fileio import atomic_write

    try:
        atomic_write(Path(path), text)
    except OSError as err:
        raise BatchError(f"{option}: cannot write {path} ({err.strerror or err})") from None


def _xml_text(text: str) -> str:
    """Drop the characters XML 1.0 cannot hold (terminal escapes, NULs) from captured output."""
    return "".join(c for c in text if c in "\t\n\r" or (" " <= c <= "\ud7ff") or ("\ue000" <= c <= "\ufffd")
                   or c >= "\U00010000")


def junit_xml(result: BatchResult) -> str:
    """One <testcase> per recipe; gate, stage and readiness failures as <failure>, the rest as <error>."""
    import xml.etree.ElementTree as ET

    counts = result.counts()
    attrs = {"tests": str(len(result.outcomes)), "failures": str(counts["failed"]), "errors": str(counts["error"]),
             "skipped": "0", "time": f"{result.seconds:.3f}"}
    root = ET.Element("testsuites", {"name": "npu-pipeline batch", **attrs})
    suite_name = f"npu-pipeline batch{f' shard {result.shard}' if result.shard else ''}"
    suite = ET.SubElement(root, "testsuite", {"name": suite_name, **attrs})
    for o in result.outcomes:
        case = ET.SubElement(suite, "testcase", {
            "classname": f"npu-pipeline.{o.target or 'unknown'}.{o.format or 'unknown'}",
            "name": o.name, "file": o.recipe, "time": f"{o.seconds:.3f}",
        })
        props = ET.SubElement(case, "properties")
        for key, value in (("recipe", o.recipe), ("exit_code", o.exit_code), ("artifact", o.artifact or ""),
                           ("gates", o.gate_summary), ("cached_stages", o.cache_summary)):
            ET.SubElement(props, "property", {"name": key, "value": _xml_text(str(value))})
        if o.status != "passed":
            tag = "failure" if o.status == "failed" else "error"
            kind = {1: "InternalError", 2: "BadInput", 3: "StageError", 4: "GateError", 5: "ReadinessError"}
            element = ET.SubElement(case, tag, {"message": _xml_text(o.message), "type": kind.get(o.exit_code, "Error")})
            element.text = _xml_text(o.detail or o.message)
        if o.log:
            ET.SubElement(case, "system-out").text = _xml_text(o.log)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def collect_recipes(paths: Iterable[Path | str]) -> list[Path]:
    """Recipe files from files and folders (a folder's *.yaml and *.yml, not recursive), sorted, deduplicated."""
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inside = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
            if not inside:
                raise BatchError(f"{path}: folder holds no *.yaml recipes")
            found.update(dict.fromkeys(p.resolve() for p in inside))
        elif path.is_file():
            found.update({path.resolve(): None})
        else:
            raise BatchError(f"{path}: no such recipe file or folder")
    if not found:
        raise BatchError("no recipes given")
    return sorted(found, key=lambda p: p.as_posix())


def _display(path: Path) -> str:
    cwd = Path.cwd()
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


@dataclass
class _Planned:
    path: Path
    recipe: object | None  # a loaded Recipe, or None when it failed to load
    run_dir: Path | None
    error: PipelineError | None = None


def _plan(paths: list[Path], out_root: Path | None) -> list[_Planned]:
    from .recipe import load_recipe

    planned = []
    for path in paths:
        try:
            recipe = load_recipe(path)
        except PipelineError as err:
            planned.append(_Planned(path, None, None, err))
            continue
        run_dir = (Path(out_root).resolve() / recipe.name) if out_root is not None else recipe.output_dir()
        planned.append(_Planned(path, recipe, run_dir))
    clashes = []
    for attribute, label in (("name", "recipe name"), ("run_dir", "run folder")):
        seen: dict[object, list[Path]] = {}
        for item in planned:
            if item.recipe is not None:
                key = item.recipe.name if attribute == "name" else item.run_dir
                seen.setdefault(key, []).append(item.path)
        clashes += [f"{label} '{key}' in {' and '.join(map(_display, files))}"
                    for key, files in seen.items() if len(files) > 1]
    if clashes:
        raise BatchError(
            f"duplicate {'; '.join(clashes)}: each recipe writes its own run folder, so names (and outputs) "
            "must be unique within a batch"
        )
    return planned


def run_batch(
    paths: Iterable[Path | str],
    *,
    jobs: int = 1,
    shard: Shard | str | None = None,
    out_root: Path | None = None,
    force: bool = False,
    timeout: float | None = None,
    on_done: Callable[[RecipeOutcome], None] | None = None,
) -> BatchResult:
    """Run every recipe found in `paths` (files or folders), `jobs` at a time, each in its own process.

    `out_root`: run folders go to `<out_root>/<name>` (default: each recipe's own output, else
    build/<name>). `timeout`: seconds per recipe, after which its worker is killed. Raises `BatchError`
    before running anything if the batch itself is wrong; a recipe's own failure is in its outcome.
    """
    if jobs < 1:
        raise BatchError(f"--jobs: {jobs} is not a positive number of worker processes")
    if isinstance(shard, str):
        shard = Shard.parse(shard)
    start = time.perf_counter()
    everything = collect_recipes(paths)
    planned = _plan(everything, out_root)
    selected = shard.select(planned) if shard is not None else planned
    with tempfile.TemporaryDirectory(prefix="npu-batch-") as results_dir:
        def one(item: _Planned) -> RecipeOutcome:
            outcome = _run_planned(item, Path(results_dir), force=force, timeout=timeout, threads=threads)
            if on_done is not None:
                on_done(outcome)
            return outcome

        # Each worker's onnxruntime would otherwise use every core: jobs x cores threads thrash.
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            outcomes = list(pool.map(one, selected))
    return BatchResult(outcomes, jobs, shard, len(everything), time.perf_counter() - start)


def _run_planned(
    item: _Planned, results_dir: Path, *, force: bool, timeout: float | None, threads: int = 0
) -> RecipeOutcome:
    shown = _display(item.path)
    if item.recipe is None:
        return RecipeOutcome(shown, item.path.stem, "error", item.error.exit_code, one_line(str(item.error)),
                             str(item.error))
    recipe = item.recipe
    result_file = results_dir / f"{recipe.name}.json"
    command = [sys.executable, "-m", "pipeline.batch", str(item.path), "--out", str(item.run_dir),
               "--result", str(result_file), *(["--force"] if force else [])]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                     THREADS_ENV: str(threads)})
        log, returncode, died = proc.stdout.decode("utf-8", "replace"), proc.returncode, None
    except subprocess.TimeoutExpired as err:  # subprocess.run has killed the worker
        log = (err.stdout or b"").decode("utf-8", "replace")
        returncode, died = None, f"timed out after {timeout:g} s (worker killed)"
    seconds = time.perf_counter() - start
    outcome = RecipeOutcome(shown, recipe.name, "error", 1, target=recipe.quantization.target,
                            format=recipe.quantization.format.value if recipe.quantization.format else None,
                            log=log[-_LOG_TAIL:])
    try:
        data = json.loads(result_file.read_text())
    except (OSError, ValueError):
        data = None
    if data is not None and died is None:
        for key, value in data.items():
            setattr(outcome, key, value)
    else:
        if died is None:
            died = (f"worker killed by {signal.Signals(-returncode).name}" if returncode and returncode < 0
                    else f"worker exited with code {returncode} without a result")
        last = next((line for line in reversed(log.splitlines()) if line.strip()), "")
        outcome.message = f"{died}{f'; last output: {last.strip()}' if last else ''}"
        outcome.detail = outcome.message
    outcome.seconds = round(seconds, 3)
    outcome.recipe = shown
    return outcome


# --- the worker: `python -m pipeline.batch RECIPE --out DIR --result FILE [--force]` ----------------------


def _worker(argv: list[str]) -> int:
    """Convert one recipe and write its `RecipeOutcome` fields as JSON; the exit code is the outcome's."""
    import argparse
    import traceback

    parser = argparse.ArgumentParser(prog="python -m pipeline.batch", description="batch worker (internal)")
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)

    from .api import run_recipe
    from .errors import GateError
    from .recipe import load_recipe
    from .core.fileio import atomic_write, dump_json

    stages: dict[str, dict] = {}
    gates: list[dict] = []

    def on_stage(outcome) -> None:
        stages[outcome.name] = {"cached": outcome.cached, "seconds": outcome.record.seconds}
        print(f"  {outcome.name:<10} {'cached (unchanged)' if outcome.cached else f'{outcome.record.seconds:.2f} s'}")
        if outcome.name == "package":
            gates[:] = outcome.record.metrics.get("gates", [])

    fields: dict = {"stages": stages, "gates": gates}
    try:
        recipe = load_recipe(args.recipe)
        fields["name"] = recipe.name
        target, fmt = recipe.target_and_format()
        fields.update(target=target.name, format=fmt.value)
        print(f"{recipe.name}: {args.out}")
        run_recipe(recipe, out=args.out, force=args.force, progress=False, on_stage=on_stage)
        code, message = 0, ""
    except GateError as err:
        code, message = err.exit_code, str(err)
    except PipelineError as err:
        code, message = err.exit_code, str(err)
        print(f"error: {err}", file=sys.stderr)
    except Exception as err:  # a bug: keep its traceback in the log, report it as an internal error
        traceback.print_exc()
        code, message = 1, f"internal error: {type(err).__name__}: {err}"
    artifact = args.out.resolve() / "artifact"
    fields.update(
        status=_status_for(code), exit_code=code, message=one_line(message), detail=message,
        artifact=str(artifact) if "package" in stages else None,
    )
    atomic_write(args.result, dump_json(fields))
    return code


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
