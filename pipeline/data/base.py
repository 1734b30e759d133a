"""What every data kind shares: the `DataSource` stages iterate, per-sample checks against the model's
inputs, and the registry of data kinds.

A data kind is a pydantic schema (its `kind` literal names it in a recipe) plus `open(data, ctx)` that
returns a `DataSource`, and optionally `fingerprint(data, ctx)` (what its cache key hashes; default: the
file's sha256). Adding one is one module calling `register_data_kind`, imported by `pipeline.data`.

`split` (`SplitSettings`, a field of every builtin kind) cuts one source into a calibration part and a
validation part: a seeded permutation of its units (files for images and audio, lines for text, samples
for npz and builders) puts `round(validation * n)` of them in the validation part and the rest in the
calibration part; each part keeps the source's order. Both sections name the same source and the same
split, so the parts are disjoint and every run draws the same ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field

from ..core.schema import StrictModel

from ..errors import DataError

__all__ = [
    "Batch", "DataSource", "OpenContext", "DataKind", "register_data_kind", "data_kinds", "check_batch",
    "SplitSettings", "split_part",
]

Batch = dict[str, np.ndarray]


@dataclass
class DataSource:
    """A dataset bound to the model's inputs: iterate it for batches, read `labels` if any."""

    description: str
    inputs: list
    count: int
    _batches: Callable[[], Iterator[Batch]]
    labels: np.ndarray | None = None
    # Sample indices where a new sequence begins (e.g. each audio file's first window): recurrent states
    # restart there. Sample 0 always starts one.
    starts: frozenset[int] = frozenset()

    def __iter__(self) -> Iterator[Batch]:
        for index, batch in enumerate(self._batches()):
            check_batch(batch, self.inputs, where=f"{self.description}, sample {index}")
            yield batch

    def __len__(self) -> int:
        return self.count


def check_batch(batch: Batch, inputs, *, where: str) -> None:
    for spec in inputs:
        array = batch.get(spec.name)
        if array is None:
            raise DataError(f"{where}: no data for model input '{spec.name}' (map it in the recipe's data.arrays)")
        if list(array.shape) != spec.shape:
            raise DataError(
                f"{where}: input '{spec.name}' has shape {list(array.shape)}, the recipe declares {spec.shape}"
                " (fix the data or inputs[].shape)"
            )
        if array.dtype != np.dtype(spec.dtype):
            raise DataError(
                f"{where}: input '{spec.name}' has dtype {array.dtype}, the recipe declares {spec.dtype}"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise DataError(f"{where}: input '{spec.name}' holds {bad} NaN/inf values; clean the data set")


class SplitSettings(StrictModel):
    """A seeded split of one source into calibration and validation parts (see the module docstring)."""

    seed: int = 0
    validation: Annotated[float, Field(gt=0, lt=1)] = 0.3


def split_part(n: int, split: SplitSettings | None, section: str, *, unit: str = "sample") -> list[int]:
    """The indices (ascending) of the `n` units that `section` reads; all of them without a split."""
    if split is None:
        return list(range(n))
    n_val = int(round(split.validation * n))
    if n_val == 0 or n_val == n:
        raise DataError(
            f"{section}.data.split: {n} {unit}(s) cannot be split {1 - split.validation:.0%}/{split.validation:.0%}: "
            "one part would be empty (add data, or change split.validation)"
        )
    order = np.random.default_rng(split.seed).permutation(n)
    part = order[:n_val] if section == "validation" else order[n_val:]
    return sorted(int(i) for i in part)


@dataclass(frozen=True)
class OpenContext:
    """What a data kind needs from the recipe: the model inputs (name, shape, dtype), the recipe section
    ("calibration" / "validation") for messages, how many samples, and how recipe paths resolve."""

    inputs: list
    section: str
    limit: int
    resolve: Callable[[Path], Path]


@dataclass(frozen=True)
class DataKind:
    name: str
    schema: type
    open: Callable[[object, OpenContext], DataSource]
    fingerprint: Callable[[object, OpenContext], dict] | None = None


_KINDS: dict[str, DataKind] = {}


def register_data_kind(kind: DataKind) -> DataKind:
    if kind.name in _KINDS:
        raise ValueError(f"data kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def data_kinds() -> dict[str, DataKind]:
    return dict(_KINDS)
