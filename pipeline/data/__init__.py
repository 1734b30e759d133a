"""Calibration and validation data: iterables of `{input_name: ndarray}` built from a recipe dataset.

Stages never know where data came from. Every source is streamed one model batch at a time, so memory
does not grow with the number of samples, and every sample is checked against the recipe's input specs
(names, shapes, dtypes, finite values) with an error that names the file, the sample and the tensor.
Data kinds (`npz`, `text`, `images`, `audio`, `builder`) are a registry (`base.register_data_kind`): one module each.
"""

from __future__ import annotations

from pathlib import Path

from ..core.fileio import sha256_file
from ..errors import DataError
from .base import (
    Batch, DataKind, DataSource, OpenContext, SplitSettings, check_batch, data_kinds, register_data_kind, split_part,
)
from .states import INITIAL_STATES, with_states

__all__ = [
    "Batch", "DataSource", "DataKind", "OpenContext", "register_data_kind", "data_kinds", "check_batch",
    "open_dataset", "dataset_fingerprint", "dataset_schemas", "SplitSettings", "split_part", "INITIAL_STATES",
]


def _context(recipe, section: str, limit: int | None) -> OpenContext:
    settings = getattr(recipe, section)
    return OpenContext(recipe.data_inputs(), section, settings.samples if limit is None else limit, recipe.resolve)


def open_dataset(recipe, section: str, *, limit: int | None = None, state_model: Path | str | None = None) -> DataSource:
    """The recipe's `calibration` or `validation` data as a `DataSource` of at most `limit` batches.

    Batches hold the data inputs and the recurrent states (`inputs[].from_output`), never the constants
    (prepare folds them into the graph). A recipe with states needs `state_model`: the float model that
    records them (`states.INITIAL_STATES` feeds their initial values instead: for checks that run nothing).
    """
    data = getattr(recipe, section).data
    ctx = _context(recipe, section, limit)
    if hasattr(data, "path"):  # file kinds (a builder makes its samples in code)
        path = ctx.resolve(data.path)
        if not path.exists():
            raise DataError(f"{section}.data.path: {path} does not exist (run 'make data' or fix the recipe path)")
        if not (path.is_file() or path.is_dir()):  # a FIFO or a device would block or never end
            raise DataError(f"{section}.data.path: {path} is not a regular file or folder")
    source = data_kinds()[data.kind].open(data, ctx)
    states = recipe.state_inputs()
    if not states:
        return source
    if state_model is None:  # a caller that forgot its float model: a bug, not the user's input
        raise RuntimeError(f"open_dataset({section!r}): the recipe has recurrent states; pass state_model")
    constants = {i.name: i.constant_array() for i in recipe.constant_inputs()}
    return with_states(source, states, state_model, constants)


def dataset_fingerprint(recipe, section: str) -> dict:
    """The content a stage reads from the `section` data set, hashed, for its cache key.

    A file: its sha256. Kinds that read more (an image folder) say so with their own `fingerprint`. A
    missing path: its name (the stage then fails on it with a clear error).
    """
    data = getattr(recipe, section).data
    ctx = _context(recipe, section, None)
    kind = data_kinds()[data.kind]
    if kind.fingerprint is not None:
        return kind.fingerprint(data, ctx)
    path = ctx.resolve(data.path)
    return {"data": sha256_file(path) if path.is_file() else str(path)}


def dataset_schemas() -> tuple[type, ...]:
    """The pydantic schema of every registered data kind (the recipe's `data` union)."""
    return tuple(kind.schema for kind in data_kinds().values())


from . import npz, text, images, audio, builder  # noqa: E402,F401,I001  (register the builtin data kinds, in this order)
