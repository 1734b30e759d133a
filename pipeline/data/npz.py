"""Data kind `npz`: arrays in a .npz file, sample axis first, read without pickle, memory-mapped."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ..core.schema import StrictModel
from ..errors import DataError
from .base import Batch, DataKind, DataSource, OpenContext, register_data_kind
from .limits import npz_shape, read_npz_rows

__all__ = ["NpzData"]


class NpzData(StrictModel):
    """Arrays in a .npz file, sample axis first. `arrays` maps model input name -> array key."""

    kind: Literal["npz"]
    path: Path
    arrays: dict[str, str] = Field(default_factory=dict)
    labels: str | None = None


def _open(data: NpzData, ctx: OpenContext) -> DataSource:
    path, inputs, limit, section = ctx.resolve(data.path), ctx.inputs, ctx.limit, ctx.section
    if path.is_file() and not zipfile.is_zipfile(path):
        # Checked first: for a non-zip file np.load's own message suggests enabling pickle.
        raise DataError(f"{section}.data.path: {path} is not a .npz file (not a zip archive; write it with numpy.savez)")
    try:
        archive = np.load(path, allow_pickle=False, mmap_mode="r")
        keys = set(archive.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{section}.data.path: {path} is not a readable .npz file ({err})") from None
    batch_size = inputs[0].shape[0]
    arrays: dict[str, np.ndarray] = {}
    for spec in inputs:
        key = data.arrays.get(spec.name, spec.name)
        if key not in keys:
            raise DataError(
                f"{section}.data: {path} has no array '{key}' for input '{spec.name}' "
                f"(it has: {', '.join(sorted(keys)) or 'nothing'}); set data.arrays.{spec.name}"
            )
        arrays[spec.name] = _read_member(archive, key, path, section, max_rows=limit * batch_size)
        if arrays[spec.name].ndim == 0 or list(arrays[spec.name].shape[1:]) != spec.shape[1:]:
            raise DataError(
                f"{section}.data: {path}: array '{key}' has shape {npz_shape(path, key)}; "
                f"input '{spec.name}' needs [N, {', '.join(map(str, spec.shape[1:]))}] (sample axis first)"
            )
    unknown = sorted(set(data.arrays) - {s.name for s in inputs})
    if unknown:
        raise DataError(f"{section}.data.arrays: {', '.join(unknown)} are not model inputs")
    total = min(len(a) for a in arrays.values())
    labels = None
    if data.labels is not None:
        if data.labels not in keys:
            raise DataError(f"{section}.data.labels: {path} has no array '{data.labels}'")
        labels = np.asarray(_read_member(archive, data.labels, path, section, max_rows=limit * batch_size))
    count = min(limit, total // batch_size)
    if count == 0:
        raise DataError(f"{section}.data: {path} holds no samples (need at least {batch_size})")
    if labels is not None and (labels.ndim == 0 or len(labels) < count * batch_size):
        raise DataError(
            f"{section}.data.labels: {path}: array '{data.labels}' holds {labels.size if labels.ndim else 0} labels "
            f"for {count * batch_size} samples (one label per sample, sample axis first)"
        )

    def batches() -> Iterator[Batch]:
        for i in range(count):
            rows = slice(i * batch_size, (i + 1) * batch_size)
            yield {name: np.ascontiguousarray(a[rows]) for name, a in arrays.items()}

    if labels is not None:
        labels = labels[: count * batch_size]
    return DataSource(f"{path.name}", inputs, count, batches, labels)


def _read_member(archive, key: str, path: Path, section: str, *, max_rows: int) -> np.ndarray:
    """The first `max_rows` rows of array `key`: bounded by the member size limit, the rest never held."""
    return read_npz_rows(path, key, max_rows, f"{section}.data: {path}")


register_data_kind(DataKind("npz", NpzData, _open))
