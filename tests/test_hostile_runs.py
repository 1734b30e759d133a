"""Hostile runs (issue 11): batch (timeouts that kill whole process groups, names that clash by case or
length, bad --timeout values), a full disk, a real bug (exit 1 with its traceback), the limits table, the
bounded readers' memory, and the size of the whole hostile catalogue.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml

from .conftest import ROOT
from .test_bad_inputs import (
    _invoke, assert_clean_failure, assert_nothing_half_written, assert_untouched, edit, snapshot,
)


def _variant(base: Path, name: str, **changes) -> Path:
    data = yaml.safe_load(base.read_text())
    data.pop("output", None)
    data.update(name=name, **changes)
    path = base.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped is dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# --- batch -------------------------------------------------------------------------------------------------


BATCH_CASES = [
    ("timeout-nan", ["--timeout", "nan"], ("--timeout", "nan", "positive number of seconds")),
    ("timeout-inf", ["--timeout", "inf"], ("--timeout", "inf")),
    ("timeout-negative", ["--timeout", "-1"], ("--timeout", "-1")),
    ("timeout-zero", ["--timeout", "0"], ("--timeout", "0")),
    ("jobs-zero", ["--jobs", "0"], ("--jobs", "0")),
    ("jobs-negative", ["--jobs", "-2"], ("--jobs", "-2")),
]


@pytest.mark.parametrize("case", BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_batch_refuses_bad_options(case, tiny_cnn_recipe):
    _, extra, fragments = case
    recipe = tiny_cnn_recipe()
    before = snapshot(recipe.parent)
    result = _invoke(["batch", str(recipe), "--out-root", "runs", *extra], recipe.parent)
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 2, fragments)
    assert_untouched(before, recipe.parent, ())


def test_batch_names_differing_only_in_case_clash(tiny_cnn_recipe):
    lower = tiny_cnn_recipe()  # tiny.yaml, name 'tiny'
    upper = _variant(lower, "Tiny")
    before = snapshot(lower.parent)
    result = _invoke(["batch", str(upper), str(lower), "--out-root", "runs"], lower.parent)
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 2,
                         ("duplicate recipe name", "'Tiny' / 'tiny'", "case-insensitive", "Tiny.yaml", "tiny.yaml"))
    assert_untouched(before, lower.parent, ())


def test_batch_run_folders_differing_only_in_case_clash(tiny_cnn_recipe):
    base = tiny_cnn_recipe()
    one = _variant(base, "one", output="Build")
    two = _variant(base, "two", output="build")
    before = snapshot(base.parent)
    result = _invoke(["batch", str(one), str(two)], base.parent)
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 2, ("duplicate run folder", "case-insensitive"))
    assert_untouched(before, base.parent, ())


def test_batch_240_character_name_is_refused_before_running(tiny_cnn_recipe):
    """Formerly: converted, then the worker crashed writing its result file (name too long)."""
    base = tiny_cnn_recipe()
    long = _variant(base, "a" * 240)
    before = snapshot(base.parent)
    result = _invoke(["batch", str(long), "--out-root", "runs"], base.parent)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "at most 128" in result.stdout and "error" in result.stdout.lower()
    assert not (base.parent / "runs").exists()
    assert_untouched(before, base.parent, ())


def test_batch_128_character_name_converts(tiny_cnn_recipe, tmp_path: Path, monkeypatch):
    """The longest name allowed goes through a worker and back (result file named by the recipe's path)."""
    from pipeline.batch import run_batch

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    base = tiny_cnn_recipe()
    result = run_batch([_variant(base, "b" * 128)], out_root=tmp_path / "runs")
    assert result.exit_code == 0, result.outcomes[0].message
    assert (tmp_path / "runs" / ("b" * 128) / "artifact" / "manifest.json").is_file()


def test_batch_timeout_kills_the_workers_children(tiny_cnn_recipe, tmp_path: Path, monkeypatch):
    """A builder that starts a child process and hangs: --timeout kills the worker and its child."""
    from pipeline.batch import run_batch

    base = tiny_cnn_recipe()
    pid_file = tmp_path / "child.pid"
    (base.parent / "spawning_builder.py").write_text(
        "import subprocess, time\n"
        "def build():\n"
        f"    child = subprocess.Popen(['sleep', '300'])\n"
        f"    open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "    time.sleep(300)\n"
    )
    monkeypatch.setenv("PYTHONPATH", f"{base.parent}{os.pathsep}{ROOT}")
    recipe = _variant(base, "spawner", model={"builder": "spawning_builder:build"})
    start = time.monotonic()
    result = run_batch([recipe], out_root=tmp_path / "runs", timeout=8)
    outcome = result.outcomes[0]
    assert (outcome.status, outcome.exit_code) == ("error", 1)
    assert "timed out after 8 s" in outcome.message and "child processes were killed" in outcome.message
    assert time.monotonic() - start < 60
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), f"the worker's child {child} outlived the timeout"


def test_batch_kills_children_a_finished_worker_left_behind(tiny_cnn_recipe, tmp_path: Path, monkeypatch):
    """A data builder that starts a daemon child and returns: the recipe completes, the child does not
    outlive the batch."""
    from pipeline.batch import run_batch

    base = tiny_cnn_recipe()
    pid_file = tmp_path / "child.pid"
    (base.parent / "leaky_data.py").write_text(
        "import subprocess\nimport numpy as np\n"
        "def make():\n"
        f"    child = subprocess.Popen(['sleep', '300'], stdout=subprocess.DEVNULL)\n"
        f"    open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "    return [{'x': np.zeros((1, 1, 8, 8), np.float32)} for _ in range(4)]\n"
    )
    monkeypatch.setenv("PYTHONPATH", f"{base.parent}{os.pathsep}{ROOT}")
    recipe = _variant(base, "leaky", calibration={"data": {"kind": "builder", "builder": "leaky_data:make"}, "samples": 4})
    result = run_batch([recipe], out_root=tmp_path / "runs", timeout=300)
    assert result.outcomes[0].status == "passed", result.outcomes[0].message
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


# --- a full disk, and a bug -----------------------------------------------------------------------------------


def _limited(size: int):
    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return apply


def test_disk_full_while_a_stage_writes_is_exit_2_without_traceback(tiny_cnn_recipe):
    """A file-size limit makes every write past 2 KB fail as on a full disk (EFBIG, like ENOSPC)."""
    recipe = tiny_cnn_recipe()
    before = snapshot(recipe.parent, ("out",))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--quiet"], cwd=recipe.parent,
                          capture_output=True, text=True, preexec_fn=_limited(2000),
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(ROOT)})
    assert_clean_failure(proc.returncode, proc.stdout, proc.stderr, 2,
                         ("writing into", "out", "File too large", "free disk space"))
    assert_nothing_half_written(recipe.parent, before)
    assert_untouched(before, recipe.parent, ("out",))
    rerun = _invoke(["run", str(recipe), "--quiet"], recipe.parent)  # space again: the run resumes
    assert rerun.exit_code == 0, rerun.output


def test_a_bug_in_a_stage_exits_1_with_its_traceback(tiny_cnn_recipe):
    """An exception that is not a PipelineError (here a range method registered by a plugin, with a bug)
    is a bug: exit 1, its traceback shown, the stage's scratch folder removed, nothing half-written."""
    recipe = tiny_cnn_recipe()
    (recipe.parent / "buggy_range.py").write_text(
        "from pipeline.quant.ranges import register_range_method\n\n"
        "@register_range_method('buggy')\n"
        "def buggy(stats, request):\n"
        "    return stats.no_such_statistic\n"
    )
    edit(**{"calibration.method": "buggy"})(recipe)
    code = ("import sys, buggy_range\nfrom pipeline.cli import app\n"
            f"sys.argv = ['npu-pipeline', 'run', {str(recipe)!r}, '--quiet']\napp()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=recipe.parent, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{recipe.parent}{os.pathsep}{ROOT}"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert "AttributeError" in proc.stderr and "no_such_statistic" in proc.stderr
    assert "stage failed" not in proc.stderr and "error: " not in proc.stderr
    run_dir = recipe.parent / "out"
    assert not (run_dir / "quantize").exists() and (run_dir / "calibrate" / "stage.json").is_file()
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".quantize.")]


def test_a_data_builder_that_raises_is_bad_data_in_a_batch(tiny_cnn_recipe, tmp_path, monkeypatch):
    from pipeline.batch import run_batch

    base = tiny_cnn_recipe()
    (base.parent / "bug_data.py").write_text("def make():\n    return [{'x': 1 / 0}]\n")
    # A data builder's own exception is the user's code failing: a DataError (exit 2), not a bug.
    monkeypatch.setenv("PYTHONPATH", f"{base.parent}{os.pathsep}{ROOT}")
    recipe = _variant(base, "zerodiv", calibration={"data": {"kind": "builder", "builder": "bug_data:make"}})
    outcome = run_batch([recipe], out_root=tmp_path / "runs").outcomes[0]
    assert (outcome.status, outcome.exit_code) == ("error", 2)
    assert "bug_data:make raised ZeroDivisionError" in outcome.message


# --- limits: documented, overridable, memory bounded -------------------------------------------------------------


def test_every_limit_is_in_the_readme_table():
    from pipeline.core.limits import LIMITS

    readme = (ROOT / "README.md").read_text()
    rows = {m.group(2): m.group(1) for m in re.finditer(r"^\| (.+?) \| .+? \| `(NPU_PIPELINE_MAX_\w+)` \|$", readme, re.M)}
    assert set(rows) == {item.env for item in LIMITS.values()}
    for item in LIMITS.values():
        assert rows[item.env] == item.doc, item.env


def test_limits_read_the_environment(monkeypatch):
    from pipeline.core.limits import LIMITS, limit

    for item in LIMITS.values():
        assert limit(item.name) == item.default
    monkeypatch.setenv("NPU_PIPELINE_MAX_TEXT_LINE_CHARS", "1_000")
    assert limit("text_line_chars") == 1000


def test_an_npz_that_inflates_costs_only_the_rows_read(tmp_path: Path):
    """64 MiB of zeros deflated to ~64 KB: reading 16 rows holds 16 rows, not 64 MiB."""
    from pipeline.data.limits import read_npz_rows

    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x=np.zeros((65536, 1, 16, 16), np.float32))
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        rows = read_npz_rows(path, "x", 16, "test")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows.shape == (16, 1, 16, 16)
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_text_reader_stops_at_the_lines_it_needs(tmp_path: Path):
    from pipeline.data.limits import read_text_lines

    path = tmp_path / "t.txt"
    path.write_text("one\n\n two \nthree\u2028four\n" + "x" * 300_000 + "\n")  # the long line is never reached
    assert read_text_lines(path, 4, "test") == ["one", "two", "three", "four"]


def test_yaml_merge_keys_and_aliases_within_the_limits_still_load(tmp_path: Path):
    from pipeline.core.yaml_io import load_yaml
    from pipeline.errors import RecipeError

    text = "base: &b {a: 1, b: 2}\nthing:\n  <<: *b\n  b: 3\nlist: [*b, *b]\n"
    data = load_yaml(text, source="t.yaml", error=RecipeError)
    assert data["thing"] == {"a": 1, "b": 3} and data["list"] == [{"a": 1, "b": 2}] * 2


def test_labels_as_a_column_are_accepted():
    from pipeline.data.labels import check_class_labels

    assert check_class_labels(np.array([[0], [2], [1]], np.int32), "t", classes=3).tolist() == [0, 2, 1]


# --- the catalogue ---------------------------------------------------------------------------------------------


def test_the_hostile_catalogue_has_at_least_170_cases():
    from . import test_bad_inputs, test_hostile_bundles, test_hostile_inputs

    count = (len(test_bad_inputs.CASES) + len(test_hostile_inputs.CASES) + len(test_hostile_bundles.CASES)
             + len(BATCH_CASES))
    assert count >= 170, count
