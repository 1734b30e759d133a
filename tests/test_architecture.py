"""The architecture holds: layered imports (import-linter contracts in pyproject.toml), no import cycles
(function-local imports included), small modules, and registries that take a new format, target, range
method, transform or data kind as one module (A16W4 is the worked example)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "pipeline"
MAX_LINES = 400


def test_import_layer_contracts_are_kept():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is a dev dependency (pyproject.toml [dev])"
    result = subprocess.run([lint, "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_import_cycles():
    """grimp sees every import statement, function-local ones too; no module may reach itself."""
    import grimp

    sys.path.insert(0, str(ROOT))
    try:
        graph = grimp.build_graph("pipeline", cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                cycles.append(" -> ".join([module, *back]))
    assert not cycles, "\n".join(cycles)


def test_no_module_is_over_the_size_limit():
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    too_big = {str(p): n for p, n in sizes.items() if n > MAX_LINES}
    assert not too_big, f"modules over {MAX_LINES} lines (split them): {too_big}"


def test_registries_hold_the_builtins():
    from pipeline.core.formats import Format, all_formats
    from pipeline.data import data_kinds
    from pipeline.quant.ranges import range_methods
    from pipeline.quant.transforms import transform_registry
    from pipeline.targets import TARGETS

    assert {f.value for f in all_formats()} >= {"xint8", "a8w8", "a16w8", "bf16", "u8s8", "a16w4"}
    assert Format("A8W8") is Format.A8W8 and Format.A16W4.spec.weight_bits == 4
    assert set(TARGETS) >= {"xdna1", "xdna2", "cpu"}
    assert set(range_methods()) >= {"minmax", "percentile", "entropy", "mse", "auto"}
    assert set(transform_registry()) >= {"cross_layer_equalization", "smoothquant", "bias_correction"}
    assert set(data_kinds()) >= {"npz", "text", "images"}
    with pytest.raises(ValueError, match="already registered"):
        from pipeline.core.formats import FormatSpec, register_format

        register_format(FormatSpec("a8w8", "again", 8, 8))


def test_a16w4_added_as_one_module_runs_end_to_end(tiny_cnn_recipe, tmp_path):
    """The format added as the proof of the registries: int16 activations, int4 per-channel weights,
    emulated on the CPU target; inspect recognises it without being told."""
    import onnx

    from pipeline.api import run_recipe
    from pipeline.inspect import inspect_model
    from pipeline.recipe import load_recipe

    recipe = load_recipe(tiny_cnn_recipe(quantization={"target": "cpu", "format": "a16w4"}, gates=[]))
    result = run_recipe(recipe, out=tmp_path / "run", progress=False)
    model = onnx.load(str(result.artifact / "model.onnx"))
    weight_types = {t.data_type for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.INT8)}
    assert weight_types == {onnx.TensorProto.INT4}
    assert inspect_model(model, "cpu").detected_format.value == "a16w4"
    assert result.metrics["top1_agreement"] >= 90.0 and result.metrics["sqnr_db"] > 10.0
