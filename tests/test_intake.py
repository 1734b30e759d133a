"""Models as users bring them, run from a recipe with no graph surgery (issue 10, part 1).

- a streaming audio model in the style of Silero VAD (a small torch GRU-cell network exported here): a
  rank-0 int64 sample-rate input declared as a constant (`value:`, folded by prepare), a recurrent state
  [2, 1, 128] whose dim 0 is not a batch, recorded from the float model's own output (`from_output:`),
  fed from a folder of WAV files (data kind `audio`) split into calibration and validation;
- the same state fed from an npz instead ([N, 2, 1, 128]: the sample axis first);
- an export in the style of Paddle: dynamic dims stored as -1 and 0, a stale -1 on an Identity output;
- an ONNX file whose weights sit in an external-data file beside it;
- a model builder and a data builder in modules next to the recipe, in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data import open_dataset
from pipeline.recipe import load_recipe

from .conftest import ROOT

torch = pytest.importorskip("torch")
nn = torch.nn


class TinyVad(nn.Module):
    """Silero-VAD-shaped: (audio [1, 512], state [2, 1, 128], sr []) -> (speech prob [1, 1], new state)."""

    def __init__(self) -> None:
        super().__init__()
        self.frontend = nn.Conv1d(1, 16, kernel_size=32, stride=16)
        self.cell0, self.cell1 = nn.GRUCell(16, 128), nn.GRUCell(128, 128)
        self.head = nn.Linear(128, 1)

    def forward(self, x, state, sr):
        x = x * (sr.to(torch.float32) / 16000.0)
        f = torch.relu(self.frontend(x.unsqueeze(1))).mean(dim=2)
        h0 = self.cell0(f, state[0])
        h1 = self.cell1(h0, state[1])
        return torch.sigmoid(self.head(h1)), torch.stack([h0, h1])


def _export_vad(path: Path) -> None:
    torch.manual_seed(0)
    example = (torch.randn(1, 512), torch.zeros(2, 1, 128), torch.tensor(16000))
    torch.onnx.export(TinyVad().eval(), example, str(path), input_names=["input", "state", "sr"],
                      output_names=["output", "stateN"], opset_version=17, dynamo=False)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def _clips(folder: Path, count: int = 6) -> None:
    """Chirps and bursts of noise of different lengths (each file its own sequence)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        t = np.arange(16000 // 4 * (2 + i % 3)) / 16000
        tone = 0.4 * np.sin(2 * np.pi * (200 + 300 * i) * t * (1 + t))
        write_wav(folder / f"clip{i}.wav", tone + 0.05 * rng.standard_normal(len(t)) * (i % 2), 16000)


def _vad_recipe(folder: Path, state: dict, data: dict) -> Path:
    recipe = {
        "name": "vad",
        "model": {"onnx": "vad.onnx"},
        "inputs": [{"name": "input", "shape": [1, 512]}, {"name": "state", "shape": [2, 1, 128], **state},
                   {"name": "sr", "shape": [], "dtype": "int64", "value": 16000}],
        "calibration": {"data": data, "samples": 64},
        "validation": {"data": data, "samples": 64, "task": "regression", "output": "output"},
        "quantization": {"target": "xdna2", "format": "a8w8"},
        "gates": [{"metric": "sqnr_db", "min": 10}],
        "output": "out",
    }
    path = folder / "vad.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _run(recipe: Path, *extra: str):
    result = CliRunner().invoke(app, ["run", str(recipe), "--quiet", *extra])
    return result


def test_audio_model_with_scalar_constant_and_recorded_state(tmp_path: Path):
    _export_vad(tmp_path / "vad.onnx")
    _clips(tmp_path / "clips")
    audio = {"kind": "audio", "path": "clips", "sample_rate": 16000, "hop": 256, "split": {"seed": 0, "validation": 0.34}}
    recipe = _vad_recipe(tmp_path, {"from_output": "stateN"}, audio)
    assert CliRunner().invoke(app, ["check", str(recipe)]).exit_code == 0
    result = _run(recipe)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out/artifact/manifest.json").read_text())
    assert [i["name"] for i in manifest["signature"]["inputs"]] == ["input", "state"]  # sr folded
    prepare = json.loads((tmp_path / "out/prepare/stage.json").read_text())["metrics"]
    assert prepare["constant_inputs_folded"] == ["sr"]

    # The states calibration saw: zeros at each file's first window, else the float model's previous output.
    spec = load_recipe(recipe)
    prepared = tmp_path / "out/prepare/model.onnx"
    batches = list(open_dataset(spec, "calibration", state_model=prepared))
    source = open_dataset(spec, "calibration", state_model=prepared)
    import onnxruntime as ort

    session = ort.InferenceSession(str(prepared), providers=["CPUExecutionProvider"])
    assert sorted(source.starts) == [0, 30]  # the first two calibration files fill the 64 samples (30 + 34 windows)
    for i, batch in enumerate(batches):
        if i in source.starts:
            assert not batch["state"].any()
        else:
            expected = session.run(["stateN"], batches[i - 1])[0]
            np.testing.assert_allclose(batch["state"], expected, rtol=1e-5, atol=1e-6)
    assert np.abs(batches[5]["state"]).max() > 0.05  # realistic states, not zeros


def test_state_fed_from_npz_with_the_sample_axis_first(tmp_path: Path):
    _export_vad(tmp_path / "vad.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "seq.npz", input=(0.3 * rng.standard_normal((40, 1, 512))).astype(np.float32),
             state=(0.5 * np.tanh(rng.standard_normal((40, 2, 1, 128)))).astype(np.float32))
    npz = {"kind": "npz", "path": "seq.npz", "split": {"seed": 3, "validation": 0.25}}
    recipe = _vad_recipe(tmp_path, {}, npz)
    result = _run(recipe)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out/validate/metrics.json").read_text())
    assert metrics["samples"] == 10


def test_npz_sample_axis_rule(tmp_path: Path):
    """One more dim than the input: samples first; the same rank: stacked on the batch axis; a batch-less
    input with a same-rank array is refused with the shape it needs."""
    from pipeline.data.npz import samples_view
    from pipeline.errors import DataError
    from pipeline.recipe import InputSpec

    state = InputSpec(name="state", shape=[2, 1, 128], from_output="y")
    n, take = samples_view(np.zeros((5, 2, 1, 128), np.float32), state, where="a")
    assert n == 5 and take(4).shape == (2, 1, 128)
    with pytest.raises(DataError, match=r"needs \[N, 2, 1, 128\] \(samples first\)$"):
        samples_view(np.zeros((4, 1, 128), np.float32), state, where="a")
    scalar = InputSpec(name="sr", shape=[], dtype="int64")
    n, take = samples_view(np.arange(7), scalar, where="a")
    assert n == 7 and take(3).shape == () and take(3) == 3
    batch2 = InputSpec(name="x", shape=[2, 3])
    n, take = samples_view(np.arange(30).reshape(10, 3), batch2, where="a")
    assert n == 5 and take(1).tolist() == [[6, 7, 8], [9, 10, 11]]
    n, take = samples_view(np.zeros((6, 2, 3)), batch2, where="a")
    assert n == 6 and take(0).shape == (2, 3)


def _paddle_style(path: Path) -> None:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Identity, every dynamic dim stored as -1 or 0,
    and value_info/outputs that repeat the -1 (what broke shape inference)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "conv_w")
    fc = numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc_w")
    nodes = [helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "fc_w"], ["g"], transB=1),
             helper.make_node("Identity", ["g"], ["logits"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 0, "width"])
    graph = helper.make_graph(nodes, "paddle", [x], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [-1, 5])],
                              [w, fc], value_info=[helper.make_tensor_value_info("g", TensorProto.FLOAT, [-1, 5]),
                                                   helper.make_tensor_value_info("c", TensorProto.FLOAT, [-1, 4, -1, -1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), str(path))


def test_dims_stored_as_minus_one_zero_or_a_name_are_dynamic(tiny_cnn_recipe):
    recipe = tiny_cnn_recipe()
    _paddle_style(recipe.parent / "tiny.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 1, 3, 8, 8)).astype(np.float32)
    np.savez(recipe.parent / "calib.npz", x=x[:16])
    np.savez(recipe.parent / "val.npz", x=x[16:], label=rng.integers(0, 5, 8))
    data = yaml.safe_load(recipe.read_text())
    data["inputs"] = [{"name": "x", "shape": [1, 3, 8, 8]}]
    recipe.write_text(yaml.safe_dump(data))
    result = _run(recipe)
    assert result.exit_code == 0, result.output
    export = json.loads((recipe.parent / "out/export/stage.json").read_text())["metrics"]
    assert export["nonpositive_dims_cleared"] == 7  # x: 2, logits: 1, value_info g: 1, c: 3
    prepared = json.loads((recipe.parent / "out/prepare/stage.json").read_text())["metrics"]
    assert prepared["fixed_dims"] == ["x: ? -> 1", "x: ? -> 8", "x: width -> 8"]
    # Its nodes are unnamed: prepare names them (the transforms and exclude_nodes address nodes by name).
    assert prepared["nodes_named"] >= 3
    names = [n.name for n in onnx.load(str(recipe.parent / "out/prepare/model.onnx")).graph.node]
    assert all(names) and len(set(names)) == len(names)


def test_onnx_with_external_data(tiny_cnn_recipe):
    recipe = tiny_cnn_recipe()
    model = onnx.load(str(recipe.parent / "tiny.onnx"))
    onnx.save_model(model, str(recipe.parent / "tiny.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="tiny.onnx.data", size_threshold=0)
    assert (recipe.parent / "tiny.onnx.data").stat().st_size > 0
    result = _run(recipe)
    assert result.exit_code == 0, result.output
    exported = recipe.parent / "out/export"
    assert sorted(p.name for p in exported.iterdir()) == ["model.onnx", "stage.json"]
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in onnx.load(str(exported / "model.onnx")).graph.initializer)

    # The cache key covers the external file: other weights, another export.
    data = bytearray((recipe.parent / "tiny.onnx.data").read_bytes())
    data[:4] = np.float32(0.5).tobytes()
    (recipe.parent / "tiny.onnx.data").write_bytes(bytes(data))
    outcome = CliRunner().invoke(app, ["export", str(recipe)])
    assert outcome.exit_code == 0 and "cached" not in outcome.output, outcome.output

    (recipe.parent / "tiny.onnx.data").unlink()
    for command in ("run", "check"):
        result = CliRunner().invoke(app, [command, str(recipe)])
        assert result.exit_code == 2, result.output
        assert "tiny.onnx.data, missing beside it" in result.stderr, result.stderr


LOCAL_MODEL = '''
import torch
from local_layers import Block  # a sibling module: importable because the recipe's folder is on the path

def build(width=4):
    torch.manual_seed(0)
    return torch.nn.Sequential(Block(int(width)), torch.nn.Flatten(), torch.nn.Linear(int(width) * 16, 3)).eval(), (torch.randn(1, 1, 4, 4),)
'''
LOCAL_LAYERS = '''
import torch

class Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, width, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))
'''
LOCAL_DATA = '''
import numpy as np

def samples(n=12, seed=0):
    rng = np.random.default_rng(int(seed))
    return [{"x": rng.standard_normal((1, 1, 4, 4)).astype(np.float32)} for _ in range(int(n))]
'''


def test_builders_next_to_the_recipe_import_in_a_fresh_interpreter(tmp_path: Path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "local_model.py").write_text(LOCAL_MODEL)
    (folder / "local_layers.py").write_text(LOCAL_LAYERS)
    (folder / "local_data.py").write_text(LOCAL_DATA)
    data = {"kind": "builder", "builder": "local_data:samples", "args": {"n": 12}}
    recipe = {"name": "local", "model": {"builder": "local_model:build", "args": {"width": 4}},
              "inputs": [{"name": "x", "shape": [1, 1, 4, 4]}], "calibration": {"data": data, "samples": 12},
              "validation": {"data": {**data, "args": {"n": 6, "seed": 1}}, "samples": 6}, "output": "out"}
    (folder / "local.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the pipeline only: not the recipe's folder
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(folder / "local.yaml"), "--quiet"],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    recipe["model"]["builder"] = "no_such_local:build"
    (folder / "local.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "check", str(folder / "local.yaml")],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert f"looked in the recipe's folder {folder}" in proc.stderr and "no_such_local.py next to the recipe" in proc.stderr

    (folder / "broken_dep.py").write_text("import not_installed_package_xyz\ndef build():\n    pass\n")
    recipe["model"]["builder"] = "broken_dep:build"
    (folder / "local.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "check", str(folder / "local.yaml")],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "'broken_dep' was found but its own import failed" in proc.stderr, proc.stderr
    assert "not_installed_package_xyz" in proc.stderr


def test_constant_and_state_declarations_are_checked_by_the_schema():
    from pipeline.errors import RecipeError
    from pipeline.recipe import recipe_from_dict

    base = {"name": "t", "model": {"onnx": "m.onnx"},
            "calibration": {"data": {"kind": "npz", "path": "c.npz"}},
            "validation": {"data": {"kind": "npz", "path": "v.npz"}}}
    cases = [
        ([{"name": "x", "shape": [1]}, {"name": "k", "shape": [2], "value": [1, 2, 3]}], r"value has shape \[3\]"),
        ([{"name": "x", "shape": [1]}, {"name": "k", "shape": [], "dtype": "int64", "value": 1.5}], "not a whole number"),
        ([{"name": "x", "shape": [1]}, {"name": "h", "shape": [2], "value": 0, "from_output": "y"}], "not both"),
        ([{"name": "x", "shape": [], "batch": True}], "has no batch axis"),
        ([{"name": "h", "shape": [2], "from_output": "y"}], "at least one must come from data"),
        ([{"name": "x", "shape": [1], "initial": 1.0}], "only apply with 'from_output'"),
    ]
    for inputs, message in cases:
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict({**base, "inputs": inputs})
    spec = recipe_from_dict({**base, "inputs": [{"name": "x", "shape": [1]},
                                                {"name": "k", "shape": [2, 2], "dtype": "int32", "value": 3}]})
    assert spec.inputs[1].constant_array().tolist() == [[3, 3], [3, 3]]
    assert [i.name for i in spec.data_inputs()] == ["x"]


def test_prepare_gives_a_shapeless_input_the_declared_shape_and_folds_constants():
    """Some converters state no shape at all on an input; a constant input becomes an initializer."""
    from pipeline.recipe import recipe_from_dict
    from pipeline.stages.prepare import fix_input_shapes, fold_constant_inputs

    nodes = [helper.make_node("Mul", ["x", "k"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
                                           helper.make_tensor_value_info("k", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = {"kind": "npz", "path": "c.npz"}
    spec = recipe_from_dict({"name": "t", "model": {"onnx": "m.onnx"},
                             "inputs": [{"name": "x", "shape": [1, 4]}, {"name": "k", "shape": [1], "value": 2.5}],
                             "calibration": {"data": data}, "validation": {"data": data}})
    assert fix_input_shapes(model, spec) == ["x: ? -> 1", "x: ? -> 4"]
    assert fold_constant_inputs(model, spec) == ["k"]
    assert [i.name for i in model.graph.input] == ["x"]
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 4]
    assert session.run(None, {"x": np.ones((1, 4), np.float32)})[0].tolist() == [[2.5] * 4]
