"""XINT8 throughout (every Q/DQ the quantizer writes has a power-of-two scale and zero point 0, constants
included), XINT8 recognised by `inspect` without being told, and `run` refusing its own artifact (exit 5)
or a broken model (exit 4) after writing it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.formats import Format
from pipeline.inspect import inspect_model
from pipeline.quant.qdq import quantize_qdq
from pipeline.quant.statistics import collect_histograms
from pipeline.targets import Target

RNG = np.random.default_rng(0)
# A target that runs every op in XINT8 (the shipped tables leave ConvTranspose float under XINT8).
EVERY_OP_XINT8 = Target(name="every-op-xint8", description="test target", chips=("test",), formats=(Format.XINT8,),
                        default_format=Format.XINT8, op_table={Format.XINT8: None})


def _constants_model() -> onnx.ModelProto:
    """Conv -> Mul(const) -> Div(const) -> Add(const) -> ConvTranspose(+bias) -> LayerNormalization."""
    inits = {
        "w": RNG.standard_normal((4, 3, 3, 3)) * 0.3, "b": RNG.standard_normal(4) * 0.1,
        "mc": RNG.standard_normal((1, 4, 1, 1)) * 0.7 + 1.0, "dc": np.abs(RNG.standard_normal((1, 4, 1, 1))) + 0.5,
        "ac": RNG.standard_normal((1, 4, 1, 1)) * 0.3,
        "tw": RNG.standard_normal((4, 2, 2, 2)) * 0.3, "tb": RNG.standard_normal(2) * 0.1,
        "g": RNG.standard_normal(8) * 0.2 + 1, "be": RNG.standard_normal(8) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "mc"], ["m"]),
        helper.make_node("Div", ["m", "dc"], ["d"]),
        helper.make_node("Add", ["d", "ac"], ["a"]),
        helper.make_node("ConvTranspose", ["a", "tw", "tb"], ["t"], strides=[2, 2]),
        helper.make_node("LayerNormalization", ["t", "g", "be"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _scales(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            found[node.name or node.output[0]] = (inits[node.input[1]], inits.get(node.input[2]) if len(node.input) > 2 else None)
    return found


def _xint8_constants_model() -> onnx.ModelProto:
    model = _constants_model()
    data = [{"x": RNG.standard_normal((1, 3, 4, 4)).astype(np.float32)} for _ in range(16)]
    hist = collect_histograms(model, data, progress=False)
    return quantize_qdq(model, hist, target=EVERY_OP_XINT8, fmt=Format.XINT8, method="minmax")[0]


def test_every_xint8_qdq_has_a_power_of_two_scale_and_zero_point_0_constants_included():
    qmodel = _xint8_constants_model()
    quantized_ops = {n.op_type for n in qmodel.graph.node}
    assert {"Mul", "Div", "Add", "ConvTranspose", "LayerNormalization"} <= quantized_ops
    scales = _scales(qmodel)
    dequantized = {n.input[0] for n in qmodel.graph.node if n.op_type == "DequantizeLinear"}
    # The constants were quantized (Mul/Div/Add operands, ConvTranspose weight and bias, LN gamma and beta).
    for name in ("mc", "dc", "ac", "tw", "tb", "g", "be"):
        assert any(d.startswith(name + "_") for d in dequantized), name
    for where, (scale, zero) in scales.items():
        mantissa, _ = np.frexp(scale.astype(np.float64))
        assert np.all(mantissa == 0.5), f"{where}: scale {scale} is not a power of two"
        assert zero is None or np.all(zero == 0), f"{where}: zero point {zero}"


def test_inspect_recognises_xint8_without_being_told():
    qmodel = _xint8_constants_model()
    found = inspect_model(qmodel, "xdna2")
    assert found.detected_format is Format.XINT8
    assert not [v for v in found.violations if v.rule == "pow2-scale"]
    # With some values at 16 bits (free_16bit, the fallback): still XINT8, the 16-bit ones a warning.
    model = _constants_model()
    data = [{"x": RNG.standard_normal((1, 3, 4, 4)).astype(np.float32)} for _ in range(16)]
    hist = collect_histograms(model, data, progress=False)
    mixed = quantize_qdq(model, hist, target=EVERY_OP_XINT8, fmt=Format.XINT8, method="minmax", promote={"m": 16})[0]
    assert any(numpy_helper.to_array(t).dtype == np.int16 for t in mixed.graph.initializer if t.name.endswith("zero_point"))
    found = inspect_model(mixed, "xdna2")
    assert found.detected_format is Format.XINT8
    assert [w for w in found.warnings if w.rule == "mixed-precision"]


def test_an_xint8_model_with_a_constant_off_the_grid_is_called_xint8_and_not_ready():
    """The fault the issue describes: pow2 activations, one constant with a float scale. Before, inspect
    called such a model 'a8w8, ready'."""
    qmodel = _xint8_constants_model()
    dq = next(n for n in qmodel.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("mc_"))
    for tensor in qmodel.graph.initializer:
        if tensor.name == dq.input[1]:
            tensor.CopyFrom(numpy_helper.from_array(np.array(0.0123, np.float32), tensor.name))
    found = inspect_model(qmodel, "xdna2")
    assert found.detected_format is Format.XINT8
    assert not found.ok and any(v.rule == "pow2-scale" for v in found.violations)


def _tiny_classifier(tmp: Path, *, batch: int = 1) -> Path:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3),
    ).eval()
    torch.onnx.export(model, (torch.randn(1, 1, 8, 8),), str(tmp / "tiny.onnx"), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False, dynamic_axes={"x": {0: "N"}})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 1, 8, 8)).astype(np.float32)
    np.savez(tmp / "calib.npz", x=x[:32])
    np.savez(tmp / "val.npz", x=x[32:], label=rng.integers(0, 3, 64))
    recipe = {
        "name": "tiny", "model": {"onnx": "tiny.onnx"}, "inputs": [{"name": "x", "shape": [batch, 1, 8, 8]}],
        "calibration": {"data": {"kind": "npz", "path": "calib.npz"}, "samples": 32 // batch},
        # Labels only at batch 1 (at batch 2 a label is needed per predicted position: not what this tests).
        "validation": {"data": {"kind": "npz", "path": "val.npz", **({"labels": "label"} if batch == 1 else {})},
                       "samples": 64 // batch},
        "quantization": {"target": "xdna2", "format": "a8w8"},
        "output": "out",
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_run_exits_5_when_its_own_artifact_breaks_a_hard_rule(tmp_path: Path):
    """A CNN exported with batch 2: everything runs, the bundle is written, then exit 5 (batch-one)."""
    recipe = _tiny_classifier(tmp_path, batch=2)
    result = CliRunner().invoke(app, ["run", str(recipe), "--quiet"])
    assert result.exit_code == 5, result.output
    assert "batch-one" in result.output
    artifact = tmp_path / "out" / "artifact"
    assert (artifact / "report.md").is_file() and (artifact / "model.onnx").is_file()
    assert json.loads((artifact / "placement.json").read_text())["summary"]["ready"] is False
    assert json.loads((artifact / "stage.json").read_text())["metrics"]["ready"] is False


def _digits_recipe(tmp: Path, *, calibration_scale: float) -> Path:
    """The shipped digits CNN recipe (A8W8, its own gates), with its calibration images scaled."""
    root = Path(__file__).resolve().parent.parent
    recipe = yaml.safe_load((root / "recipes" / "digits_cnn.yaml").read_text())
    recipe["model"]["args"]["weights"] = str(root / "models" / "digits_cnn.pt")
    with np.load(root / "calibration_data" / "digits" / "calibration.npz", allow_pickle=False) as data:
        np.savez(tmp / "calib.npz", **{k: (v * calibration_scale if v.dtype.kind == "f" else v) for k, v in data.items()})
    recipe["calibration"]["data"]["path"] = str(tmp / "calib.npz")
    recipe["validation"]["data"]["path"] = str(root / "calibration_data" / "digits" / "validation.npz")
    recipe["quantization"].pop("fallback")
    recipe["output"] = str(tmp / "out")
    path = tmp / "digits.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_model_broken_by_quantization_fails_its_gates(tmp_path: Path):
    """The digits CNN calibrated on wrongly preprocessed images (pixels 100x too small): the int8 ranges
    clip every real input, the classifier breaks, and its gates say so (exit 4, report written) instead of
    passing silently. The same recipe with the right images passes them."""
    result = CliRunner().invoke(app, ["run", str(_digits_recipe(tmp_path, calibration_scale=0.01)), "--quiet"])
    assert result.exit_code == 4, result.output
    manifest = json.loads((tmp_path / "out" / "artifact" / "manifest.json").read_text())
    assert manifest["gates_passed"] is False
    assert manifest["metrics"]["top1_agreement"] < 90.0
    good = tmp_path / "good"
    good.mkdir()
    result = CliRunner().invoke(app, ["run", str(_digits_recipe(good, calibration_scale=1.0)), "--quiet"])
    assert result.exit_code == 0, result.output
