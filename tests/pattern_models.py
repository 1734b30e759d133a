"""Tiny models with the patterns that broke real heads (issue 8), built in code, and their data.

- `TinyYolo`: a YOLOv8-style head. Cell colour features, a depthwise-separable ReLU6 block with a
  residual, a box branch decoded to pixel coordinates 0..320 and a class branch through a Sigmoid,
  concatenated into one output [1, 4 + 2, 64] (channels first). Class c scores high where a square of
  colour c is, so the float model detects boxes that the quantized one must find again.
- `ctc_recognizer`: a CTC head [1, T, C] (onnx.helper), a blank branch and a character branch
  concatenated: per step, the blank logit swings +-`blank_gain`, the character logits are `margin` apart. A large swing next to a small margin is the OCR
  recognizer of the issue: per-step agreement stays high (most steps are blank) while the characters go.
- `export_keypoint_head`: one output whose first channel is in pixels (0..320) and the others near 0..1.
- `TinyMapNet`: a text-detector-like probability map [1, 1, 16, 16] (Conv, ReLU, Conv, Sigmoid).
- `sequence_classifier`: [1, T, C] logits classified per position, their ArgMax (int64, [1, T]) and a
  [1, 1] score, as three outputs (onnx.helper).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["export_yolo", "yolo_images", "ctc_recognizer", "ctc_features", "export_keypoint_head", "export_map_net",
           "blob_images",
           "sequence_classifier", "write_recipe"]


def _torch():
    import torch

    return torch


def export_yolo(path: Path, *, classes: int = 2) -> Path:
    torch = _torch()
    nn = torch.nn

    class TinyYolo(nn.Module):
        def __init__(self, size: int = 64, stride: int = 8, scale: float = 5.0) -> None:
            super().__init__()
            g = size // stride
            self.cell = nn.Conv2d(3, 3, stride, stride=stride, bias=False)  # each cell's mean colour
            self.pw1, self.pw2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 3, 1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.cls, self.box = nn.Conv2d(3, classes, 1), nn.Conv2d(3, 4, 1)
            ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
            self.register_buffer("grid", torch.stack([xs, ys]).reshape(1, 2, -1).float() + 0.5)
            self.stride, self.scale, self.g = stride, scale, g
            with torch.no_grad():
                self.cell.weight.zero_()
                for c in range(3):
                    self.cell.weight[c, c] = 1.0 / stride**2
                gen = torch.Generator().manual_seed(0)
                for m in (self.pw1, self.dw, self.pw2, self.box):
                    m.weight.copy_(0.3 * torch.randn(m.weight.shape, generator=gen))
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                self.cls.weight.zero_()  # class c: colour channel c above the other two
                for c in range(classes):
                    self.cls.weight[c, :, 0, 0] = -7.0
                    self.cls.weight[c, c, 0, 0] = 14.0
                self.cls.bias.fill_(-4.0)

        def forward(self, x):
            f = self.cell(x)
            f = f + self.pw2(torch.clamp(self.dw(torch.clamp(self.pw1(f), 0, 6)), 0, 6))  # ReLU6 dw block + residual
            s = torch.sigmoid(self.box(f)).reshape(1, 4, -1)
            xy = (self.grid + s[:, :2] - 0.5) * self.stride * self.scale  # pixels of a 320 x 320 image
            wh = s[:, 2:] * 3 * self.stride * self.scale
            scores = torch.sigmoid(self.cls(f)).reshape(1, -1, self.g * self.g)
            return torch.cat([xy, wh, scores], 1)

    torch.onnx.export(TinyYolo().eval(), (torch.zeros(1, 3, 64, 64),), str(path), input_names=["image"],
                      output_names=["pred"], opset_version=17, dynamo=False)
    return path


def yolo_images(n: int, seed: int, size: int = 64) -> np.ndarray:
    """Grey noise with 1-3 squares, each bright in one colour channel (its class)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.35, 0.65, (n, 3, size, size)).astype(np.float32)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            s = int(rng.integers(10, 20))
            r, c = rng.integers(0, size - s, 2)
            x[i, :, r:r + s, c:c + s] = 0.1
            x[i, rng.integers(0, 2), r:r + s, c:c + s] = 0.95
    return x


def ctc_recognizer(path: Path, *, steps: int = 24, chars: int = 4, margin: float, blank_gain: float) -> Path:
    """logits [1, T, 1 + chars] = Concat(blank branch, character branch) on the class axis: the blank's
    logit is blank_gain * (1 - 2 * sum(x)) (high on empty steps, low where a character is), character k's
    is margin * x_k (features [1, T, chars])."""
    consts = {
        "axes": np.array([2], np.int64), "neg": np.array(-2 * blank_gain, np.float32),
        "gain": np.array(blank_gain, np.float32), "w": (margin * np.eye(chars)).astype(np.float32),
    }
    nodes = [
        helper.make_node("ReduceSum", ["features", "axes"], ["ink"], keepdims=1),
        helper.make_node("Mul", ["ink", "neg"], ["scaled"]),
        helper.make_node("Add", ["scaled", "gain"], ["blank"]),
        helper.make_node("MatMul", ["features", "w"], ["chars"]),
        helper.make_node("Concat", ["blank", "chars"], ["logits"], axis=2),
    ]
    graph = helper.make_graph(
        nodes, "ctc", [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, steps, chars])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, steps, chars + 1])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def export_keypoint_head(path: Path) -> Path:
    """A keypoint-style head [1, 3, 8, 8]: one conv, then each anchor's position in pixels added to the
    first channel (0..320) while the other two stay scores around 0..1: one tensor, two ranges, no Concat."""
    torch = _torch()
    nn = torch.nn

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            offsets = torch.zeros(1, 3, 8, 8)
            offsets[0, 0] = 40.0 * torch.arange(8).reshape(1, 8) + 20.0  # anchor x in pixels
            self.register_buffer("offsets", offsets)
            with torch.no_grad():
                gen = torch.Generator().manual_seed(1)
                self.conv.weight.copy_(0.05 * torch.randn(self.conv.weight.shape, generator=gen))
                self.conv.bias.copy_(torch.tensor([0.0, 0.2, -0.2]))

        def forward(self, x):
            return self.conv(x) + self.offsets

    torch.onnx.export(Head().eval(), (torch.zeros(1, 3, 8, 8),), str(path), input_names=["image"],
                      output_names=["keypoints"], opset_version=17, dynamo=False)
    return path


def ctc_features(n: int, seed: int, *, steps: int = 24, chars: int = 4) -> np.ndarray:
    """Text lines: runs of 2 steps per character, blank gaps between them, a little noise."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(0, 0.03, (n, steps, chars))).astype(np.float32)
    for i in range(n):
        t = int(rng.integers(0, 3))
        while t + 2 <= steps:
            x[i, t:t + 2, rng.integers(0, chars)] += 1.0
            t += 2 + int(rng.integers(3, 8))  # mostly blank, as text lines are
    return x


def export_map_net(path: Path) -> Path:
    torch = _torch()
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1), nn.Sigmoid())
    with torch.no_grad():  # map = sigmoid(k * (local mean brightness) - t): high on bright blobs
        net[0].weight.fill_(1.0 / 9)
        net[0].bias.copy_(torch.tensor([0.0, -0.1, -0.2, -0.3]))
        net[2].weight.fill_(1.0)
        net[2].bias.fill_(-6.0)
    torch.onnx.export(net.eval(), (torch.zeros(1, 1, 16, 16),), str(path), input_names=["image"],
                      output_names=["prob_map"], opset_version=17, dynamo=False)
    return path


def blob_images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.2, (n, 1, 16, 16)).astype(np.float32)
    for i in range(n):
        r, c, s = *rng.integers(0, 10, 2), int(rng.integers(4, 7))
        x[i, 0, r:r + s, c:c + s] += 0.8
    return x


def sequence_classifier(path: Path, *, steps: int = 6, features: int = 4, classes: int = 3) -> Path:
    rng = np.random.default_rng(5)
    w = rng.normal(0, 1.0, (features, classes)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["logits"]),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=-1, keepdims=0),
        helper.make_node("ReduceMean", ["logits"], ["score"], axes=[1, 2], keepdims=0),
        helper.make_node("Unsqueeze", ["score", "one"], ["score2"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, steps, classes]),
               helper.make_tensor_value_info("label", TensorProto.INT64, [1, steps]),
               helper.make_tensor_value_info("score2", TensorProto.FLOAT, [1, 1])]
    graph = helper.make_graph(nodes, "seqcls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, steps, features])],
                              outputs, [numpy_helper.from_array(w, "w"),
                                        numpy_helper.from_array(np.array([1], np.int64), "one")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def write_recipe(folder: Path, name: str, model: Path, input_name: str, shape: list[int], calib: np.ndarray,
                 val: np.ndarray, *, validation: dict | None = None, quantization: dict | None = None,
                 gates: list | None = None) -> Path:
    import yaml

    np.savez(folder / f"{name}_calib.npz", **{input_name: calib})
    np.savez(folder / f"{name}_val.npz", **{input_name: val})
    recipe = {
        "name": name,
        "model": {"onnx": model.name},
        "inputs": [{"name": input_name, "shape": shape}],
        "calibration": {"data": {"kind": "npz", "path": f"{name}_calib.npz"}, "samples": len(calib)},
        "validation": {"data": {"kind": "npz", "path": f"{name}_val.npz"}, "samples": len(val), **(validation or {})},
        "quantization": {"target": "xdna2", "format": "a8w8", **(quantization or {})},
        "gates": gates or [],
        "output": f"run_{name}",
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
