"""Data kind `npz`: arrays in a .npz file, read without pickle, only the rows a recipe uses held in memory
(`pipeline.data.limits`).

One rule says where the samples are, per array, from its rank against the input's declared shape:
- one more dimension than the input: the samples come first, each `array[i]` is one sample of exactly the
  input's shape (`[N, 2, 1, 128]` for a state `[2, 1, 128]`, `[N]` for a scalar, `[N, 1, 3, 224, 224]`);
- the same rank: dim 0 is the input's batch axis and the samples are stacked along it (`[N, 3, 224, 224]`
  for `[1, 3, 224, 224]`; a batch of B takes B rows per sample). Not allowed for an input without a batch
  axis (`batch: false`, scalars), whose dim 0 means something else.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ..core.schema import StrictModel
from ..errors import DataError
from .base import Batch, DataKind, DataSource, OpenContext, SplitSettings, register_data_kind, split_part
from .limits import npz_shape, read_npz_rows

__all__ = ["NpzData", "samples_view"]


class NpzData(StrictModel):
    """Arrays in a .npz file (see the module docstring for the sample axis). `arrays` maps model input
    name -> array key; `labels` names an integer label array (one label per model output row)."""

    kind: Literal["npz"]
    path: Path
    arrays: dict[str, str] = Field(default_factory=dict)
    labels: str | None = None
    split: SplitSettings | None = None


def _rule(shape: list[int], spec) -> str | None:
    """Which rule places the samples of an array of `shape` for input `spec`: 'first', 'stacked' or None."""
    want = list(spec.shape)
    if len(shape) == len(want) + 1 and shape[1:] == want:
        return "first"
    if getattr(spec, "has_batch", bool(want)) and want and len(shape) == len(want) and shape[1:] == want[1:]:
        return "stacked"
    return None


def _shape_error(shape: list[int], spec, where: str) -> DataError:
    want = list(spec.shape)
    batched = getattr(spec, "has_batch", bool(want)) and want
    stacked = f" or [N*{want[0]}, {', '.join(map(str, want[1:]))}] (samples stacked on the batch axis)" if batched else ""
    return DataError(f"{where} has shape {shape}; input '{spec.name}' {want} needs "
                     f"[N{''.join(', ' + str(d) for d in want)}] (samples first){stacked}")


def samples_view(array: np.ndarray, spec, *, where: str, shape: list[int] | None = None) -> tuple[int, callable]:
    """(number of samples, function index -> that sample) for one input, by the module's rule. `shape` is
    the whole array's (for messages) when `array` holds only its first rows."""
    rule = _rule(list(array.shape), spec)
    if rule == "first":
        return array.shape[0], lambda i: np.array(array[i], copy=True)  # a copy keeps rank 0 (ascontiguousarray does not)
    if rule == "stacked":
        rows = spec.shape[0]
        return array.shape[0] // rows, lambda i: np.array(array[i * rows : (i + 1) * rows], copy=True)
    raise _shape_error(shape or list(array.shape), spec, where)


def _header_shape(path: Path, key: str, where: str) -> list[int]:
    try:
        return npz_shape(path, key)
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as err:
        raise DataError(f"{where}: array '{key}' is damaged ({err}); rewrite the file") from None


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
    unknown = sorted(set(data.arrays) - {s.name for s in inputs})
    if unknown:
        raise DataError(f"{section}.data.arrays: {', '.join(unknown)} are not inputs fed by data")
    shapes = {}
    for spec in inputs:
        key = data.arrays.get(spec.name, spec.name)
        if key not in keys:
            raise DataError(
                f"{section}.data: {path} has no array '{key}' for input '{spec.name}' "
                f"(it has: {', '.join(sorted(keys)) or 'nothing'}); set data.arrays.{spec.name}"
            )
        _read_member(key, path, section, max_rows=1)  # an unreadable array (pickle, damage, size) says so first
        shapes[spec.name] = (key, _header_shape(path, key, f"{section}.data: {path}"))
        if _rule(shapes[spec.name][1], spec) is None:
            raise _shape_error(shapes[spec.name][1], spec, f"{section}.data: {path}: array '{key}'")
    views = {}
    for spec in inputs:
        key, shape = shapes[spec.name]
        per_sample = spec.shape[0] if _rule(shape, spec) == "stacked" else 1
        # Only the rows the recipe uses are read; a split draws from the whole array.
        needed = shape[0] if data.split is not None else limit * per_sample
        views[spec.name] = samples_view(_read_member(key, path, section, max_rows=needed), spec,
                                        where=f"{section}.data: {path}: array '{key}'", shape=shape)
    total = min(n for n, _ in views.values())
    # Labels are per model output row: a batch of B rows per sample takes B labels.
    rows = next((s.shape[0] for s in inputs if s.has_batch), 1)
    chosen = split_part(total, data.split, section)[:limit]
    if not chosen:
        need = f"at least {rows} rows" if rows > 1 else "at least one sample"
        raise DataError(f"{section}.data: {path} holds no samples (need {need})")
    labels = None
    if data.labels is not None:
        if data.labels not in keys:
            raise DataError(f"{section}.data.labels: {path} has no array '{data.labels}'")
        table = np.asarray(_read_member(data.labels, path, section, max_rows=(chosen[-1] + 1) * rows))
        if table.ndim == 0 or len(table) < (chosen[-1] + 1) * rows:
            raise DataError(
                f"{section}.data.labels: {path}: array '{data.labels}' holds {table.size if table.ndim else 0} labels "
                f"for {(chosen[-1] + 1) * rows} samples (one label per sample, sample axis first)"
            )
        labels = np.concatenate([table[i * rows : (i + 1) * rows] for i in chosen])

    def batches() -> Iterator[Batch]:
        for i in chosen:
            yield {name: take(i) for name, (_, take) in views.items()}

    return DataSource(f"{path.name}", inputs, len(chosen), batches, labels)


def _read_member(key: str, path: Path, section: str, *, max_rows: int) -> np.ndarray:
    """The first `max_rows` rows of array `key`: bounded by the member size limit, the rest never held."""
    return read_npz_rows(path, key, max_rows, f"{section}.data: {path}")


register_data_kind(DataKind("npz", NpzData, _open))
