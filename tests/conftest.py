"""Shared fixtures: tiny models built in code, and the repository's paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"


def write_tiny_recipe(folder: Path, **overrides) -> Path:
    """A tiny CNN (built in code, exported by the real exporter) plus npz data and a recipe, in `folder`."""
    import torch
    import yaml

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).eval()
    example = torch.randn(1, 1, 8, 8)
    onnx_path = folder / "tiny.onnx"
    torch.onnx.export(model, (example,), str(onnx_path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 1, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 24)
    np.savez(folder / "calib.npz", x=x[:16])
    np.savez(folder / "val.npz", x=x[16:], label=labels[16:])
    recipe = {
        "name": "tiny",
        "model": {"onnx": "tiny.onnx"},
        "inputs": [{"name": "x", "shape": [1, 1, 8, 8]}],
        "calibration": {"data": {"kind": "npz", "path": "calib.npz"}, "samples": 16},
        "validation": {"data": {"kind": "npz", "path": "val.npz", "labels": "label"}, "samples": 8},
        "quantization": {"target": "xdna2", "format": "a8w8"},
        "output": "out",
    }
    for key, value in overrides.items():
        recipe[key] = value
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture()
def tiny_cnn_recipe(tmp_path: Path):
    """Writes a tiny CNN (built in code, exported by the real exporter) plus npz data and a recipe."""

    def make(**overrides) -> Path:
        return write_tiny_recipe(tmp_path, **overrides)

    return make
