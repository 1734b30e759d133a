"""The bundle commands on a real artifact: verify (hashes, readiness), infer (CPU, NPU numerics), inspect --json.

The artifact is the tiny CNN of conftest, packaged by the real pipeline; each test gets its own copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.api import run_recipe
from pipeline.bundle import infer_bundle
from pipeline.cli import app
from pipeline.core.onnx_io import make_session
from pipeline.recipe import load_recipe

runner = CliRunner()


@pytest.fixture()
def built(tmp_path: Path, tiny_cnn_recipe):
    """(run folder, recipe) of a finished A8W8 run; `fmt` overrides the format."""

    def build(fmt: str = "a8w8"):
        recipe = load_recipe(tiny_cnn_recipe(quantization={"target": "xdna2", "format": fmt}))
        result = run_recipe(recipe, progress=False, check_gates=False)
        return result.run_dir, recipe

    return build


def _cli(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_verify_passes_on_a_fresh_artifact(built):
    run_dir, _ = built()
    code, out, err = _cli("verify", run_dir / "artifact")
    assert code == 0, err
    assert out.startswith("ok ") and "files match manifest.json" in out and "no NPU rule broken" in out


@pytest.mark.parametrize("name", ["model.onnx", "vitisai_ep.json", "placement.json"])
def test_verify_fails_with_code_6_naming_the_changed_file(built, name: str):
    run_dir, _ = built()
    path = run_dir / "artifact" / name
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] = (data[middle] + 1) % 256  # one byte; the ONNX file stays loadable (a weight byte)
    path.write_bytes(bytes(data))
    code, out, err = _cli("verify", run_dir / "artifact")
    assert code == 6, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"{name} does not match its sha256 in manifest.json" in lines[0]
    assert "Traceback" not in err


def test_verify_names_a_missing_file(built):
    run_dir, _ = built()
    (run_dir / "artifact" / "model.float.onnx").unlink()
    code, _, err = _cli("verify", run_dir / "artifact")
    assert code == 6 and "model.float.onnx is missing" in err


def test_verify_refuses_a_folder_without_manifest(tmp_path: Path):
    code, _, err = _cli("verify", tmp_path)
    assert code == 6 and "no manifest.json" in err


def _sample(recipe, tmp_path: Path, index: int = 0) -> tuple[Path, np.ndarray]:
    x = np.load(recipe.resolve(recipe.validation.data.path))["x"][index : index + 1]
    path = tmp_path / f"input{index}.npz"
    np.savez(path, x=x)
    return path, x


def test_infer_runs_on_the_cpu_and_says_so(built, tmp_path: Path):
    run_dir, recipe = built()
    inputs, x = _sample(recipe, tmp_path)
    output = tmp_path / "out.npz"
    code, out, err = _cli("infer", run_dir / "artifact", "--input", inputs, "--output", output)
    assert code == 0, err
    assert "ran on: CPUExecutionProvider" in out  # no VitisAI EP on this machine
    assert "y: float32[1, 3]" in out
    want = make_session(run_dir / "artifact" / "model.onnx").run(None, {"x": x})[0]
    np.testing.assert_array_equal(np.load(output)["y"], want)


def test_infer_rejects_an_input_of_the_wrong_shape(built, tmp_path: Path):
    run_dir, _ = built()
    np.savez(tmp_path / "bad.npz", x=np.zeros((1, 1, 4, 4), np.float32))
    code, _, err = _cli("infer", run_dir / "artifact", "--input", tmp_path / "bad.npz")
    assert code == 2 and "'x' is float32[1, 1, 4, 4], the model takes float32[1, 1, 8, 8]" in err


@pytest.mark.parametrize("fmt", ["a8w8", "a16w8", "bf16"])
def test_npu_numerics_match_the_validate_stage(built, tmp_path: Path, fmt: str):
    """`infer --npu-numerics` computes what validate measured: same outputs, so the same max abs error."""
    run_dir, recipe = built(fmt)
    validated = run_dir / "quantize" / ("emulated.onnx" if fmt == "bf16" else "model.onnx")
    validate_session = make_session(validated, npu_emulation=True)
    float_session = make_session(run_dir / "artifact" / "model.float.onnx")
    metrics = json.loads((run_dir / "validate" / "metrics.json").read_text())
    worst = 0.0
    for index in range(metrics["samples"]):
        inputs, x = _sample(recipe, tmp_path, index)
        outputs, provider = infer_bundle(run_dir / "artifact", inputs, npu_numerics=True)
        assert "NPU numerics" in provider
        np.testing.assert_array_equal(outputs["y"], validate_session.run(None, {"x": x})[0])
        worst = max(worst, float(np.abs(outputs["y"].astype(np.float64) - float_session.run(None, {"x": x})[0]).max()))
    assert worst == pytest.approx(metrics["max_abs_error"], rel=1e-6)
    code, out, _ = _cli("infer", run_dir / "artifact", "--input", inputs, "--npu-numerics")
    assert code == 0 and "ran on: CPUExecutionProvider (NPU numerics" in out


def test_inspect_writes_json_that_matches_placement(built, tmp_path: Path):
    run_dir, _ = built()
    report = tmp_path / "inspect.json"
    code, out, err = _cli("inspect", run_dir / "artifact" / "model.onnx", "--target", "xdna2", "--json", report)
    assert code == 0, err
    assert f"written: {report}" in out and "verdict      ready" in out
    data = json.loads(report.read_text())
    assert data["schema"] == "npu-pipeline/inspect/1"
    assert (data["target"], data["format"], data["quantized"]) == ("xdna2", "a8w8", True)
    packaged = json.loads((run_dir / "artifact" / "placement.json").read_text())
    assert data["summary"] == packaged["summary"]
    assert data["placement"] == packaged["placement"]


def test_inspect_json_is_written_even_when_rules_are_broken(built, tmp_path: Path):
    """An A8W8 model inspected as XINT8 breaks the power-of-two rule: exit 5, JSON lists the violations."""
    run_dir, _ = built()
    report = tmp_path / "inspect.json"
    code, _, err = _cli("inspect", run_dir / "artifact" / "model.onnx", "-t", "xdna2", "-f", "xint8", "--json", report)
    assert code == 5 and "[pow2-scale]" in err
    data = json.loads(report.read_text())
    assert data["violations"] and {v["rule"] for v in data["violations"]} == {"pow2-scale"}


def test_a_copied_bundle_verifies_and_runs_elsewhere(built, tmp_path: Path):
    """The bundle is self-contained: moved to another folder it still verifies and runs."""
    run_dir, recipe = built()
    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(run_dir / "artifact", moved)
    shutil.rmtree(run_dir)
    assert _cli("verify", moved)[0] == 0
    inputs, _ = _sample(recipe, tmp_path)
    assert _cli("infer", moved, "--input", inputs)[0] == 0
