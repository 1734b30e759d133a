"""Data kind `npz`: arrays in a .npz file, read without pickle, memory-mapped.

One rule says where the samples are, per array, from its rank against the input's declared shape:
- one more dimension than the input: the samples come first, each `array[i]` is one sample of exactly the
  input's shape (`[N, 2, 1, 128]` for a state `[2, 1, 128]`, `[N]` for a scalar, `[N, 1, 3, 224, 224]`);
- the same rank: dim 0 is the input's batch axis and the samples are stacked along it (`[N, 3, 224, 224]`
  for `[1, 3, 224, 224]`; a batch of B takes B rows per sample). Not allowed for an input without a batch
  axis (`batch: false`, scalars), whose dim 0 means something else.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ..core.schema import StrictModel
from ..errors import DataError
from .base import Batch, DataKind, DataSource, OpenContext, SplitSettings, register_data_kind, split_part

__all__ = ["NpzData", "samples_view"]


class NpzData(StrictModel):
    """Arrays in a .npz file (see the module docstring for the sample axis). `arrays` maps model input
    name -> array key; `labels` names an integer label array (one label per model output row)."""

    kind: Literal["npz"]
    path: Path
    arrays: dict[str, str] = Field(default_factory=dict)
    labels: str | None = None
    split: SplitSettings | None = None


def samples_view(array: np.ndarray, spec, *, where: str) -> tuple[int, callable]:
    """(number of samples, function index -> that sample) for one input, by the module's rule."""
    shape = list(spec.shape)
    if array.ndim == len(shape) + 1 and list(array.shape[1:]) == shape:
        return array.shape[0], lambda i: np.array(array[i], copy=True)  # a copy keeps rank 0 (ascontiguousarray does not)
    batched = getattr(spec, "has_batch", bool(shape))
    if batched and shape and array.ndim == len(shape) and list(array.shape[1:]) == shape[1:]:
        rows = shape[0]
        return array.shape[0] // rows, lambda i: np.array(array[i * rows : (i + 1) * rows], copy=True)
    stacked = f" or [N*{shape[0]}, {', '.join(map(str, shape[1:]))}] (samples stacked on the batch axis)" if batched and shape else ""
    raise DataError(
        f"{where} has shape {list(array.shape)}; input '{spec.name}' {shape} needs "
        f"[N{''.join(', ' + str(d) for d in shape)}] (samples first){stacked}"
    )


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
    views = {}
    for spec in inputs:
        key = data.arrays.get(spec.name, spec.name)
        if key not in keys:
            raise DataError(
                f"{section}.data: {path} has no array '{key}' for input '{spec.name}' "
                f"(it has: {', '.join(sorted(keys)) or 'nothing'}); set data.arrays.{spec.name}"
            )
        views[spec.name] = samples_view(_read_member(archive, key, path, section), spec,
                                        where=f"{section}.data: {path}: array '{key}'")
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
        table = np.asarray(_read_member(archive, data.labels, path, section))
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


def _read_member(archive, key: str, path: Path, section: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as err:  # object arrays need pickle: refused
        raise DataError(f"{section}.data: {path}: array '{key}' cannot be read without pickle ({err})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:  # a damaged member (bad CRC, cut short)
        raise DataError(f"{section}.data: {path}: array '{key}' is damaged ({err}); rewrite the file") from None


register_data_kind(DataKind("npz", NpzData, _open))
