"""What every data kind shares: the `DataSource` stages iterate, per-sample checks against the model's
inputs, and the registry of data kinds.

A data kind is a pydantic schema (its `kind` literal names it in a recipe) plus `open(data, ctx)` that
returns a `DataSource`, and optionally `fingerprint(data, ctx)` (what its cache key hashes; default: the
file's sha256). Adding one is one module calling `register_data_kind`, imported by `pipeline.data`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

__all__ = ["Batch", "DataSource", "OpenContext", "DataKind", "register_data_kind", "data_kinds", "check_batch"]

Batch = dict[str, np.ndarray]


@dataclass
class DataSource:
    """A dataset bound to the model's inputs: iterate it for batches, read `labels` if any."""

    description: str
    inputs: list
    count: int
    _batches: Callable[[], Iterator[Batch]]
    labels: np.ndarray | None = None

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
