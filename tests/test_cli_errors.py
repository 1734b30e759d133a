"""Bad input through the real CLI: one clear line (what, where, how to fix), its exit code, no traceback,
and nothing half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def _edit(path: Path, **changes) -> Path:
    data = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key] if not key.isdigit() else node[int(key)]
        node[int(leaf) if leaf.isdigit() else leaf] = value
    path.write_text(yaml.safe_dump(data))
    return path


def _assert_clean_failure(code: int, output: str, expected_code: int, *fragments: str) -> None:
    assert code == expected_code, output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in output, output


def test_unknown_recipe_key(tiny_cnn_recipe):
    path = tiny_cnn_recipe(calibraton={"samples": 3})
    code, out = invoke("check", str(path))
    _assert_clean_failure(code, out, 2, "calibraton: unknown key", str(path))


def test_missing_data_file(tiny_cnn_recipe):
    path = _edit(tiny_cnn_recipe(), calibration__data__path="missing.npz")
    code, out = invoke("run", str(path), "--quiet")
    _assert_clean_failure(code, out, 2, "calibration.data.path", "missing.npz", "does not exist")
    assert not (path.parent / "out" / "artifact").exists()


def test_wrong_input_name(tiny_cnn_recipe):
    path = _edit(tiny_cnn_recipe(), inputs__0__name="image")
    code, out = invoke("run", str(path), "--quiet")
    _assert_clean_failure(code, out, 2, "inputs", "'image'", "['x']")


def test_wrong_shape(tiny_cnn_recipe):
    path = _edit(tiny_cnn_recipe(), inputs__0__shape=[1, 1, 16, 16])
    code, out = invoke("run", str(path), "--quiet")
    _assert_clean_failure(code, out, 2, "inputs.x.shape", "16")


def test_non_finite_calibration_data(tiny_cnn_recipe):
    path = tiny_cnn_recipe()
    x = np.load(path.parent / "calib.npz")["x"].copy()
    x[3, 0, 2, 2] = np.nan
    np.savez(path.parent / "calib.npz", x=x)
    code, out = invoke("run", str(path), "--quiet")
    _assert_clean_failure(code, out, 2, "calib.npz, sample 3", "'x'", "NaN/inf")
    assert not (path.parent / "out" / "calibrate").exists(), "a failed stage leaves no stage folder"


def test_corrupt_onnx_file(tiny_cnn_recipe):
    path = tiny_cnn_recipe()
    model = path.parent / "tiny.onnx"
    model.write_bytes(model.read_bytes()[:200])
    code, out = invoke("run", str(path), "--quiet")
    _assert_clean_failure(code, out, 2, "model.onnx", "tiny.onnx", "not a readable ONNX file")


def test_unknown_target(tiny_cnn_recipe):
    path = _edit(tiny_cnn_recipe(), quantization__target="xdna9")
    code, out = invoke("check", str(path))
    _assert_clean_failure(code, out, 2, "xdna9", "xdna1", "xdna2")


def test_failed_gate_writes_report_then_exits_4(tiny_cnn_recipe):
    path = tiny_cnn_recipe(gates=[{"metric": "cosine_mean", "min": 1.01}])
    code, out = invoke("run", str(path), "--quiet")
    _assert_clean_failure(code, out, 4, "cosine_mean", "needs >= 1.01")
    assert (path.parent / "out" / "artifact" / "report.md").is_file()
    assert "**FAIL**" in (path.parent / "out" / "artifact" / "report.md").read_text()


def test_subprocess_prints_one_line_without_traceback(tmp_path: Path):
    """The installed console path, end to end: stderr is exactly one error line."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "check", str(tmp_path / "absent.yaml")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "recipe file not found" in result.stderr
