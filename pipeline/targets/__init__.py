"""Deployment targets as data: what each NPU (or the CPU) accepts, and how to open a session on it.

quantize, inspect and package read a `Target`; none of them branches on a target's name. Adding a
target means adding one entry to `TARGETS`. Facts come from AMD's public Ryzen AI documentation (the
project's NPU fact sheet) and the operator table `ryzenai_npu_ops.csv` (Ryzen AI 1.5 "Supported
Operators", one column per format), which ships inside this package. `placement` predicts which nodes
of a model a target runs (read by `pipeline.inspect`); `graph` is the ONNX graph index both use.

Decisions:
- The `cpu` target accepts u8s8 (its default: uint8 asymmetric activations, int8 per-channel weights),
  a8w8 and a16w8 (so an NPU-format model can be checked and run on a machine without the NPU: the CPU EP
  runs any QDQ graph). It does not accept bf16: that is an XDNA2 compile mode (the artifact is the float32
  model the EP converts), and the CPU EP has no bfloat16 Conv/MatMul kernels, so on the CPU it would just
  be the float model. Nor xint8: it only adds power-of-two scale rules that buy nothing on the CPU.
- Opset range 13..21 for all targets: 13 is the minimum for per-axis QDQ (and Cast to/from bfloat16);
  21 is the highest opset onnxruntime 1.20 (our minimum) runs, as AMD documents no upper bound. 17 is
  AMD's recommendation: an inspection warns, not fails, on another opset inside the range
  (onnxruntime's `quantize_static` moves a model to opset 21 when it uses 16-bit types).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType

from ..errors import RecipeError
from ..recipe import Format

__all__ = [
    "Target",
    "TargetError",
    "QuantSpec",
    "QUANT_SPECS",
    "TARGETS",
    "get_target",
    "npu_op_table",
]

_CSV = "ryzenai_npu_ops.csv"
_VITISAI = "VitisAIExecutionProvider"
_CPU_EP = "CPUExecutionProvider"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class TargetError(RecipeError, ValueError):
    """Unknown target, or a format the target does not take.

    A `RecipeError` (exit code 2, bad input) for the CLI, and a `ValueError` so that a pydantic validator
    calling `get_target` reports it with the recipe field's path.
    """


@dataclass(frozen=True)
class QuantSpec:
    """What a quantization format means in a QDQ graph; inspect checks a model against it.

    Dtype names are numpy's. `activations` and `weights` list the accepted storage types; `symmetric`
    requires zero point 0 (or 128 for uint8, Quark's legacy XINT8 form); `pow2_scales` requires every
    Q/DQ scale to be an exact power of two; `per_channel` says whether per-axis scales are known to be
    accepted by the compiler (if not, inspect warns). Bias is int32 in every format.
    """

    activations: frozenset[str]
    weights: frozenset[str]
    symmetric: bool
    pow2_scales: bool
    per_channel: bool


QUANT_SPECS: Mapping[Format, QuantSpec | None] = MappingProxyType(
    {
        # uint8 activations with zero point 128 = Quark's legacy XINT8 (QUInt8 + ActivationSymmetric).
        Format.XINT8: QuantSpec(frozenset({"int8", "uint8"}), frozenset({"int8"}), True, True, False),
        # A8W8/A16W8 per-channel acceptance by the X2 compiler is not documented: warn, do not fail.
        Format.A8W8: QuantSpec(frozenset({"int8"}), frozenset({"int8"}), True, False, False),
        Format.A16W8: QuantSpec(frozenset({"int16"}), frozenset({"int8"}), True, False, False),
        Format.U8S8: QuantSpec(frozenset({"uint8"}), frozenset({"int8"}), False, False, True),
        Format.BF16: None,  # no Q/DQ: bfloat16 casts, or an FP32 model the compiler converts
    }
)


def _read_csv() -> dict[Format, frozenset[str]]:
    text = resources.files(__name__).joinpath(_CSV).read_text(encoding="utf-8")
    rows = csv.reader(io.StringIO("".join(l for l in text.splitlines(True) if not l.startswith("#"))))
    header = next(rows)
    if header[0] != "op":
        raise RuntimeError(f"{_CSV}: first column must be 'op', got {header[0]!r}")  # a packaging bug
    columns = {Format(name): i for i, name in enumerate(header) if i > 0}
    table: dict[Format, set[str]] = {fmt: set() for fmt in columns}
    for row in rows:
        for fmt, i in columns.items():
            if row[i].strip() == "1":
                table[fmt].add(row[0].strip())
    return {fmt: frozenset(ops) for fmt, ops in table.items()}


_NPU_OPS = _read_csv()


def npu_op_table(fmt: Format) -> frozenset[str]:
    """ONNX op types the Ryzen AI NPU compiler covers in `fmt` (the CSV's column); empty if none."""
    return _NPU_OPS.get(Format(fmt), frozenset())


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
            known = ", ".join(f.value for f in Format)
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


def _npu_tables(*formats: Format) -> Mapping[Format, frozenset[str]]:
    return MappingProxyType({fmt: npu_op_table(fmt) for fmt in formats})


TARGETS: Mapping[str, Target] = MappingProxyType(
    {
        t.name: t
        for t in (
            Target(
                name="xdna1",
                description="Ryzen AI XDNA1 NPU: INT8 CNNs in Quark's XINT8 format (legacy X1 backend)",
                chips=("Phoenix", "Hawk Point"),
                formats=(Format.XINT8,),
                default_format=Format.XINT8,
                op_table=_npu_tables(Format.XINT8),
                min_conv_layers=2,
                ep_target="X1",
                # AMD docs, "Compiling INT8 models": PHX/HPT xclbins live in the installed runtime's
                # voe-4.0-win_amd64/xclbins/phoenix/ (1x4 = standard, 4x4 = benchmark, all 4 columns).
                xclbin="%RYZEN_AI_INSTALLATION_PATH%/voe-4.0-win_amd64/xclbins/phoenix/4x4.xclbin",
            ),
            Target(
                name="xdna2",
                description="Ryzen AI XDNA2 NPU: INT8 (XINT8, A8W8, A16W8) and BF16 models (X2 backend)",
                chips=("Strix", "Krackan"),
                formats=(Format.XINT8, Format.A8W8, Format.A16W8, Format.BF16),
                default_format=Format.A8W8,
                op_table=_npu_tables(Format.XINT8, Format.A8W8, Format.A16W8, Format.BF16),
                ep_target="X2",  # the X2 backend must not be given an xclbin
            ),
            Target(
                name="cpu",
                description="Any x86/ARM CPU through onnxruntime's CPU EP (no NPU); u8s8 per-channel by default",
                chips=("generic CPU",),
                formats=(Format.U8S8, Format.A8W8, Format.A16W8),
                default_format=Format.U8S8,
                op_table=MappingProxyType({Format.U8S8: None, Format.A8W8: None, Format.A16W8: None}),
                device="CPU",
                requires_static_shapes=False,
                batch_one=False,
                forbidden_ops=frozenset(),
                execution_provider=_CPU_EP,
            ),
        )
    }
)


def get_target(name: str | Target) -> Target:
    """The target called `name` (case-insensitive); raises TargetError listing the known ones."""
    if isinstance(name, Target):
        return name
    key = str(name).strip().lower()
    if key not in TARGETS:
        known = ", ".join(f"{t.name} ({', '.join(t.chips)})" for t in TARGETS.values())
        raise TargetError(f"unknown target {name!r}; known targets: {known}")
    return TARGETS[key]
