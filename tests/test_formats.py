"""Every NPU format end to end, with its artifact checked against the format's rules.

Fast: the tiny CNN (conftest) in XINT8, A8W8, A16W8, BF16 on XDNA2 and XINT8 on XDNA1. Slow (CI): every
digits and MiniLM format recipe shipped in recipes/, the digits ones through the real CLI with their own
gates, the MiniLM ones through the library with fewer samples (their full runs take minutes).

Checks on an artifact, read from the ONNX file itself rather than from our own inspection: XINT8 has
power-of-two scales everywhere; every format has symmetric (zero) zero points, int32 biases and the
activation type of the format; BF16 ships the float model with its compile config; `verify` passes
and `inspect` finds no violation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from pipeline.api import run_recipe
from pipeline.bundle import verify_bundle
from pipeline.cli import app
from pipeline.inspect import inspect_model
from pipeline.recipe import load_recipe

from .conftest import RECIPES

FORMATS = [("xdna2", "xint8"), ("xdna2", "a8w8"), ("xdna2", "a16w8"), ("xdna2", "bf16"), ("xdna1", "xint8")]
ACTIVATION_TYPE = {"xint8": np.int8, "a8w8": np.int8, "a16w8": np.int16}
DIGITS = ["digits_cnn_xint8", "digits_cnn_a16w8", "digits_cnn_bf16", "digits_cnn_xdna1"]
MINILM = ["minilm_l6_a16w8", "minilm_l6_bf16"]


def _qdq_nodes(model: onnx.ModelProto):
    """(node, scale, zero point, role, constant input) per Q/DQ node; role: weight (a MAC op's input 1),
    bias (input 2), constant (any other constant, e.g. a folded position embedding) or activation."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, k))
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        role = "activation"
        if node.input[0] in consts:
            slots = {(n.op_type, k) for n, k in readers.get(node.output[0], [])}
            role = "constant"
            if any(op in ("Conv", "ConvTranspose", "Gemm") and k == 2 for op, k in slots):
                role = "bias"
            elif any(op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and k == 1 for op, k in slots):
                role = "weight"
        zero_point = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        yield node, consts[node.input[1]], zero_point, role, consts.get(node.input[0])


def check_artifact(artifact: Path, target: str, fmt: str) -> dict:
    """Assert the format's rules on a packaged artifact; returns its placement summary."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert (manifest["target"], manifest["format"]) == (target, fmt)
    verify_bundle(artifact)  # hashes and readiness rules; raises on any problem
    inspection = inspect_model(artifact / "model.onnx", target, fmt)
    assert inspection.violations == [], inspection.table()
    model = onnx.load(str(artifact / "model.onnx"))
    options = json.loads((artifact / "vitisai_ep.json").read_text())
    assert options["target"] == {"xdna1": "X1", "xdna2": "X2"}[target]
    assert ("xclbin" in options) == (target == "xdna1")
    if fmt == "bf16":
        assert not any(n.op_type.endswith("QuantizeLinear") for n in model.graph.node), "BF16 ships the float model"
        config = json.loads((artifact / "vitisai_config.json").read_text())
        assert config["passes"][1]["vaiml_config"]["enable_f32_to_bf16_conversion"] is True
        assert options["config_file"] == "vitisai_config.json"
        return inspection.summary()
    found = list(_qdq_nodes(model))
    assert found, "a quantized artifact has Q/DQ nodes"
    for node, scale, zero_point, role, _ in found:
        where = f"{node.op_type} {node.name} ({role})"
        assert scale.size == 1, f"{where}: per-tensor scales only"
        if role == "bias":
            assert zero_point is None or zero_point.dtype == np.int32, where
            assert node.op_type == "DequantizeLinear" and zero_point is not None, f"{where}: int32 bias DQ"
            continue
        act, int8 = np.dtype(ACTIVATION_TYPE[fmt]), np.dtype(np.int8)
        want = {"weight": {int8}, "activation": {act}}.get(role, {int8, act})
        assert zero_point is not None and zero_point.dtype in want, f"{where}: {zero_point.dtype if zero_point is not None else None}"
        assert np.all(zero_point == 0), f"{where}: symmetric zero point"
        if fmt == "xint8":
            mantissa, _ = np.frexp(scale.astype(np.float64))
            assert np.all(mantissa == 0.5), f"{where}: scale {scale} is not a power of two"
    assert any(role == "bias" for *_, role, _ in found), "Conv/Gemm biases are quantized (int32)"
    return inspection.summary()


@pytest.mark.parametrize("target, fmt", FORMATS, ids=[f"{t}-{f}" for t, f in FORMATS])
def test_tiny_cnn_in_every_format(tmp_path: Path, tiny_cnn_recipe, target: str, fmt: str):
    recipe = load_recipe(tiny_cnn_recipe(quantization={"target": target, "format": fmt}))
    result = run_recipe(recipe, progress=False, check_gates=False)
    metrics = result.metrics
    assert metrics["samples"] == 8 and metrics["cosine_mean"] > 0.99
    summary = check_artifact(result.artifact, target, fmt)
    assert summary["macs_total"] > 0


def test_bf16_validation_runs_the_rounding_copy(tmp_path: Path, tiny_cnn_recipe):
    """BF16 validates the bf16-rounding emulation, not the float model against itself."""
    recipe = load_recipe(tiny_cnn_recipe(quantization={"target": "xdna2", "format": "bf16"}))
    result = run_recipe(recipe, progress=False, check_gates=False)
    emulated = onnx.load(str(result.run_dir / "quantize" / "emulated.onnx"))
    assert any(n.op_type == "Cast" for n in emulated.graph.node)
    assert result.metrics["numerics"] == "bf16-emulated"
    assert 0 < result.metrics["max_abs_error"] < 0.05  # rounding happened, and stayed small


@pytest.mark.slow
@pytest.mark.parametrize("name", DIGITS)
def test_digits_format_recipe_end_to_end(tmp_path: Path, name: str):
    out = tmp_path / name
    result = CliRunner().invoke(app, ["run", str(RECIPES / f"{name}.yaml"), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "artifact" / "manifest.json").read_text())
    assert manifest["gates_passed"] is True
    metrics = manifest["metrics"]
    assert metrics["samples"] == 360
    assert metrics["top1_agreement"] >= 99.7 and metrics["accuracy_drop"] <= 0.5
    summary = check_artifact(out / "artifact", manifest["target"], manifest["format"])
    assert summary["npu_mac_share"] == 1.0  # every Conv/Gemm MAC of the digits CNN on the NPU
    verify = CliRunner().invoke(app, ["verify", str(out / "artifact")])
    assert verify.exit_code == 0 and verify.output.startswith("ok"), verify.output


@pytest.mark.slow
@pytest.mark.parametrize("name", MINILM)
def test_minilm_format_recipe(tmp_path: Path, name: str):
    """The shipped MiniLM format recipes with 24 calibration and 24 validation sentences (full runs: minutes)."""
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    recipe = recipe.model_copy(update={
        "calibration": recipe.calibration.model_copy(update={"samples": 24}),
        "validation": recipe.validation.model_copy(update={"samples": 24}),
    })
    result = run_recipe(recipe, out=tmp_path / name, progress=False, check_gates=False)
    metrics = result.metrics
    assert metrics["samples"] == 24
    fmt = recipe.quantization.format.value
    # Full-run figures (200 sentences) are in the recipes' comments; these bounds leave room for 24.
    floor = {"bf16": 0.999, "a16w8": 0.95}[fmt]
    assert metrics["cosine_mean"] >= floor, metrics
    summary = check_artifact(result.artifact, "xdna2", fmt)
    assert summary["npu_mac_share"] == 1.0
