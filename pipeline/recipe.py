"""The recipe: one typed, validated object that every stage reads.

A recipe is a YAML file. Unknown keys are rejected, and every schema error is reported at once with its
field path, so a user fixes a recipe in one round. Relative paths in a recipe are resolved against the
folder that holds the recipe file, so a recipe runs the same from any working directory.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError

__all__ = [
    "Recipe",
    "ModelSource",
    "InputSpec",
    "Dataset",
    "Format",
    "CalibMethod",
    "Gate",
    "load_recipe",
    "recipe_from_dict",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Format(str, Enum):
    """Quantization formats. XINT8/A8W8/A16W8/BF16 are the NPU's; U8S8 is the generic CPU format."""

    XINT8 = "xint8"
    A8W8 = "a8w8"
    A16W8 = "a16w8"
    BF16 = "bf16"
    U8S8 = "u8s8"


class CalibMethod(str, Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"
    AUTO = "auto"


class ModelSource(_Strict):
    """Exactly one of `builder` (trusted Python code `module:function`) or `onnx` (a file)."""

    builder: str | None = None
    onnx: Path | None = None
    # Extra keyword arguments for the builder (e.g. a weights file path).
    args: dict[str, Union[str, int, float, bool]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSource":
        if (self.builder is None) == (self.onnx is None):
            raise ValueError("give exactly one of 'builder' (module:function) or 'onnx' (path to a .onnx file)")
        if self.builder is not None and (":" not in self.builder or self.builder.count(":") != 1):
            raise ValueError(f"builder {self.builder!r} must look like 'package.module:function'")
        if self.onnx is not None and self.args:
            raise ValueError("'args' only applies to a builder")
        return self


DType = Literal["float32", "float16", "int64", "int32", "int8", "uint8", "bool"]


class InputSpec(_Strict):
    name: str
    shape: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    dtype: DType = "float32"


class NpzData(_Strict):
    """Arrays in a .npz file, sample axis first. `arrays` maps model input name -> array key."""

    kind: Literal["npz"]
    path: Path
    arrays: dict[str, str] = Field(default_factory=dict)
    labels: str | None = None


class TextData(_Strict):
    """One sentence per line, tokenized with a HuggingFace `tokenizer.json`.

    `tokenizer` is a file path, or `pkg:<package>/<path inside the package>`.
    """

    kind: Literal["text"]
    path: Path
    tokenizer: str
    # Which model input receives which tokenizer field.
    fields: dict[str, Literal["input_ids", "attention_mask", "token_type_ids"]] = Field(
        default_factory=lambda: {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    )


class ImageData(_Strict):
    """A folder of PNG/JPEG images with the preprocessing the model expects."""

    kind: Literal["images"]
    path: Path
    input: str | None = None
    size: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = None  # (height, width)
    layout: Literal["nchw", "nhwc"] = "nchw"
    channels: Literal["rgb", "bgr", "gray"] = "rgb"
    scale: float = 1.0 / 255.0
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    labels: Path | None = None  # optional CSV "filename,label"


class BuilderData(_Strict):
    """Samples made by trusted Python code, like `model.builder`: `builder(**args)` returns an iterable
    of `{input name: ndarray of the input's declared shape}` (sized, or counted by one pass), or a
    pair (samples, labels). See `pipeline.data`."""

    kind: Literal["builder"]
    builder: str
    args: dict[str, Union[str, int, float, bool]] = Field(default_factory=dict)

    @field_validator("builder")
    @classmethod
    def _entry_point(cls, value: str) -> str:
        if value.count(":") != 1 or not all(value.partition(":")[::2]):
            raise ValueError(f"builder {value!r} must look like 'package.module:function'")
        return value


Dataset = Annotated[Union[NpzData, TextData, ImageData, BuilderData], Field(discriminator="kind")]


class ExportSettings(_Strict):
    opset: Annotated[int, Field(ge=11, le=21)] = 17
    atol: Annotated[float, Field(gt=0)] = 1e-4


class CalibrationSettings(_Strict):
    data: Dataset
    samples: Annotated[int, Field(ge=1)] = 100
    method: CalibMethod = CalibMethod.MINMAX
    percentile: Annotated[float, Field(gt=50, le=100)] = 99.999


class ValidationSettings(_Strict):
    data: Dataset
    samples: Annotated[int, Field(ge=1)] = 200
    task: Literal["classification", "embedding", "regression"] = "classification"
    # Which model output the task metrics read (default: the first output).
    output: str | None = None


class FallbackSettings(_Strict):
    """Accuracy-aware fallback (`pipeline.fallback`): when a gate fails on a held-out split of the
    calibration data, move the most sensitive layers to 16-bit activations, then BF16, then the CPU."""

    enabled: bool = False
    # Calibration samples after the first `calibration.samples` ones, used to check the gates.
    holdout: Annotated[int, Field(ge=2)] = 64
    # Shares given up against the all-int8 model: of MACs that may leave int8 (16-bit activations, BF16
    # or CPU), and of MACs and of nodes that may leave the NPU for the CPU.
    max_mac_share_off_int8: Annotated[float, Field(ge=0, le=1)] = 1.0
    max_mac_share_off_npu: Annotated[float, Field(ge=0, le=1)] = 0.0
    max_node_share_off_npu: Annotated[float, Field(ge=0, le=1)] = 0.0
    rungs: list[Literal["a16", "bf16", "cpu"]] = Field(default_factory=lambda: ["a16", "bf16", "cpu"])
    # Extra scorings on a rung that fails even in full (only to draw the accuracy-vs-share curve).
    curve_points: Annotated[int, Field(ge=0, le=16)] = 3
    # Range method of tensors promoted to 16 bits (outliers clipped by a percentile cost more than
    # the resolution minmax gives up at 16 bits).
    promoted_method: CalibMethod = CalibMethod.MINMAX


class QuantizationSettings(_Strict):
    target: str = "xdna2"
    format: Format | None = None  # None: the target's default format
    exclude_nodes: list[str] = Field(default_factory=list)
    # Accuracy transforms (each optional, each measured in the report; see pipeline.transforms).
    smoothquant: Annotated[float, Field(ge=0, le=1)] | None = None
    cross_layer_equalization: bool = False
    bias_correction: bool = False
    # Calibration samples the transforms' per-channel statistics are taken from (at most).
    transform_samples: Annotated[int, Field(ge=1)] = 128
    fallback: FallbackSettings = FallbackSettings()

    # Checked at load time, so a typo fails before any stage runs (targets imports this module: lazy import).
    @field_validator("target")
    @classmethod
    def _known_target(cls, name: str) -> str:
        from .targets import get_target

        get_target(name)  # TargetError is a ValueError: reported with this field's path
        return name

    @field_validator("format")
    @classmethod
    def _format_accepted(cls, fmt: Format | None, info) -> Format | None:
        from .targets import TARGETS

        target = TARGETS.get(str(info.data.get("target", "")).strip().lower())
        if fmt is not None and target is not None and fmt not in target.formats:
            accepted = ", ".join(f.value for f in target.formats)
            raise ValueError(f"target '{target.name}' does not take '{fmt.value}' (it takes: {accepted})")
        return fmt


Metric = Literal[
    "accuracy",
    "accuracy_drop",
    "top1_agreement",
    "cosine_mean",
    "cosine_min",
    "nn_agreement",
    "sqnr_db",
    "max_abs_error",
]


class Gate(_Strict):
    """A threshold on one validation metric: `min` and/or `max`. `accuracy_drop` is in points (pt)."""

    metric: Metric
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _has_bound(self) -> "Gate":
        if self.min is None and self.max is None:
            raise ValueError(f"gate on {self.metric!r} needs 'min' or 'max'")
        return self


class Recipe(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    description: str = ""
    model: ModelSource
    inputs: list[InputSpec] = Field(min_length=1)
    export: ExportSettings = ExportSettings()
    calibration: CalibrationSettings
    validation: ValidationSettings
    quantization: QuantizationSettings = QuantizationSettings()
    gates: list[Gate] = Field(default_factory=list)
    output: Path | None = None
    # Folder the recipe file lives in; relative paths resolve against it. Set by the loader.
    base_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("inputs")
    @classmethod
    def _unique_inputs(cls, inputs: list[InputSpec]) -> list[InputSpec]:
        names = [i.name for i in inputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"input names must be unique; repeated: {', '.join(dupes)}")
        return inputs

    def resolve(self, path: Path) -> Path:
        """A recipe path made absolute against the recipe's folder."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def output_dir(self, override: Path | None = None) -> Path:
        if override is not None:
            return Path(override).resolve()
        if self.output is not None:
            return self.resolve(self.output)
        return (Path.cwd() / "build" / self.name).resolve()

    def section_json(self, *sections: str) -> str:
        """Canonical JSON of some recipe sections: part of a stage's cache key and of the manifest."""
        data = self.model_dump(mode="json", include=set(sections))
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.section_json(*self.model_fields_set).encode()).hexdigest()


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        # pydantic puts the data kind's tag after `data` in the path (calibration.data.npz.path): drop it.
        parts = e["loc"]
        loc = ".".join(
            str(p) for i, p in enumerate(parts)
            if not (i and parts[i - 1] == "data" and p in {"npz", "text", "images", "builder"})
        )
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (remove it, or check its spelling against the README's recipe reference)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "value_error":
            msg = str(e["ctx"]["error"])  # our own message, without pydantic's "Value error, " prefix
        elif e["type"] in ("enum", "literal_error"):
            msg = f"{msg}; got {e['input']!r}"
        lines.append(f"  {loc or '<top>'}: {msg}")
    n = len(lines)
    if n == 1:  # one problem, one line
        return f"{source}: {lines[0].strip()}"
    return f"{source}: {n} errors in recipe:\n" + "\n".join(lines)


def recipe_from_dict(data: object, *, source: str = "<recipe>", base_dir: Path = Path(".")) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping (key: value), got {type(data).__name__}")
    try:
        return Recipe.model_validate({**data, "base_dir": base_dir})
    except ValidationError as err:
        raise RecipeError(_format_errors(source, err)) from None


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate a recipe file; raises `RecipeError` listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found (list the shipped ones with 'npu-pipeline recipes')")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)  # where the parser gave up: the line to look at
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML: {where}{problem}") from None
    if "base_dir" in (data or {}) if isinstance(data, dict) else False:
        raise RecipeError(f"{path}: base_dir: unknown key (remove it)")
    return recipe_from_dict(data, source=str(path), base_dir=path.resolve().parent)
