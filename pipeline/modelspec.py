"""What a recipe declares about the model: where it comes from (`model:`) and its inputs (`inputs:`).

Part of the recipe schema (`pipeline.recipe` re-exports both); kept apart so the rules of inputs
(scalars, constants folded into the graph, inputs without a batch axis, recurrent states) read in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import Field, model_validator

from .core.schema import StrictModel as _Strict

__all__ = ["ModelSource", "InputSpec", "DType"]


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
    """One model input: its static shape and dtype, and where its values come from.

    By default from the data sets. `value:` makes it a constant (a number, or nested lists of the input's
    shape; a single number fills the shape), folded into the graph by prepare: no data needed, and the
    artifact no longer has that input. `from_output:` makes it a recurrent state: sample i gets the float
    model's output of that name from sample i-1 (`initial` for the first sample of each sequence; a
    sequence restarts every `reset_every` samples and where the data kind starts a new file).
    `shape: []` is a scalar (rank 0). `batch: false` says dim 0 is not a batch axis (in an npz, such an
    input's array must then carry the samples on an extra leading axis).
    """

    name: str
    shape: list[Annotated[int, Field(ge=1)]]
    dtype: DType = "float32"
    # Whether dim 0 is a batch axis. Default: yes for data inputs of rank >= 1, no for scalars, constants
    # and recurrent states.
    batch: bool | None = None
    value: Any = None
    from_output: str | None = None
    initial: float = 0.0
    reset_every: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _source(self) -> "InputSpec":
        if self.value is not None and self.from_output is not None:
            raise ValueError(f"input '{self.name}': give 'value' (a constant) or 'from_output' (a state), not both")
        if self.batch and not self.shape:
            raise ValueError(f"input '{self.name}': a scalar (shape: []) has no batch axis; remove 'batch: true'")
        if self.from_output is None and (self.initial != 0.0 or self.reset_every is not None):
            raise ValueError(f"input '{self.name}': 'initial' and 'reset_every' only apply with 'from_output'")
        if self.value is not None:
            self.constant_array()  # raises ValueError with the reason
        return self

    @property
    def is_constant(self) -> bool:
        return self.value is not None

    @property
    def is_state(self) -> bool:
        return self.from_output is not None

    @property
    def from_data(self) -> bool:
        return not (self.is_constant or self.is_state)

    @property
    def has_batch(self) -> bool:
        if self.batch is not None:
            return self.batch
        return bool(self.shape) and self.from_data

    def constant_array(self) -> np.ndarray:
        """`value` as an array of the declared shape and dtype (a single number fills the shape)."""
        try:
            array = np.asarray(self.value)
            if array.dtype.kind not in "biuf":
                raise ValueError("not a number")
            cast = array.astype(self.dtype)
        except (ValueError, TypeError, OverflowError) as err:
            raise ValueError(f"input '{self.name}': value must be a number or nested lists of numbers ({err})") from None
        if cast.dtype.kind == "f" and not np.isfinite(cast).all():
            raise ValueError(f"input '{self.name}': value holds NaN/inf")
        if np.dtype(self.dtype).kind in "iu" and not np.array_equal(cast, array):
            raise ValueError(f"input '{self.name}': value {self.value!r} is not a whole number for dtype {self.dtype}")
        if cast.ndim == 0:
            return np.full(self.shape, cast, dtype=self.dtype)
        if list(cast.shape) != list(self.shape):
            raise ValueError(f"input '{self.name}': value has shape {list(cast.shape)}, the input declares {self.shape}")
        return cast
