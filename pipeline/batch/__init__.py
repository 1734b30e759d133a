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

Timeouts: each worker is the leader of its own process group (session), so `--timeout` kills the worker
and every process it started; the group is also killed when the worker ends, and when the batch itself is
interrupted, so no worker's child outlives the batch.

Sharding: `--shard i/n` (1 <= i <= n) keeps every n-th recipe of the list sorted by path, starting with the
i-th; n CI jobs given the same arguments cover every recipe exactly once. Duplicate recipe names (or two
recipes writing the same run folder) are refused before anything runs, in every shard alike; names and run
folders that differ only in case count as the same (macOS and Windows filesystems ignore case).
"""


from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..core.onnx_io import THREADS_ENV
from ..errors import PipelineError
from .results import SEVERITY, BatchError, BatchResult, RecipeOutcome, Shard, one_line, status_for

__all__ = ["SEVERITY", "BatchError", "Shard", "RecipeOutcome", "BatchResult", "collect_recipes", "run_batch", "one_line"]

_LOG_TAIL = 20_000  # characters of a worker's output kept for JUnit's <system-out>


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
    from ..recipe import load_recipe

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
        seen: dict[str, list[_Planned]] = {}
        for item in planned:
            if item.recipe is not None:
                value = str(item.recipe.name if attribute == "name" else item.run_dir)
                seen.setdefault(value.casefold(), []).append(item)
        for items in seen.values():
            if len(items) < 2:
                continue
            values = sorted({str(i.recipe.name if attribute == "name" else i.run_dir) for i in items})
            files = " and ".join(_display(i.path) for i in items)
            if len(values) == 1:
                clashes.append(f"{label} '{values[0]}' in {files}")
            else:
                clashes.append(f"{label} {' / '.join(repr(v) for v in values)} (the same folder on a case-insensitive "
                               f"filesystem) in {files}")
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
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise BatchError(f"--timeout: {timeout} is not a positive number of seconds")
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
            try:
                outcomes = list(pool.map(one, selected))
            except BaseException:  # Ctrl-C: workers run in their own sessions, so the terminal's signal
                _kill_all()         # does not reach them; end them before the pool waits for its threads
                raise
    return BatchResult(outcomes, jobs, shard, len(everything), time.perf_counter() - start)


def _run_planned(
    item: _Planned, results_dir: Path, *, force: bool, timeout: float | None, threads: int = 0
) -> RecipeOutcome:
    shown = _display(item.path)
    if item.recipe is None:
        return RecipeOutcome(shown, item.path.stem, "error", item.error.exit_code, one_line(str(item.error)),
                             str(item.error))
    recipe = item.recipe
    # Named by the recipe's path, not its name: a long name plus a temporary suffix may not fit a file name.
    result_file = results_dir / f"{hashlib.sha256(str(item.path).encode()).hexdigest()[:16]}.json"
    command = [sys.executable, "-m", "pipeline.batch", str(item.path), "--out", str(item.run_dir),
               "--result", str(result_file), *(["--force"] if force else [])]
    start = time.perf_counter()
    log, returncode, died = _run_worker(command, timeout, {**os.environ, "PYTHONUNBUFFERED": "1",
                                                           THREADS_ENV: str(threads)})
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


_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is empty already


def _kill_all() -> None:
    with _LIVE_LOCK:
        for proc in list(_LIVE):
            _kill_group(proc)


def _run_worker(command: list[str], timeout: float | None, env: dict) -> tuple[str, int | None, str | None]:
    """Run a worker in its own process group; returns (output, exit status or None, why it died or None).

    The worker is waited for without being reaped (WNOWAIT), so its process group id cannot be reused
    while the group is killed: on a timeout, and after a normal exit (children it left behind).
    """
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    with _LIVE_LOCK:
        _LIVE.add(proc)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read1(1 << 16), b"")), daemon=True)
    reader.start()
    died = None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if deadline is not None and time.monotonic() >= deadline:
                died = f"timed out after {timeout:g} s (the worker and its child processes were killed)"
                break
            time.sleep(0.05)
    finally:
        _kill_group(proc)
        proc.wait()
        with _LIVE_LOCK:
            _LIVE.discard(proc)
    reader.join(timeout=5)  # a process that left the group could keep the pipe open: take what came
    return b"".join(chunks).decode("utf-8", "replace"), None if died else proc.returncode, died
