"""Fewer quantization points, the same float model: `pipeline.core.fusions` on the block PaddlePaddle exports
for PP-LCNetV3 (PP-OCRv4's recognizer and detector backbones): Conv -> Mul(scale) -> Add(bias) ->
x * Clip(x + 3, 0, 6) / 6 -> Mul(scale) -> Add(bias) -> next Conv, eight ops where the NPU needs two."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.fusions import fold_conv_affine, fuse_hard_activations
from pipeline.core.onnx_io import make_session

RNG = np.random.default_rng(0)


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, out: str, cin: int, cout: int, k: int, *, group: int = 1, pads: int = 0) -> str:
        w = self.const(f"{out}_w", RNG.standard_normal((cout, cin // group, k, k)) * 0.4)
        b = self.const(f"{out}_b", RNG.standard_normal(cout) * 0.1)
        return self.node("Conv", [x, w, b], out, group=group, pads=[pads] * 4, kernel_shape=[k, k])

    def hardswish(self, x: str, tag: str, *, div_first: bool = False) -> str:
        three, six = self.const(f"{tag}_3", [3.0]), self.const(f"{tag}_6", [6.0])
        lo, hi = self.const(f"{tag}_lo", 0.0), self.const(f"{tag}_hi", 6.0)
        shifted = self.node("Add", [x, three], f"{tag}_add3")
        gate = self.node("Clip", [shifted, lo, hi], f"{tag}_clip")
        if div_first:  # relu6(x + 3) / 6 (a hardsigmoid), then * x
            return self.node("Mul", [x, self.node("Div", [gate, six], f"{tag}_div")], f"{tag}_out")
        return self.node("Div", [self.node("Mul", [x, gate], f"{tag}_mul"), six], f"{tag}_out")

    def affine(self, x: str, tag: str, scale, bias, *, scale_first: bool = True) -> str:
        scaled = self.node("Mul", [self.const(f"{tag}_s", scale), x] if scale_first else [x, self.const(f"{tag}_s", scale)],
                           f"{tag}_mul")
        return self.node("Add", [scaled, self.const(f"{tag}_b", bias)], f"{tag}_addb")

    def model(self, outputs: list[str], shape=(1, 4, 8, 8)) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "lcnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        inferred_graph = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
        inferred = {v.name: v for v in [*inferred_graph.value_info, *inferred_graph.output]}
        for output in model.graph.output:  # declared with their shapes, as an exporter writes them
            output.CopyFrom(inferred.get(output.name, output))
        return model


def lcnet_block() -> onnx.ModelProto:
    """Two PP-LCNetV3 blocks: a pointwise conv (unpadded, so the shift before it folds too) and a padded
    depthwise conv (the shift before it cannot fold: padding adds zeros, not shifted values)."""
    b = _Builder()
    y = b.conv("x", "conv0", 4, 8, 3, pads=1)
    y = b.affine(y, "lab0", [1.38], [0.59])
    y = b.hardswish(y, "hs0")
    y = b.affine(y, "lab1", [0.17], [0.03])
    y = b.conv(y, "pw", 8, 8, 1)
    y = b.affine(y, "lab2", RNG.uniform(0.5, 2, (1, 8, 1, 1)), RNG.standard_normal((8, 1, 1)) * 0.1, scale_first=False)
    y = b.hardswish(y, "hs1", div_first=True)
    y = b.affine(y, "lab3", [0.2], [-0.2])
    y = b.conv(y, "dw", 8, 8, 3, group=8, pads=1)
    return b.model([y])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return make_session(model.SerializeToString(), optimize=False).run(None, {"x": x})[0]


def test_folds_and_fuses_the_lcnet_block_without_changing_the_float_model():
    model = lcnet_block()
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    want = _run(model, x)
    assert fuse_hard_activations(model) == {"hardswish": 2, "hardsigmoid": 0}
    assert fold_conv_affine(model) == {"after_conv": 4, "before_conv": 3, "scale_moved_past_shift": 1}
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    ops = Counter(n.op_type for n in model.graph.node)
    # Left: one Add before the padded depthwise conv (folded, the shift would be wrong at the border); its
    # scale moved in front of it, (x + d / c) * c, and went into the conv.
    assert ops == Counter({"Conv": 3, "HardSwish": 2, "Add": 1}), ops
    np.testing.assert_allclose(_run(model, x), want, rtol=1e-5, atol=1e-5)
    assert [o.name for o in model.graph.output] == ["dw"]


def test_hardsigmoid_alone_and_the_mul_by_a_sixth_spelling():
    b = _Builder()
    gate = b.node("Clip", [b.node("Add", [b.const("three", [3.0]), "x"], "add3"), b.const("lo", 0.0),
                           b.const("hi", 6.0)], "clip")
    sig = b.node("Mul", [gate, b.const("sixth", [1 / 6])], "hsig")
    model = b.model([sig, b.node("Relu", ["x"], "side")])
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32) * 4
    want = _run(model, x)
    assert fuse_hard_activations(model) == {"hardswish": 0, "hardsigmoid": 1}
    node = next(n for n in model.graph.node if n.op_type == "HardSigmoid")
    assert node.output[0] == "hsig"
    np.testing.assert_allclose(_run(model, x), want, rtol=1e-6, atol=1e-6)
    assert fuse_hard_activations(lcnet_block(), ops=("HardSigmoid",)) == {"hardswish": 0, "hardsigmoid": 0}


def test_what_must_not_fold_stays():
    b = _Builder()
    y = b.conv("x", "conv0", 4, 4, 1)
    along_width = b.node("Mul", [y, b.const("w_scale", RNG.uniform(0.5, 2, (1, 1, 1, 8)))], "by_width")
    z = b.conv("x", "conv1", 4, 4, 1)  # its output is also a graph output: the Add after it stays
    shifted = b.node("Add", [z, b.const("shift", [0.5])], "shifted")
    scaled = b.node("Mul", ["x", b.const("in_scale", [2.0])], "scaled")  # read by a conv and by a Relu
    b.conv(scaled, "conv2", 4, 4, 1)
    b.node("Relu", [scaled], "relu")
    kept = b.conv("x", "conv3", 4, 4, 1)
    kept_mul = b.node("Mul", [kept, b.const("kept_scale", [3.0])], "kept_mul")
    model = b.model([along_width, z, shifted, "conv2", "relu", kept_mul])
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    want = [make_session(model.SerializeToString(), optimize=False).run(None, {"x": x})]
    assert fold_conv_affine(model, keep=["kept_mul"]) == {"after_conv": 0, "before_conv": 0, "scale_moved_past_shift": 0}
    got = make_session(model.SerializeToString(), optimize=False).run(None, {"x": x})
    for a, b_ in zip(want[0], got):
        np.testing.assert_array_equal(a, b_)


def test_shared_weights_are_copied_not_edited():
    b = _Builder()
    w, bias = b.const("w", RNG.standard_normal((4, 4, 1, 1))), b.const("b", np.zeros(4))
    one = b.node("Conv", ["x", w, bias], "one")
    two = b.node("Conv", ["x", w, bias], "two")
    doubled = b.node("Mul", [one, b.const("two_", [2.0])], "doubled")
    model = b.model([doubled, two])
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    want = make_session(model.SerializeToString(), optimize=False).run(None, {"x": x})
    assert fold_conv_affine(model) == {"after_conv": 1, "before_conv": 0, "scale_moved_past_shift": 0}
    got = make_session(model.SerializeToString(), optimize=False).run(None, {"x": x})
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_array_equal(got[1], want[1])


def _recipe(tmp_path: Path, fmt: str) -> Path:
    model = lcnet_block()
    onnx.save(model, str(tmp_path / "lcnet.onnx"))
    x = RNG.standard_normal((24, 4, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:16])
    np.savez(tmp_path / "val.npz", x=x[16:])
    recipe = {
        "name": f"lcnet_{fmt}", "model": {"onnx": "lcnet.onnx"}, "inputs": [{"name": "x", "shape": [1, 4, 8, 8]}],
        "calibration": {"data": {"kind": "npz", "path": "calib.npz"}, "samples": 16},
        "validation": {"data": {"kind": "npz", "path": "val.npz"}, "samples": 8, "task": "regression"},
        "quantization": {"target": "xdna2", "format": fmt, "preset": "none"},
        "output": f"out_{fmt}",
    }
    path = tmp_path / f"{fmt}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_prepare_fuses_only_what_the_format_runs_and_folds_everywhere(tmp_path: Path):
    """A8W8 on XDNA2 runs HardSwish: one op, one rounding. A16W8 does not: the four ops stay, on the NPU."""
    for fmt, hardswish in (("a8w8", 2), ("a16w8", 0)):
        recipe = str(_recipe(tmp_path, fmt))
        for stage in ("export", "prepare"):
            result = CliRunner().invoke(app, [stage, recipe])
            assert result.exit_code == 0, result.output
        metrics = json.loads((tmp_path / f"out_{fmt}" / "prepare" / "stage.json").read_text())["metrics"]
        assert metrics["hard_activations_fused"]["hardswish"] == hardswish
        assert metrics["affine_folded_into_conv"]["after_conv"] >= 2
        ops = Counter(n.op_type for n in onnx.load(str(tmp_path / f"out_{fmt}" / "prepare" / "model.onnx")).graph.node)
        assert ops["HardSwish"] == hardswish and (ops["Clip"] == 0 if hardswish else ops["Clip"] == 2), ops


def test_per_channel_scale_and_shift_fold_into_grouped_and_depthwise_convs():
    """The input-channel bookkeeping of grouped convolutions: channel i of the input feeds the outputs of
    group i // (C_in / group) only."""
    for group, cout in ((1, 6), (2, 6), (4, 8)):
        b = _Builder()
        scaled = b.node("Mul", ["x", b.const("c", RNG.uniform(0.5, 2, (1, 4, 1, 1)))], "scaled")
        shifted = b.node("Add", [scaled, b.const("d", RNG.standard_normal((4, 1, 1)))], "shifted")
        y = b.conv(shifted, "conv", 4, cout, 1, group=group)  # unpadded: the shift folds too
        model = b.model([y])
        x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
        want = _run(model, x)
        assert fold_conv_affine(model)["before_conv"] == 2, group
        assert Counter(n.op_type for n in model.graph.node) == Counter({"Conv": 1})
        np.testing.assert_allclose(_run(model, x), want, rtol=1e-5, atol=1e-5)
