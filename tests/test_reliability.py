"""Reliability: the stage cache, runs killed with SIGKILL and resumed, concurrent runs, determinism, and a
scan of the library for unpickling paths.

What "identical" means here: every file of the artifact but report.md (which holds wall-clock stage times
by design and is not hashed) is byte-identical, stage.json included; the hashes manifest.json states hold.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app

from .conftest import RECIPES, ROOT


def _run_cli(recipe: Path, out: Path, *extra: str) -> str:
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out), "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return result.output


def _subprocess_run(recipe: Path, out: Path, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--out", str(out), "--quiet",
                           *extra], capture_output=True, text=True, cwd=cwd)


def hashed_files(run_dir: Path) -> dict[str, bytes]:
    """manifest.json and every file it hashes, as bytes (after checking the hashes it states)."""
    from pipeline.core.fileio import sha256_file

    artifact = run_dir / "artifact"
    manifest = json.loads((artifact / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert sha256_file(artifact / name) == digest, f"{name}: hash differs from manifest.json"
    return {name: (artifact / name).read_bytes() for name in [*manifest["files"], "manifest.json"]}


def assert_identical(a: Path, b: Path) -> None:
    left, right = hashed_files(a), hashed_files(b)
    assert sorted(left) == sorted(right)
    differing = [name for name in left if left[name] != right[name]]
    assert not differing, f"differ between {a} and {b}: {differing}"
    every = sorted(p.name for p in (a / "artifact").iterdir() if p.name != "report.md")
    assert every == sorted(p.name for p in (b / "artifact").iterdir() if p.name != "report.md")
    differing = [n for n in every if (a / "artifact" / n).read_bytes() != (b / "artifact" / n).read_bytes()]
    assert not differing, f"artifact files differ between {a} and {b}: {differing}"


def assert_no_leftovers(run_dir: Path) -> None:
    hidden = sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".") and p.name not in (".lock", ".npu-pipeline-run"))
    assert not hidden, f"scratch or trash left in {run_dir}: {hidden}"
    for stage in (p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        assert (stage / "stage.json").is_file(), f"incomplete stage folder {stage}"


def _cached_stages(output: str) -> list[str]:
    return re.findall(r"^\s+(\w+)\s+cached \(unchanged\)", output, flags=re.M)


# --- stage cache -------------------------------------------------------------------------------------------


def test_cache_skips_unchanged_stages_and_force_reruns(tiny_cnn_recipe, tmp_path: Path):
    recipe, out = tiny_cnn_recipe(), tmp_path / "run"
    assert _cached_stages(_run_cli(recipe, out)) == []
    first = hashed_files(out)
    assert _cached_stages(_run_cli(recipe, out)) == ["export", "prepare", "calibrate", "quantize", "validate", "package"]
    assert _cached_stages(_run_cli(recipe, out, "--force")) == []
    assert hashed_files(out) == first


def test_cache_reruns_exactly_the_stages_an_edit_touches(tiny_cnn_recipe, tmp_path: Path):
    recipe, out = tiny_cnn_recipe(), tmp_path / "run"
    _run_cli(recipe, out)
    data = yaml.safe_load(recipe.read_text())
    data["gates"] = [{"metric": "cosine_mean", "min": 0.5}]
    recipe.write_text(yaml.safe_dump(data))
    assert _cached_stages(_run_cli(recipe, out)) == ["export", "prepare", "calibrate", "quantize", "validate"]
    # New calibration data (same file name): calibrate and everything downstream of it reruns.
    x = np.load(recipe.parent / "calib.npz")["x"]
    np.savez(recipe.parent / "calib.npz", x=x[::-1].copy())
    assert _cached_stages(_run_cli(recipe, out)) == ["export", "prepare"]
    # A new model file: everything reruns.
    model = recipe.parent / "tiny.onnx"
    import onnx

    proto = onnx.load(str(model))
    proto.doc_string = "edited"
    onnx.save(proto, str(model))
    assert _cached_stages(_run_cli(recipe, out)) == []


# --- killed runs -------------------------------------------------------------------------------------------

# Runs the CLI after patching one point of the pipeline to SIGKILL the process there.
KILLER = r'''
import os, signal, sys
point, args = sys.argv[1], sys.argv[2:]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
class Dying:
    """A data source that kills the process when the stage asks for its `at`-th sample."""
    def __init__(self, source, at):
        self.source, self.at = source, at
    def __len__(self):
        return len(self.source)
    def __getattr__(self, name):
        return getattr(self.source, name)
    def __iter__(self):
        for index, batch in enumerate(self.source):
            if index == self.at:
                die()
            yield batch
def die_in_data(module, at):
    opened = module.open_dataset
    module.open_dataset = lambda *a, **k: Dying(opened(*a, **k), at)
import pipeline.runner as runner
if point == "during-calibrate":
    from pipeline.stages import calibrate
    die_in_data(calibrate, 9)
elif point == "during-validate":
    from pipeline.stages import validate
    die_in_data(validate, 3)
elif point.startswith("after-rename:"):
    stage, swap = point.split(":")[1], runner._swap_into_place
    def patched(scratch, final):
        swap(scratch, final)
        if final.name == stage:
            die()
    runner._swap_into_place = patched
elif point.startswith("mid-swap:"):  # the old folder moved aside, the new one not yet in place
    stage, swap = point.split(":")[1], runner._swap_into_place
    def patched(scratch, final):
        if final.name == stage and final.exists():
            os.replace(final, final.with_name(f".{final.name}.old.{os.getpid()}"))
            die()
        swap(scratch, final)
    runner._swap_into_place = patched
elif point == "writing-manifest":  # temp file written, not yet renamed
    from pipeline.stages import package
    write = package.atomic_write
    def patched(path, data):
        if path.name == "manifest.json":
            tmp = path.with_name(".manifest.json.partial.tmp")
            tmp.write_text(str(data)[:100])
            die()
        write(path, data)
    package.atomic_write = patched
else:
    raise SystemExit(f"unknown kill point {point}")
from pipeline.cli import app
sys.argv = ["npu-pipeline", *args]
app()
'''


def _killed_run(point: str, recipe: Path, out: Path, *extra: str) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLER, point, "run", str(recipe), "--out", str(out), "--quiet",
                           *extra], capture_output=True, text=True)
    assert proc.returncode == -9, f"not killed at {point}: rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


# (kill point, stages that must be reused when the killed run is resumed)
KILL_POINTS = [
    ("during-calibrate", ["export", "prepare"]),
    ("during-validate", ["export", "prepare", "calibrate", "quantize"]),
    ("after-rename:quantize", ["export", "prepare", "calibrate", "quantize"]),
    ("after-rename:artifact", ["export", "prepare", "calibrate", "quantize", "validate", "package"]),
    ("writing-manifest", ["export", "prepare", "calibrate", "quantize", "validate"]),
]


@pytest.mark.parametrize("point,reused", KILL_POINTS, ids=[p for p, _ in KILL_POINTS])
def test_killed_run_resumes_to_identical_artifact(point, reused, tiny_cnn_recipe, tmp_path: Path):
    recipe = tiny_cnn_recipe()
    reference, run = tmp_path / "reference", tmp_path / "killed"
    _run_cli(recipe, reference)
    _killed_run(point, recipe, run)
    output = _run_cli(recipe, run)
    assert _cached_stages(output) == reused
    assert_identical(reference, run)
    assert_no_leftovers(run)


def test_killed_forced_rerun_mid_swap_recovers(tiny_cnn_recipe, tmp_path: Path):
    """Killed between moving a finished stage aside and renaming its replacement in: the stage is absent,
    its old copy sits in the trash; the next run redoes it and clears the trash."""
    recipe = tiny_cnn_recipe()
    reference, run = tmp_path / "reference", tmp_path / "run"
    _run_cli(recipe, reference)
    _run_cli(recipe, run)
    _killed_run("mid-swap:calibrate", recipe, run, "--force")
    assert not (run / "calibrate").exists() and any(p.name.startswith(".calibrate.") for p in run.iterdir())
    output = _run_cli(recipe, run)
    assert "calibrate" not in _cached_stages(output)
    assert_identical(reference, run)
    assert_no_leftovers(run)


def test_killed_forced_rerun_leaves_the_old_stage_usable(tiny_cnn_recipe, tmp_path: Path):
    """Killed while a --force rerun recomputes calibrate: the finished calibrate folder stays in place, the
    next run reuses it and removes the dead run's scratch folder."""
    recipe = tiny_cnn_recipe()
    reference, run = tmp_path / "reference", tmp_path / "run"
    _run_cli(recipe, reference)
    _run_cli(recipe, run)
    _killed_run("during-calibrate", recipe, run, "--force")
    assert any(p.name.startswith(".calibrate.") for p in run.iterdir())
    assert len(_cached_stages(_run_cli(recipe, run))) == 6
    assert_identical(reference, run)
    assert_no_leftovers(run)


def test_only_the_runners_own_leftovers_are_removed(tiny_cnn_recipe, tmp_path: Path):
    """A run folder may also hold the user's hidden files: only `.<stage>.<suffix>` folders go."""
    recipe, run = tiny_cnn_recipe(), tmp_path / "run"
    _run_cli(recipe, run)
    ours = [run / ".calibrate.ab_12cd3", run / ".quantize.old.4242"]
    theirs = [run / ".git", run / ".calibrate.notes", run / ".cache.abcdefgh"]
    for folder in ours + theirs:
        folder.mkdir(parents=True)
    _run_cli(recipe, run, "--force")
    assert not any(folder.exists() for folder in ours)
    assert all(folder.is_dir() for folder in theirs)


@pytest.mark.slow
def test_digits_killed_and_resumed_matches_clean_run(tmp_path: Path):
    """The reference CNN through the real torch exporter: kills, resume, then byte-identical to a clean run."""
    recipe, reference, run = RECIPES / "digits_cnn.yaml", tmp_path / "reference", tmp_path / "killed"
    assert _subprocess_run(recipe, reference).returncode == 0
    _killed_run("during-calibrate", recipe, run)
    _killed_run("after-rename:validate", recipe, run)
    output = _run_cli(recipe, run)
    assert _cached_stages(output) == ["export", "prepare", "calibrate", "quantize", "validate"]
    assert_identical(reference, run)
    assert_no_leftovers(run)


# --- concurrency -------------------------------------------------------------------------------------------


def test_concurrent_processes_on_one_run_folder(tiny_cnn_recipe, tmp_path: Path):
    """Three real processes convert the same recipe into the same folder at once (two with --force): the
    lock serialises them; all succeed and the artifact is complete and identical to a clean run's."""
    recipe = tiny_cnn_recipe()
    reference, shared = tmp_path / "reference", tmp_path / "shared"
    _run_cli(recipe, reference)
    command = [sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--out", str(shared), "--quiet"]
    procs = [subprocess.Popen(command + extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra in ([], ["--force"], ["--force"])]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stdout + stderr
        assert "Traceback" not in stderr
    assert_identical(reference, shared)
    assert_no_leftovers(shared)


# --- determinism -------------------------------------------------------------------------------------------


def test_two_clean_runs_are_byte_identical(tiny_cnn_recipe, tmp_path: Path):
    """Different run folders, different working directories, separate processes."""
    recipe = tiny_cnn_recipe()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first, second = tmp_path / "one", tmp_path / "deeper" / "two"
    assert _subprocess_run(recipe, first, cwd=tmp_path).returncode == 0
    assert _subprocess_run(recipe, second, cwd=elsewhere).returncode == 0
    assert_identical(first, second)
    manifest = (first / "artifact" / "manifest.json").read_text()
    assert str(tmp_path) not in manifest and str(ROOT) not in manifest, "manifest.json embeds a local path"


@pytest.mark.slow
def test_digits_clean_runs_are_byte_identical(tmp_path: Path):
    recipe = RECIPES / "digits_cnn.yaml"
    first, second = tmp_path / "one", tmp_path / "two"
    assert _subprocess_run(recipe, first).returncode == 0
    assert _subprocess_run(recipe, second, cwd=tmp_path).returncode == 0
    assert_identical(first, second)
    manifest = (first / "artifact" / "manifest.json").read_text()
    assert str(tmp_path) not in manifest and str(ROOT) not in manifest


# --- security: no unpickling path in the library ------------------------------------------------------------

UNSAFE = [
    (re.compile(r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"\bnp\.load\((?![^)]*allow_pickle\s*=\s*False)"), "np.load without allow_pickle=False"),
    (re.compile(r"\bnumpy\.load\((?![^)]*allow_pickle\s*=\s*False)"), "numpy.load without allow_pickle=False"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
    (re.compile(r"weights_only\s*=\s*False"), "weights_only=False"),
    (re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b", re.M), "pickle-family import"),
    (re.compile(r"\b(c?pickle|dill|cloudpickle|joblib|marshal)\.loads?\("), "pickle-family load"),
    (re.compile(r"\byaml\.(load|load_all|unsafe_load|full_load)\("), "yaml loader other than safe_load"),
    (re.compile(r"\b(Unsafe|Full)?Loader\s*=\s*yaml\.(Unsafe|Full)?Loader\b"), "unsafe yaml Loader"),
    (re.compile(r"\bread_pickle\("), "pandas.read_pickle"),
]


def _calls(text: str, pattern: re.Pattern) -> list[str]:
    # Join each call's arguments onto one line so a keyword on a continuation line is seen.
    flat = re.sub(r"\(\s*\n\s*", "(", re.sub(r",\s*\n\s*", ", ", text))
    return [m.group(0) for m in pattern.finditer(flat)]


def test_no_unpickling_paths_in_the_library():
    problems = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for pattern, what in UNSAFE:
            problems += [f"{path.relative_to(ROOT)}: {what}: {hit!r}" for hit in _calls(text, pattern)]
    assert not problems, "\n".join(problems)


def test_the_scan_catches_what_it_looks_for():
    samples = {
        "torch.load(path)": True,
        "torch.load(path, weights_only=True)": False,
        "torch.load(\n    path,\n    weights_only=True,\n)": False,
        "np.load(path)": True,
        "np.load(path, allow_pickle=False, mmap_mode='r')": False,
        "import pickle": True,
        "yaml.load(text)": True,
        "yaml.safe_load(text)": False,
    }
    for source, unsafe in samples.items():
        found = any(_calls(source, pattern) for pattern, _ in UNSAFE)
        assert found is unsafe, source
