"""Targets are data: lookup, formats, operator tables from the shipped CSV, VitisAI provider options."""

from __future__ import annotations

import dataclasses
from importlib import resources

import pytest

from pipeline.errors import PipelineError, RecipeError
from pipeline.core.formats import Format, all_formats
from pipeline.targets import TARGETS, Target, TargetError, get_target, npu_op_table

SHA = "0123456789abcdef" * 4


def test_lookup_is_case_insensitive_and_returns_the_same_object():
    assert set(TARGETS) == {"xdna1", "xdna2", "cpu"}
    assert get_target("XDNA2") is TARGETS["xdna2"]
    assert get_target(TARGETS["cpu"]) is TARGETS["cpu"]


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(TargetError) as err:
        get_target("xdna3")
    message = str(err.value)
    assert "xdna3" in message and "xdna1" in message and "xdna2" in message and "cpu" in message
    # Bad input for the CLI (exit code 2), and a ValueError for a pydantic validator.
    assert isinstance(err.value, RecipeError) and isinstance(err.value, ValueError)
    assert isinstance(err.value, PipelineError) and err.value.exit_code == 2


def test_formats_and_defaults():
    assert TARGETS["xdna1"].formats == (Format.XINT8,)
    assert TARGETS["xdna1"].default_format is Format.XINT8
    assert TARGETS["xdna2"].formats == (Format.XINT8, Format.A8W8, Format.A16W8, Format.BF16)
    assert TARGETS["xdna2"].default_format is Format.A8W8
    assert TARGETS["cpu"].default_format is Format.U8S8
    assert Format.BF16 not in TARGETS["cpu"].formats
    for target in TARGETS.values():
        assert target.opset_min <= 13 and target.opset_recommended == 17
        assert set(target.formats) <= set(all_formats())


def test_resolve_format():
    xdna1 = get_target("xdna1")
    assert xdna1.resolve_format(None) is Format.XINT8
    assert get_target("xdna2").resolve_format("bf16") is Format.BF16
    with pytest.raises(TargetError, match="xdna1.*does not take format a8w8.*xint8"):
        xdna1.resolve_format(Format.A8W8)
    with pytest.raises(TargetError, match="unknown format 'int4'"):
        xdna1.resolve_format("int4")


def test_operator_tables_come_from_the_shipped_csv():
    assert resources.files("pipeline.targets").joinpath("ryzenai_npu_ops.csv").is_file()
    xdna1, xdna2, cpu = TARGETS["xdna1"], TARGETS["xdna2"], TARGETS["cpu"]
    assert xdna2.runs("Conv", Format.A8W8) and xdna2.runs("MatMul", Format.A16W8)
    assert not xdna2.runs("Einsum", Format.A8W8) and xdna2.runs("Einsum", Format.BF16)
    assert not xdna1.runs("ConvTranspose", Format.XINT8) and xdna2.runs("ConvTranspose", Format.A8W8)
    assert not xdna1.runs("Conv", Format.A8W8)  # a format the target lacks runs nothing
    assert "LayerNormalization" in npu_op_table(Format.XINT8)
    assert "LayerNormalization" not in npu_op_table(Format.A8W8)
    assert cpu.runs("Einsum", Format.U8S8) and cpu.runs("AnyCustomOp", Format.A8W8)  # every op runs


def test_xdna1_provider_options_use_x1_and_the_phoenix_xclbin():
    options = get_target("xdna1").provider_options(SHA, Format.XINT8)
    assert options["target"] == "X1"
    assert options["xclbin"] == "%RYZEN_AI_INSTALLATION_PATH%/voe-4.0-win_amd64/xclbins/phoenix/4x4.xclbin"
    assert options["cache_key"] == "xdna1-xint8-0123456789abcdef"
    assert options["cache_dir"] and "config_file" not in options
    assert all(isinstance(v, str) for v in options.values())  # onnxruntime wants strings


def test_xdna2_provider_options_use_x2_and_no_xclbin():
    options = get_target("xdna2").provider_options(SHA, "a8w8")
    assert options["target"] == "X2"
    assert "xclbin" not in options and "config_file" not in options
    other = get_target("xdna2").provider_options("f" * 64, "a8w8")
    assert other["cache_key"] != options["cache_key"]  # a new model never reuses a compiled cache


def test_bf16_provider_options_and_config_file():
    xdna2 = get_target("xdna2")
    options = xdna2.provider_options(SHA, Format.BF16, config_file="vitisai_config.json")
    assert options["target"] == "X2" and options["config_file"] == "vitisai_config.json"
    assert "xclbin" not in options
    config = xdna2.vitisai_config(Format.BF16)
    assert [p["name"] for p in config["passes"]] == ["init", "vaiml_partition"]
    assert [p["plugin"] for p in config["passes"]] == ["vaip-pass_init", "vaip-pass_vaiml_partition"]
    assert config["target"] == "VAIML"
    assert config["targets"] == [{"name": "VAIML", "pass": ["init", "vaiml_partition"]}]
    assert config["passes"][1]["vaiml_config"] == {
        "optimize_level": 1,
        "preferred_data_storage": "auto",
        "enable_f32_to_bf16_conversion": True,
    }
    tuned = xdna2.vitisai_config("bf16", optimize_level=3, preferred_data_storage="unvectorized")
    assert tuned["passes"][1]["vaiml_config"]["optimize_level"] == 3
    assert xdna2.vitisai_config(Format.A8W8) is None
    config["target"] = "changed"  # each call returns a fresh dict
    assert xdna2.vitisai_config(Format.BF16)["target"] == "VAIML"
    with pytest.raises(TargetError, match="optimize_level"):
        xdna2.vitisai_config(Format.BF16, optimize_level=5)
    with pytest.raises(TargetError, match="bf16"):
        get_target("xdna1").vitisai_config(Format.BF16)


def test_cpu_target_has_no_provider_options():
    cpu = get_target("cpu")
    assert cpu.execution_provider == "CPUExecutionProvider"
    assert cpu.provider_options(SHA, Format.U8S8) == {}
    assert cpu.vitisai_config(Format.U8S8) is None
    assert not cpu.requires_static_shapes and not cpu.forbidden_ops


def test_provider_options_check_the_hash_and_the_format():
    with pytest.raises(ValueError, match="64 lowercase hex"):
        get_target("xdna2").provider_options("abc", Format.A8W8)
    with pytest.raises(TargetError):
        get_target("xdna1").provider_options(SHA, Format.BF16)


def test_targets_are_frozen_hashable_data():
    xdna2 = get_target("xdna2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        xdna2.name = "other"  # type: ignore[misc]
    assert len({xdna2, get_target("xdna1")}) == 2
    with pytest.raises(TypeError):
        xdna2.op_table[Format.A8W8] = frozenset()  # type: ignore[index]
    assert xdna2.forbidden_ops == {"Loop", "If", "Scan"} and get_target("xdna1").min_conv_layers == 2


def test_a_new_target_is_a_data_entry():
    custom = dataclasses.replace(get_target("xdna2"), name="xdna2-int8", formats=(Format.A8W8,),
                                 default_format=Format.A8W8)
    assert isinstance(custom, Target) and custom.provider_options(SHA, "a8w8")["target"] == "X2"
    with pytest.raises(ValueError, match="default format"):
        dataclasses.replace(custom, default_format=Format.BF16)
