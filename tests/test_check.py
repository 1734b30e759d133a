"""`npu-pipeline check` agrees with `run`: every bad input of the catalogue (tests/test_bad_inputs.py) fails
`check` with the exit code `run` gives and a message naming the same field, file or tensor; several
problems are listed in one message; a good recipe passes without writing anything."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from .test_bad_inputs import CASES, _invoke, assert_clean_failure, edit, snapshot, write_npz
from .test_hostile_inputs import CASES as HOSTILE_CASES

# Every case of both catalogues that `run` meets with the plain recipe (no extra command-line arguments).
RUN_CASES = [c for c in [*CASES, *HOSTILE_CASES] if c.command == "run" and c.args is None]


@pytest.mark.parametrize("case", RUN_CASES, ids=[c.id for c in RUN_CASES])
def test_check_agrees_with_run(case, tiny_cnn_recipe, monkeypatch):
    recipe = tiny_cnn_recipe()
    monkeypatch.syspath_prepend(str(recipe.parent))
    case.setup(recipe)
    for key, value in case.env:
        monkeypatch.setenv(key, value)
    before = snapshot(recipe.parent)
    result = _invoke(["check", str(recipe)], recipe.parent)
    # run stops at the first problem; check goes on and may list its consequences too (several lines).
    assert_clean_failure(result.exit_code, result.stdout, result.stderr, case.code, case.fragments, multi=True)
    assert snapshot(recipe.parent) == before, "check must write nothing"


def test_check_passes_a_good_recipe_and_writes_nothing(tiny_cnn_recipe):
    recipe = tiny_cnn_recipe()
    before = sorted(p.name for p in recipe.parent.iterdir())
    result = _invoke(["check", str(recipe)], recipe.parent)
    assert result.exit_code == 0, result.output
    assert "calibration: calib.npz: 16 sample(s) of x float32[1, 1, 8, 8]" in result.stdout
    assert "validation: val.npz: 8 sample(s) of x float32[1, 1, 8, 8], 8 labels" in result.stdout
    assert sorted(p.name for p in recipe.parent.iterdir()) == before


def test_check_lists_every_problem_at_once(tiny_cnn_recipe):
    """An unwritable output, a NaN in calibration, an unknown node, too few labels and an unknown output."""
    recipe = tiny_cnn_recipe()
    x = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
    x[5, 0, 0, 0] = np.nan
    write_npz("calib.npz", x=x)(recipe)
    write_npz("val.npz", x=x[8:], label=np.zeros(3, np.int64))(recipe)
    (recipe.parent / "blocker").write_text("")
    edit(**{"output": "blocker/out", "quantization.exclude_nodes": ["nope"], "validation.output": "scores"})(recipe)
    result = _invoke(["check", str(recipe)], recipe.parent)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert "5 problems that 'run' would refuse" in lines[0], result.stderr
    expected = ["output folder", "calib.npz, sample 5: input 'x' holds 1 NaN/inf", "quantization.exclude_nodes: no node named nope",
                "validation.data.labels", "the model has no output 'scores'"]
    for line, fragment in zip(lines[1:], expected):  # in the order run meets them
        assert fragment in line, (fragment, result.stderr)


def test_check_notes_calibration_and_validation_on_the_same_data(tiny_cnn_recipe):
    recipe = tiny_cnn_recipe()
    data = yaml.safe_load(recipe.read_text())
    data["validation"]["data"] = {"kind": "npz", "path": "calib.npz"}
    recipe.write_text(yaml.safe_dump(data))
    result = _invoke(["check", str(recipe)], recipe.parent)
    assert result.exit_code == 0, result.output
    assert "note: calibration and validation read the same data" in result.stdout


def test_check_passes_the_shipped_digits_recipe_with_a_builder_model():
    from .conftest import RECIPES

    result = _invoke(["check", str(RECIPES / "digits_cnn.yaml")], RECIPES)
    assert result.exit_code == 0, result.output
    assert "model pipeline.models.digits:build: example inputs [1, 1, 32, 32]" in result.stdout
    assert "validation: validation.npz: 360 sample(s) of image float32[1, 1, 32, 32], 360 labels" in result.stdout
