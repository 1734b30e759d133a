"""`npu-pipeline batch`: sharding, isolation of failing and crashing recipes, summary JSON, JUnit XML,
exit codes, and the warm cache. Real worker processes, on the tiny model of conftest.py."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.batch import SEVERITY, BatchError, BatchResult, RecipeOutcome, Shard, collect_recipes, one_line, run_batch
from pipeline.cli import app

from .conftest import RECIPES


def _variant(base: Path, name: str, **changes) -> Path:
    """A copy of the tiny recipe (same folder, so its relative paths still resolve) under another name."""
    data = yaml.safe_load(base.read_text())
    data.update(name=name, **changes)
    data.pop("output", None)
    path = base.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture()
def mixed_batch(tiny_cnn_recipe, monkeypatch):
    """Four recipes: one passes, one fails a gate, one has a missing data file, one kills its interpreter."""
    base = tiny_cnn_recipe()
    folder = base.parent / "recipes"
    folder.mkdir()
    (base.parent / "crashing_builder.py").write_text(
        "import os, signal\n\ndef build():\n    os.kill(os.getpid(), signal.SIGSEGV)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(base.parent))  # the crashing builder, importable by the workers
    paths = [
        _variant(base, "a_pass"),
        _variant(base, "b_gate", gates=[{"metric": "cosine_mean", "min": 1.01}]),
        _variant(base, "c_nodata", calibration={"data": {"kind": "npz", "path": "absent.npz"}, "samples": 4}),
        _variant(base, "d_crash", model={"builder": "crashing_builder:build"}),
    ]
    for path in paths:
        shutil.move(path, folder / path.name)
    # Relative paths now resolve against recipes/: point them back at the data next to the tiny model.
    for path in folder.iterdir():
        text = path.read_text().replace("path: ", "path: ../").replace("onnx: ", "onnx: ../")
        path.write_text(text)
    return folder


def test_mixed_batch_isolates_failures(mixed_batch: Path, tmp_path: Path):
    out = tmp_path / "runs"
    result = run_batch([mixed_batch], jobs=2, out_root=out)
    by_name = {o.name: o for o in result.outcomes}
    assert [o.name for o in result.outcomes] == ["a_pass", "b_gate", "c_nodata", "d_crash"]
    assert (by_name["a_pass"].status, by_name["a_pass"].exit_code) == ("passed", 0)
    assert (by_name["b_gate"].status, by_name["b_gate"].exit_code) == ("failed", 4)
    assert (by_name["c_nodata"].status, by_name["c_nodata"].exit_code) == ("error", 2)
    assert (by_name["d_crash"].status, by_name["d_crash"].exit_code) == ("error", 1)
    assert "SIGSEGV" in by_name["d_crash"].message
    assert "cosine_mean" in by_name["b_gate"].message and "needs >= 1.01" in by_name["b_gate"].message
    assert "calibration.data.path" in by_name["c_nodata"].message
    assert all("\n" not in o.message for o in result.outcomes)
    # The passing and the gate-failing recipes both left a complete artifact; the others none.
    assert (out / "a_pass" / "artifact" / "manifest.json").is_file()
    assert (out / "b_gate" / "artifact" / "report.md").is_file()
    assert by_name["c_nodata"].artifact is None and by_name["d_crash"].artifact is None
    assert by_name["a_pass"].target == "xdna2" and by_name["a_pass"].format == "a8w8"
    # No recipe gate: only the default dead-channel gate of its one output, which holds.
    assert [(g["metric"], g["default"], g["passed"]) for g in by_name["a_pass"].gates] == [("dead_channels", True, True)]
    assert by_name["b_gate"].gate_summary == "1/2 FAIL"
    assert result.exit_code == 1  # a crash outranks everything
    assert result.counts() == {"passed": 1, "failed": 1, "error": 2}


def test_cli_writes_summary_and_junit(mixed_batch: Path, tmp_path: Path):
    summary, junit = tmp_path / "reports" / "summary.json", tmp_path / "reports" / "junit.xml"
    result = CliRunner().invoke(app, [
        "batch", str(mixed_batch), "--jobs", "2", "--out-root", str(tmp_path / "runs"),
        "--summary", str(summary), "--junit", str(junit),
    ])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for column in ("recipe", "target", "format", "gates", "time", "status", "artifact"):
        assert column in result.output
    data = json.loads(summary.read_text())
    assert data["exit_code"] == 1 and data["counts"] == {"passed": 1, "failed": 1, "error": 2}
    assert [r["status"] for r in data["recipes"]] == ["passed", "failed", "error", "error"]
    assert data["recipes"][0]["stages"]["package"]["cached"] is False

    root = ET.parse(junit).getroot()
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("4", "1", "2")
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert set(cases) == {"a_pass", "b_gate", "c_nodata", "d_crash"}
    assert cases["a_pass"].find("failure") is None and cases["a_pass"].find("error") is None
    assert "cosine_mean" in cases["b_gate"].find("failure").get("message")
    assert cases["b_gate"].find("failure").get("type") == "GateError"
    assert "calibration.data.path" in cases["c_nodata"].find("error").get("message")
    assert "SIGSEGV" in cases["d_crash"].find("error").get("message")
    assert "export" in cases["a_pass"].find("system-out").text  # the worker's log is kept


def test_warm_cache_batch_skips_every_stage(tiny_cnn_recipe, tmp_path: Path):
    base = tiny_cnn_recipe()
    recipes = [_variant(base, f"tiny_{i}") for i in range(2)]  # two workers, one recipe each
    out = tmp_path / "runs"
    cold = run_batch(recipes, jobs=2, out_root=out)
    warm = run_batch(recipes, jobs=2, out_root=out)
    forced = run_batch(recipes, jobs=2, out_root=out, force=True)
    assert cold.exit_code == warm.exit_code == forced.exit_code == 0
    assert all(o.cache_summary == "0/6" for o in cold.outcomes)
    assert all(o.cache_summary == "6/6" for o in warm.outcomes)
    assert all(o.cache_summary == "0/6" for o in forced.outcomes)
    # Warm runs do no stage work; what is left is interpreter start and imports.
    assert warm.seconds < cold.seconds, (warm.seconds, cold.seconds)


def test_shards_cover_every_recipe_exactly_once():
    items = [f"r{i:02d}" for i in range(11)]
    for count in range(1, 6):
        slices = [Shard(index, count).select(items) for index in range(1, count + 1)]
        flat = [item for part in slices for item in part]
        assert sorted(flat) == items and len(flat) == len(items)
        assert max(map(len, slices)) - min(map(len, slices)) <= 1
        assert slices == [Shard(index, count).select(items) for index in range(1, count + 1)]  # deterministic


def test_shard_parse():
    assert Shard.parse("2/3") == Shard(2, 3) and str(Shard.parse("1/1")) == "1/1"
    for bad in ("0/3", "4/3", "1", "1/0", "-1/2", "a/b", ""):
        with pytest.raises(BatchError, match="--shard"):
            Shard.parse(bad)


def test_sharded_cli_batches_cover_the_folder(tmp_path: Path):
    """Through the CLI, on recipes that fail to load (no worker needed): each lands in exactly one shard."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    for i in range(5):
        (folder / f"bad_{i}.yaml").write_text(f"name: bad_{i}\n")
    seen = []
    for index in (1, 2, 3):
        summary = tmp_path / f"shard{index}.json"
        result = CliRunner().invoke(app, ["batch", str(folder), "--shard", f"{index}/3", "--summary", str(summary)])
        assert result.exit_code == 2, result.output
        data = json.loads(summary.read_text())
        assert data["shard"] == f"{index}/3" and data["recipes_total"] == 5
        seen += [Path(r["recipe"]).name for r in data["recipes"]]
    assert sorted(seen) == [f"bad_{i}.yaml" for i in range(5)]


def test_collect_recipes_sorts_and_deduplicates(tmp_path: Path):
    for name in ("b.yaml", "a.yml", "c.txt"):
        (tmp_path / name).write_text("name: x\n")
    found = collect_recipes([tmp_path, tmp_path / "b.yaml"])
    assert [p.name for p in found] == ["a.yml", "b.yaml"]


def test_exit_code_is_the_most_severe_class():
    def result(*codes: int) -> BatchResult:
        outcomes = [RecipeOutcome(f"r{i}", f"r{i}", "x", code) for i, code in enumerate(codes)]
        return BatchResult(outcomes, 1, None, len(codes), 0.0)

    assert result().exit_code == 0 and result(0, 0).exit_code == 0
    assert result(4, 5).exit_code == 5 and result(4, 3).exit_code == 3 and result(3, 2).exit_code == 2
    assert result(2, 1, 4).exit_code == 1
    assert SEVERITY == (1, 2, 3, 5, 4)


def test_one_line():
    assert one_line("a.yaml: 2 errors in recipe:\n  x: bad\n  y: worse") == "a.yaml: 2 errors in recipe: x: bad; y: worse"
    assert one_line("plain") == "plain" and one_line("") == ""


def test_shipped_recipes_plan_without_clashes():
    """Every shipped recipe loads, and no two share a name or a run folder (what `make batch` runs)."""
    from pipeline.batch import _plan

    planned = _plan(collect_recipes([RECIPES]), None)
    assert planned and all(item.error is None for item in planned)


def test_timeout_kills_only_the_slow_recipe(tiny_cnn_recipe, tmp_path: Path, monkeypatch):
    base = tiny_cnn_recipe()
    (base.parent / "sleepy_builder.py").write_text("import time\n\ndef build():\n    time.sleep(600)\n")
    monkeypatch.setenv("PYTHONPATH", str(base.parent))
    fast = _variant(base, "fast")
    recipes = [fast, _variant(base, "sleepy", model={"builder": "sleepy_builder:build"})]
    # The fast recipe converted once beforehand, so in the batch it only finds its stages cached (a second
    # or two, where converting takes ~5 s and several times that on a loaded CI machine): the timeout can
    # be short without racing it, and the test does not wait 25 s for the sleeper.
    assert run_batch([fast], jobs=1, out_root=tmp_path / "runs").exit_code == 0
    result = run_batch(recipes, jobs=2, out_root=tmp_path / "runs", timeout=10)
    by_name = {o.name: o for o in result.outcomes}
    assert by_name["fast"].status == "passed", by_name["fast"].message
    assert by_name["fast"].cache_summary == "6/6"
    assert (by_name["sleepy"].status, by_name["sleepy"].exit_code) == ("error", 1)
    assert "timed out after 10 s" in by_name["sleepy"].message
    assert by_name["sleepy"].seconds < 120
    assert result.exit_code == 1
