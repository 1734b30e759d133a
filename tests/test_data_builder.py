"""Data kind `builder`: samples made by trusted code named in the recipe, streamed and checked.

The builders below are tiny and live in this module (`tests.test_data_builder:...`), as a user's would
live in theirs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data import dataset_fingerprint, open_dataset
from pipeline.errors import DataError, RecipeError
from pipeline.recipe import recipe_from_dict

CALLS = {"count": 0}


def sized(n: int = 5, scale: float = 1.0, with_labels: bool = False):
    """A re-iterable, sized set of samples for input 'x' [1, 2]."""
    CALLS["count"] += 1
    samples = [{"x": np.full((1, 2), i * scale, dtype=np.float32)} for i in range(n)]
    return (samples, np.arange(n) % 2) if with_labels else samples


def generator(n: int = 5):
    """A one-shot generator: every pass over the data must call the builder again."""
    CALLS["count"] += 1
    return ({"x": np.full((1, 2), i, dtype=np.float32)} for i in range(n))


def wrong_shape():
    return [{"x": np.zeros((1, 3), dtype=np.float32)}]


def not_dicts():
    return [np.zeros((1, 2), dtype=np.float32)]


def unknown_input():
    return [{"x": np.zeros((1, 2), dtype=np.float32), "y": np.zeros(1)}]


def reads_file(path: str):
    values = np.loadtxt(path, dtype=np.float32, ndmin=1)
    return [{"x": np.full((1, 2), v, dtype=np.float32)} for v in values]


def _recipe(tmp_path: Path, builder: str, args: dict | None = None, samples: int = 100):
    data = {"kind": "builder", "builder": builder, "args": args or {}}
    return recipe_from_dict(
        {
            "name": "b",
            "model": {"onnx": "m.onnx"},
            "inputs": [{"name": "x", "shape": [1, 2]}],
            "calibration": {"data": data, "samples": samples},
            "validation": {"data": data, "samples": samples},
        },
        base_dir=tmp_path,
    )


def test_sized_builder_streams_its_samples_and_labels(tmp_path: Path):
    recipe = _recipe(tmp_path, "tests.test_data_builder:sized", {"n": 7, "with_labels": True}, samples=4)
    source = open_dataset(recipe, "validation")
    assert len(source) == 4  # the recipe's samples cap the builder's 7
    values = [float(batch["x"][0, 0]) for batch in source]
    assert values == [0.0, 1.0, 2.0, 3.0]
    assert values == [float(batch["x"][0, 0]) for batch in source]  # a second pass gives the same
    assert source.labels.tolist() == [0, 1, 0, 1]


def test_generator_builder_is_counted_then_called_again_for_each_pass(tmp_path: Path):
    recipe = _recipe(tmp_path, "tests.test_data_builder:generator", {"n": 3})
    before = CALLS["count"]
    source = open_dataset(recipe, "calibration")
    assert len(source) == 3
    assert [float(b["x"][0, 0]) for b in source] == [0.0, 1.0, 2.0]
    assert [float(b["x"][0, 0]) for b in source] == [0.0, 1.0, 2.0]
    assert CALLS["count"] - before == 3  # counting pass, then one call per pass


@pytest.mark.parametrize(
    "builder, message",
    [
        ("tests.test_data_builder:wrong_shape", r"input 'x' has shape \[1, 3\], the recipe declares \[1, 2\]"),
        ("tests.test_data_builder:not_dicts", "sample 0 is a ndarray, not a dict"),
        ("tests.test_data_builder:unknown_input", "y are not model inputs"),
        ("tests.test_data_builder:absent", "module 'tests.test_data_builder' has no function 'absent'"),
        ("tests.no_such_module:f", "cannot import module 'tests.no_such_module'"),
    ],
)
def test_bad_builders_fail_with_one_clear_data_error(tmp_path: Path, builder: str, message: str):
    recipe = _recipe(tmp_path, builder)
    with pytest.raises(DataError, match=message) as info:
        list(open_dataset(recipe, "calibration"))
    assert "\n" not in str(info.value)


def test_builder_entry_point_is_checked_by_the_schema(tmp_path: Path):
    with pytest.raises(RecipeError, match=r"calibration\.data\.builder: builder 'nocolon' must look like"):
        _recipe(tmp_path, "nocolon")


def test_fingerprint_covers_entry_point_source_args_and_files(tmp_path: Path):
    values = tmp_path / "values.txt"
    values.write_text("1\n2\n")
    base = dataset_fingerprint(_recipe(tmp_path, "tests.test_data_builder:reads_file", {"path": "values.txt"}), "validation")
    assert base["source"] != "tests.test_data_builder"  # the module's file was found and hashed
    assert dataset_fingerprint(_recipe(tmp_path, "tests.test_data_builder:sized", {"n": 5}), "validation") != \
        dataset_fingerprint(_recipe(tmp_path, "tests.test_data_builder:sized", {"n": 6}), "validation")
    source = open_dataset(_recipe(tmp_path, "tests.test_data_builder:reads_file", {"path": "values.txt"}), "validation")
    assert [float(b["x"][0, 0]) for b in source] == [1.0, 2.0]  # a relative path reaches the builder absolute
    values.write_text("1\n3\n")
    changed = dataset_fingerprint(_recipe(tmp_path, "tests.test_data_builder:reads_file", {"path": "values.txt"}), "validation")
    assert changed["files"] != base["files"] and changed["source"] == base["source"]


def test_builder_recipes_pass_check(tmp_path: Path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    from .conftest import RECIPES

    result = CliRunner().invoke(app, ["check", str(RECIPES / "mobilenet_v2_a8w8.yaml")])
    assert result.exit_code == 0, result.output
    assert "mobilenet_v2_a8w8 (xdna2, a8w8)" in result.output
