"""The recipe: one typed, validated object that every stage reads.

A recipe is a YAML file. Unknown keys are rejected, and every schema error is reported at once with its
field path, so a user fixes a recipe in one round. Relative paths in a recipe are resolved against the
folder that holds the recipe file, so a recipe runs the same from any working directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, field_validator, model_validator

from .core.formats import Format
from .core.schema import StrictModel as _Strict
from .core.limits import exceeded, limit
from .core.schema import coerced_values, non_finite_values
from .core.tasks import task_kinds
from .core.tasks.spec import Gate, OutputsSpec, gate_problems
from .core.yaml_io import load_yaml
from .data import data_kinds, dataset_schemas
from .errors import RecipeError
from .quant.guard import GuardConfig
from .modelspec import InputSpec, ModelSource
from .quant.ranges import range_methods
from .quant.transforms import transform_registry
from .targets import TARGETS, get_target

__all__ = [
    "Recipe",
    "ModelSource",
    "InputSpec",
    "Dataset",
    "Format",
    "CalibMethod",
    "TransformStep",
    "Gate",
    "ValidationSettings",
    "load_recipe",
    "recipe_from_dict",
]


def _known_method(name: str) -> str:
    if name not in range_methods():
        raise ValueError(f"unknown range method {name!r}; known: {', '.join(range_methods())}")
    return name


# A registered range method's name (`pipeline.quant.ranges`): minmax, percentile, entropy, mse, auto, ...
CalibMethod = Annotated[str, AfterValidator(_known_method)]


# The data kinds registered in `pipeline.data` (npz, text, images, ...), told apart by `kind`.
Dataset = Annotated[Union[dataset_schemas()], Field(discriminator="kind")]


class ExportSettings(_Strict):
    opset: Annotated[int, Field(ge=11, le=21)] = 17
    atol: Annotated[float, Field(gt=0)] = 1e-4


class CalibrationSettings(_Strict):
    data: Dataset
    samples: Annotated[int, Field(ge=1)] = 100
    method: CalibMethod = "minmax"
    percentile: Annotated[float, Field(gt=50, le=100)] = 99.999


class ValidationSettings(OutputsSpec):
    """The validation data, and per output its task (`OutputsSpec`: task, output, outputs,
    allow_dead_channels; README: Validation)."""

    data: Dataset
    samples: Annotated[int, Field(ge=1)] = 200


class FallbackSettings(_Strict):
    """Accuracy-aware fallback (`pipeline.fallback`): when a gate fails on a held-out split of the
    calibration data, move the most sensitive values to 16 bits (their MAC readers keep int8 copies), then
    MAC nodes to 16-bit activations (A16W8), then nodes to BF16, then to the CPU."""

    enabled: bool = False
    # Calibration samples after the first `calibration.samples` ones, used to check the gates.
    holdout: Annotated[int, Field(ge=2)] = 64
    # Shares given up against the all-int8 model: of MACs that may leave int8 (16-bit activations, BF16
    # or CPU), and of MACs and of nodes that may leave the NPU for the CPU.
    max_mac_share_off_int8: Annotated[float, Field(ge=0, le=1)] = 1.0
    max_mac_share_off_npu: Annotated[float, Field(ge=0, le=1)] = 0.0
    max_node_share_off_npu: Annotated[float, Field(ge=0, le=1)] = 0.0
    # Share of all MAC-op MACs that must stay int8 x int8 (activation and weight from 8-bit Q/DQ).
    min_mac_share_int8: Annotated[float, Field(ge=0, le=1)] = 0.0
    # The recipe gates the held-out search steers by (default: every gate it can measure). A metric too
    # noisy on a few hundred samples to steer by (nn_agreement) can be left to validation.
    gates: list[str] | None = None
    rungs: list[Literal["a16", "a16w8", "bf16", "cpu"]] = Field(
        default_factory=lambda: ["a16", "a16w8", "bf16", "cpu"])
    # Extra scorings on a rung that fails even in full (only to draw the accuracy-vs-share curve).
    curve_points: Annotated[int, Field(ge=0, le=16)] = 3
    # Range method of tensors promoted to 16 bits (outliers clipped by a percentile cost more than
    # the resolution minmax gives up at 16 bits).
    promoted_method: CalibMethod = "minmax"


def _transform_step(value: object) -> object:
    """`name` or `{name: {settings}}` -> `{name, settings}` (the schema below checks the rest)."""
    if isinstance(value, str):
        return {"name": value, "settings": {}}
    if isinstance(value, dict) and len(value) == 1 and "name" not in value:
        (name, settings), = value.items()
        return {"name": name, "settings": {} if settings is None else settings}
    return value


class TransformStep(_Strict):
    """One accuracy transform of `quantization.transforms`: a name registered in `pipeline.quant.transforms`
    and its settings (that transform's `Config`)."""

    name: str
    settings: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> "TransformStep":
        registry = transform_registry()
        if self.name not in registry:
            raise ValueError(f"unknown transform {self.name!r}; known: {', '.join(registry)}")
        try:
            registry[self.name].Config.model_validate(self.settings)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{self.name}: {where + ': ' if where else ''}{first['msg']}") from None
        return self


# Legacy spellings of transforms (still accepted; `quantization.transforms` lists them in order).
_LEGACY_TRANSFORMS = ("cross_layer_equalization", "smoothquant", "bias_correction")


class QuantizationSettings(_Strict):
    target: str = "xdna2"
    format: Format | None = None  # None: the target's default format
    exclude_nodes: list[str] = Field(default_factory=list)
    # Accuracy transforms, applied in this order (pipeline.quant.transforms); each measured in the report.
    transforms: list[Annotated[TransformStep, BeforeValidator(_transform_step)]] = Field(default_factory=list)
    # Legacy spellings: the same as transforms [cross_layer_equalization, {smoothquant: {alpha}}, bias_correction].
    smoothquant: Annotated[float, Field(ge=0, le=1)] | None = None
    cross_layer_equalization: bool = False
    bias_correction: bool = False
    # Calibration samples the transforms' per-channel statistics are taken from (at most).
    transform_samples: Annotated[int, Field(ge=1)] = 128
    # Every value some non-MAC op reads (residual sums, LayerNorm inputs/outputs, Softmax inputs) at 16
    # bits; MatMul/Gemm/Conv readers get int8 copies (a requantizing Q/DQ pair), so no int8 MAC is lost.
    free_16bit: bool = False
    # Int8 ranges of MAC inputs: the calibration method's, or the candidate that minimises the reading
    # layer's output error on `output_error_samples` calibration samples (pipeline.quant.output_ranges).
    mac_input_ranges: Literal["method", "output_error"] = "method"
    output_error_samples: Annotated[int, Field(ge=1)] = 8
    # Defaults by model family where the recipe is silent (pipeline.quant.presets): auto | cnn | transformer | none.
    preset: Literal["auto", "cnn", "transformer", "none"] = "auto"
    # Weight scales (pipeline.quant.weight_ranges): minmax | mse; unset: the preset's, else max |w|.
    weight_method: Literal["minmax", "mse"] | None = None
    fallback: FallbackSettings = FallbackSettings()
    # Tensors that mix ranges (a Concat of box coordinates and scores) kept at 16 bits or float (quant.guard).
    range_guard: GuardConfig = GuardConfig()

    # Checked at load time, so a typo fails before any stage runs.
    @field_validator("target")
    @classmethod
    def _known_target(cls, name: str) -> str:
        get_target(name)  # TargetError is a ValueError: reported with this field's path
        return name

    @field_validator("format")
    @classmethod
    def _format_accepted(cls, fmt: Format | None, info) -> Format | None:
        target = TARGETS.get(str(info.data.get("target", "")).strip().lower())
        if fmt is not None and target is not None and fmt not in target.formats:
            accepted = ", ".join(f.value for f in target.formats)
            raise ValueError(f"target '{target.name}' does not take '{fmt.value}' (it takes: {accepted})")
        return fmt

    @model_validator(mode="after")
    def _one_spelling(self) -> "QuantizationSettings":
        legacy = [k for k in _LEGACY_TRANSFORMS if getattr(self, k) not in (None, False)]
        if legacy and self.transforms:
            raise ValueError(f"give transforms either in 'transforms' or as {', '.join(legacy)}, not both")
        return self

    def transform_steps(self) -> list[TransformStep]:
        """The transforms to apply, in order, whichever spelling the recipe used."""
        if self.transforms:
            return list(self.transforms)
        steps = []
        if self.cross_layer_equalization:
            steps.append(TransformStep(name="cross_layer_equalization"))
        if self.smoothquant is not None:
            steps.append(TransformStep(name="smoothquant", settings={"alpha": self.smoothquant}))
        if self.bias_correction:
            steps.append(TransformStep(name="bias_correction"))
        return steps


def _gate_problems(recipe: "Recipe") -> list[str]:
    """Gates on metrics their output's task never measures: found at load, not after every stage ran."""
    data = recipe.validation.data
    has_labels = getattr(data, "labels") is not None if "labels" in type(data).model_fields else None
    return gate_problems(list(recipe.gates), recipe.validation, has_labels=has_labels)


class Recipe(_Strict):
    # A folder and file name on every filesystem (batch writes <name>.json next to temporary siblings).
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)]
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
        if not any(i.from_data for i in inputs):
            raise ValueError("every input is a constant (value) or a state (from_output); at least one must come from data")
        return inputs

    @model_validator(mode="after")
    def _one_split(self) -> "Recipe":
        """Both sections reading one source with `split` must split it the same way, or they may overlap."""
        source = {"kind", "path", "builder", "args"}  # what names the samples (not how they are preprocessed)
        cal, val = self.calibration.data.model_dump(include=source), self.validation.data.model_dump(include=source)
        cal_split, val_split = getattr(self.calibration.data, "split", None), getattr(self.validation.data, "split", None)
        if cal == val and cal_split != val_split:
            raise ValueError(
                "calibration.data and validation.data read the same source with different 'split' settings; "
                "give both the same split (e.g. split: {seed: 0, validation: 0.3}) so the two parts are disjoint"
            )
        return self

    def data_inputs(self) -> list[InputSpec]:
        """The inputs the data sets feed (neither constants nor recurrent states)."""
        return [i for i in self.inputs if i.from_data]

    def state_inputs(self) -> list[InputSpec]:
        return [i for i in self.inputs if i.is_state]

    def constant_inputs(self) -> list[InputSpec]:
        return [i for i in self.inputs if i.is_constant]

    def target_and_format(self):
        """The `Target` and the `Format` the recipe asks for (the target's default when none is given)."""
        target = get_target(self.quantization.target)
        fmt = Format(self.quantization.format or target.default_format)
        if fmt not in target.formats:  # the schema checks this; kept for recipes built with model_construct
            accepted = ", ".join(f.value for f in target.formats)
            raise RecipeError(
                f"quantization.format: target '{target.name}' does not take '{fmt.value}' (it takes: {accepted})"
            )
        return target, fmt

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


def _format_errors(source: str, err: ValidationError | None, extra: list[str] = ()) -> str:
    lines = []
    kinds, tasks = set(data_kinds()), set(task_kinds())
    for e in err.errors() if err is not None else ():
        # pydantic puts the data kind's tag after `data` in the path (calibration.data.npz.path), and the
        # task's after an output's name (validation.outputs.y.detection.nms_iou): drop them.
        parts = e["loc"]
        loc = ".".join(str(p) for i, p in enumerate(parts)
                       if not (i and parts[i - 1] == "data" and p in kinds)
                       and not (i > 1 and parts[i - 2] == "outputs" and p in tasks))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (remove it, or check its spelling against the README's recipe reference)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "value_error":
            msg = str(e["ctx"]["error"])  # our own message, without pydantic's "Value error, " prefix
        elif e["type"] in ("enum", "literal_error"):
            msg = f"{msg}; got {e['input']!r}"
        elif e["type"] == "finite_number":
            msg = f"{e['input']} is not a finite number (a recipe takes no NaN or infinity)"
        elif e["type"] in ("union_tag_not_found", "union_tag_invalid"):  # a data kind's `kind`, an output's `task`
            key = e["ctx"]["discriminator"].strip("'")
            known = ", ".join(task_kinds()) if key == "task" else ", ".join(data_kinds())
            got = f"unknown {key} {e['ctx']['tag']!r}" if e["type"] == "union_tag_invalid" else f"'{key}' is missing"
            msg = f"{got}; give one of: {known}"
        lines.append(f"  {loc or '<top>'}: {msg}")
    lines += [f"  {line}" for line in extra if f"  {line}" not in lines]
    n = len(lines)
    if n == 1:  # one problem, one line
        return f"{source}: {lines[0].strip()}"
    return f"{source}: {n} errors in recipe:\n" + "\n".join(lines)


def recipe_from_dict(data: object, *, source: str = "<recipe>", base_dir: Path = Path(".")) -> Recipe:
    """Validate plain data as a recipe: the schema, then what lax validation lets through (NaN and
    infinity, booleans and quoted numbers taken for numbers) and gates the task cannot measure."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping (key: value), got {type(data).__name__}")
    if "base_dir" in data:
        raise RecipeError(f"{source}: base_dir: unknown key (remove it)")
    problems = non_finite_values(data)
    try:
        recipe = Recipe.model_validate({**data, "base_dir": base_dir})
    except ValidationError as err:
        raise RecipeError(_format_errors(source, err, problems)) from None
    problems += coerced_values(data, recipe) + _gate_problems(recipe)
    if problems:
        raise RecipeError(_format_errors(source, None, problems))
    return recipe


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate a recipe file; raises `RecipeError` listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found (list the shipped ones with 'npu-pipeline recipes')")
    size = path.stat().st_size
    if size > limit("recipe_bytes"):  # before reading it: a recipe is kilobytes
        raise RecipeError(exceeded("recipe_bytes", str(path), size))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: not readable UTF-8 text ({err})") from None
    data = load_yaml(text, source=str(path), error=RecipeError)
    return recipe_from_dict(data, source=str(path), base_dir=path.resolve().parent)
