"""A deployment target as data: what its device accepts, and how to open a session on it.

quantize, inspect and package read a `Target`; none of them branches on a target's name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..core.formats import Format
from ..errors import RecipeError

__all__ = ["Target", "TargetError", "VITISAI_EP", "CPU_EP"]

VITISAI_EP = "VitisAIExecutionProvider"
CPU_EP = "CPUExecutionProvider"
_VITISAI = VITISAI_EP
_CPU_EP = CPU_EP
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class TargetError(RecipeError, ValueError):
    """Unknown target, or a format the target does not take.

    A `RecipeError` (exit code 2, bad input) for the CLI, and a `ValueError` so that a pydantic validator
    calling `get_target` reports it with the recipe field's path.
    """


@dataclass(frozen=True)
class Target:
    """Everything a stage needs to know about where a model will run.

    `op_table[fmt]` is the set of ONNX op types that run on `device` in that format; None means every op
    (the CPU EP runs them all). `forbidden_ops` and dynamic shapes (when `requires_static_shapes`) are hard
    errors; `batch_one` makes a static batch > 1 on a CNN's input a hard error. `min_conv_layers`: the
    runtime config sends models with fewer Conv layers to the CPU (legacy X1 "minimum_num_of_conv": 2).
    `ep_target`/`xclbin` are the VitisAI EP's `target` and `xclbin` options (None: not set).
    """

    name: str
    description: str
    chips: tuple[str, ...]
    formats: tuple[Format, ...]
    default_format: Format
    op_table: Mapping[Format, frozenset[str] | None] = field(hash=False)
    device: str = "NPU"
    opset_min: int = 13
    opset_max: int = 21
    opset_recommended: int = 17
    requires_static_shapes: bool = True
    batch_one: bool = True
    forbidden_ops: frozenset[str] = frozenset({"Loop", "If", "Scan"})
    min_conv_layers: int = 0
    execution_provider: str = _VITISAI
    ep_target: str | None = None
    xclbin: str | None = None

    def __post_init__(self) -> None:
        # Guards against a bad data entry; not reachable from user input.
        if self.default_format not in self.formats:
            raise ValueError(f"target {self.name}: default format {self.default_format} not in its formats")
        missing = [f.value for f in self.formats if f not in self.op_table]
        if missing:
            raise ValueError(f"target {self.name}: no operator table for {', '.join(missing)}")
        if not self.opset_min <= self.opset_recommended <= self.opset_max:
            raise ValueError(f"target {self.name}: opset range {self.opset_min}..{self.opset_max} is inconsistent")

    def resolve_format(self, fmt: Format | str | None) -> Format:
        """`fmt` as a Format (the target's default when None); raises TargetError if the target lacks it."""
        if fmt is None:
            return self.default_format
        try:
            fmt = Format(fmt)
        except ValueError:
            from ..core.formats import all_formats

            known = ", ".join(f.value for f in all_formats())
            raise TargetError(f"unknown format {fmt!r}; known formats: {known}") from None
        if fmt not in self.formats:
            accepted = ", ".join(f.value for f in self.formats)
            raise TargetError(
                f"target {self.name} ({', '.join(self.chips)}) does not take format {fmt.value}; "
                f"it takes: {accepted} (default {self.default_format.value})"
            )
        return fmt

    def runs(self, op_type: str, fmt: Format) -> bool:
        """Whether `op_type` (default ONNX domain) runs on this target's device in format `fmt`."""
        ops = self.op_table.get(fmt, frozenset())
        return ops is None or op_type in ops

    def vitisai_config(
        self, fmt: Format | str, *, optimize_level: int = 1, preferred_data_storage: str = "auto"
    ) -> dict | None:
        """Content of `vitisai_config.json` (the VitisAI EP's BF16 compile options); None unless BF16.

        Layout of Ryzen AI 1.8's default BF16 config; `enable_f32_to_bf16_conversion` lets an FP32 model
        (not only a Quark BF16 one) compile. `optimize_level` 1-3; `preferred_data_storage`
        auto | vectorized (CNNs) | unvectorized (transformers).
        """
        fmt = self.resolve_format(fmt)
        if fmt is not Format.BF16 or self.execution_provider != _VITISAI:
            return None
        if optimize_level not in (1, 2, 3):
            raise TargetError(f"vitisai_config: optimize_level must be 1, 2 or 3, got {optimize_level!r}")
        if preferred_data_storage not in ("auto", "vectorized", "unvectorized"):
            raise TargetError(
                "vitisai_config: preferred_data_storage must be auto, vectorized or unvectorized, "
                f"got {preferred_data_storage!r}"
            )
        return {
                "passes": [
                    {"name": "init", "plugin": "vaip-pass_init"},
                    {
                        "name": "vaiml_partition",
                        "plugin": "vaip-pass_vaiml_partition",
                        "vaiml_config": {
                            "optimize_level": optimize_level,
                            "preferred_data_storage": preferred_data_storage,
                            "enable_f32_to_bf16_conversion": True,
                        },
                    },
                ],
                "target": "VAIML",
                "targets": [{"name": "VAIML", "pass": ["init", "vaiml_partition"]}],
        }

    def provider_options(
        self,
        model_sha256: str,
        fmt: Format | str,
        *,
        cache_dir: str = "vitisai_cache",
        config_file: str = "vitisai_config.json",
    ) -> dict[str, str]:
        """The `provider_options` dict for `execution_provider` (all values strings, as onnxruntime wants).

        VitisAI: `target` (X1/X2), `xclbin` where the target needs one (XDNA1 INT8; left with its
        %RYZEN_AI_INSTALLATION_PATH% placeholder, which the runner expands on the deployment machine),
        `cache_dir`, and `cache_key` = target-format-first 16 hex digits of the model's SHA-256 (a new
        model never picks up a stale compiled cache). BF16 adds `config_file`, whose content is
        `vitisai_config(fmt)`; the packager writes it next to the model. CPU: no options.
        """
        fmt = self.resolve_format(fmt)
        if not _SHA256.match(model_sha256):
            raise ValueError(f"model_sha256 must be 64 lowercase hex digits, got {model_sha256!r}")
        if self.execution_provider != _VITISAI:
            return {}
        options: dict[str, str] = {}
        if self.ep_target is not None:
            options["target"] = self.ep_target
        if self.xclbin is not None and fmt is not Format.BF16:
            options["xclbin"] = self.xclbin
        options["cache_dir"] = cache_dir
        options["cache_key"] = f"{self.name}-{fmt.value}-{model_sha256[:16]}"
        if self.vitisai_config(fmt) is not None:
            options["config_file"] = config_file
        return options
