"""The recipe schema: every shipped recipe validates; bad recipes fail with every error and its path."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from pipeline.errors import RecipeError
from pipeline.core.formats import Format
from pipeline.recipe import load_recipe


def resolve_format(recipe):
    return recipe.target_and_format()

from .conftest import RECIPES

SHIPPED = sorted(RECIPES.glob("*.yaml"))


def test_recipes_folder_is_not_empty():
    assert len(SHIPPED) >= 2


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_recipe_validates(path: Path):
    recipe = load_recipe(path)
    target, fmt = resolve_format(recipe)
    assert fmt in target.formats
    assert recipe.name == path.stem, "a recipe's name is its file name, so build/<name> is predictable"
    for section in ("calibration", "validation"):
        data = getattr(recipe, section).data
        if data.kind == "builder":  # code, not a file: the entry point must exist
            module, _, func = data.builder.partition(":")
            assert callable(getattr(importlib.import_module(module), func, None)), data.builder
        else:
            assert recipe.resolve(data.path).exists()
    if recipe.model.onnx is not None:
        assert recipe.resolve(recipe.model.onnx).is_file()


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _base() -> dict:
    return yaml.safe_load((RECIPES / "digits_cnn.yaml").read_text())


def test_unknown_keys_are_rejected_with_their_path(tmp_path: Path):
    data = _base()
    data["calibraton"] = {}
    data["quantization"]["fromat"] = "a8w8"
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, data))
    message = str(err.value)
    assert "calibraton: unknown key" in message
    assert "quantization.fromat: unknown key" in message
    assert "2 errors" in message


def test_every_error_is_reported_at_once(tmp_path: Path):
    data = _base()
    del data["validation"]
    data["inputs"][0]["shape"] = [1, 0, 32]
    data["quantization"]["format"] = "int4"
    data["gates"] = [{"metric": "cosine_mean"}]
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, data))
    message = str(err.value)
    for fragment in ("validation: required key is missing", "inputs.0.shape.1", "quantization.format", "gates.0"):
        assert fragment in message, message


def test_model_source_needs_exactly_one_of_builder_or_onnx(tmp_path: Path):
    data = _base()
    data["model"] = {"builder": "pipeline.models.digits:build", "onnx": "x.onnx"}
    with pytest.raises(RecipeError, match="exactly one of 'builder'"):
        load_recipe(_write(tmp_path, data))


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path: Path):
    recipe = load_recipe(RECIPES / "digits_cnn.yaml")
    assert recipe.resolve(recipe.calibration.data.path) == (RECIPES.parent / "calibration_data/digits/calibration.npz")


def test_format_the_target_does_not_take_is_a_recipe_error(tmp_path: Path):
    data = _base()
    data["quantization"] = {"target": "xdna1", "format": "bf16"}
    with pytest.raises(RecipeError, match="target 'xdna1' does not take 'bf16'"):
        resolve_format(load_recipe(_write(tmp_path, data)))


def test_default_format_comes_from_the_target(tmp_path: Path):
    data = _base()
    data["quantization"] = {"target": "xdna1"}
    assert resolve_format(load_recipe(_write(tmp_path, data)))[1] is Format.XINT8


def test_missing_and_non_yaml_files(tmp_path: Path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
