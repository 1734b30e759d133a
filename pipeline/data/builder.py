"""Data kind `builder`: samples made by trusted code named in the recipe (`module:function`, like
`model.builder`).

The function returns an iterable of {input name: ndarray}, or (that iterable, labels). A sized iterable
(with __len__) gives its count up front; otherwise one pass counts it. A re-iterable result is iterated once
per pass over the data; a one-shot iterator (a generator) makes every pass call the function again. Only
one sample is held at a time. String arguments naming an existing file (relative to the recipe) are
passed as absolute paths, as for model builders.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from itertools import islice
from pathlib import Path
from typing import Literal, Union

import numpy as np
from pydantic import Field, field_validator

from ..core.entrypoints import entry_point_source, import_entry_point, recipe_folder_on_path
from ..core.fileio import sha256_file
from ..core.schema import StrictModel
from ..errors import DataError
from .base import Batch, DataKind, DataSource, OpenContext, SplitSettings, register_data_kind, split_part

__all__ = ["BuilderData"]


class BuilderData(StrictModel):
    """Samples made by trusted Python code, like `model.builder`: `builder(**args)` returns an iterable
    of `{input name: ndarray of the input's declared shape}` (sized, or counted by one pass), or a
    pair (samples, labels)."""

    kind: Literal["builder"]
    builder: str
    args: dict[str, Union[str, int, float, bool]] = Field(default_factory=dict)
    split: SplitSettings | None = None

    @field_validator("builder")
    @classmethod
    def _entry_point(cls, value: str) -> str:
        if value.count(":") != 1 or not all(value.partition(":")[::2]):
            raise ValueError(f"builder {value!r} must look like 'package.module:function'")
        return value


def _args(data: BuilderData, ctx: OpenContext) -> dict:
    """The builder's args; a string naming an existing file (relative to the recipe) becomes its absolute path."""
    def value(v):
        path = ctx.resolve(Path(v)) if isinstance(v, str) and v else None
        return str(path) if path is not None and path.exists() else v
    return {key: value(v) for key, v in data.args.items()}


def _call(data: BuilderData, ctx: OpenContext) -> tuple[object, np.ndarray | None]:
    where = f"{ctx.section}.data.builder"
    folder = ctx.resolve(Path("."))  # the recipe's folder: a builder module beside the recipe imports
    func = import_entry_point(data.builder, folder, where=where, missing=DataError, failing=DataError)
    try:
        with recipe_folder_on_path(folder, data.builder.partition(":")[0]):
            result = func(**_args(data, ctx))
    except (Exception, SystemExit) as err:  # the user's own code failed (or tried to end the process)
        kind = "called sys.exit" if isinstance(err, SystemExit) else f"raised {type(err).__name__}"
        raise DataError(f"{where}: {data.builder} {kind}: {err}") from err
    labels = None
    if isinstance(result, tuple) and len(result) == 2 and not isinstance(result[0], dict):
        result, labels = result[0], np.asarray(result[1])
    if not isinstance(result, Iterable) or isinstance(result, (dict, str, bytes, np.ndarray)):
        raise DataError(f"{where}: {data.builder} returned {type(result).__name__}; it must return an iterable of "
                        "{input name: ndarray} samples (or a pair: samples, labels)")
    return result, labels


def _open(data: BuilderData, ctx: OpenContext) -> DataSource:
    section = ctx.section
    first, labels = _call(data, ctx)
    one_shot = isinstance(first, Iterator)
    names = {spec.name for spec in ctx.inputs}

    def samples() -> Iterator:
        nonlocal first
        if one_shot and first is None:  # a generator was used up by an earlier pass: make a fresh one
            first = _call(data, ctx)[0]
        current, first = first, (None if one_shot else first)
        return iter(current)

    if data.split is None:
        chosen = None
        count = min(ctx.limit, len(first)) if isinstance(first, Sized) else sum(1 for _ in islice(samples(), ctx.limit))
    else:  # the split needs the whole source's size
        total = len(first) if isinstance(first, Sized) else sum(1 for _ in samples())
        chosen = split_part(total, data.split, section)[: ctx.limit]
        count = len(chosen)
    if count == 0:
        raise DataError(f"{section}.data: {data.builder} made no samples")
    if labels is not None and (labels.ndim == 0 or len(labels) < (count if chosen is None else chosen[-1] + 1)):
        raise DataError(f"{section}.data: {data.builder} gave {labels.size} labels for {count} samples (one per sample)")
    if labels is not None:
        labels = labels[:count] if chosen is None else labels[chosen]

    def selected() -> Iterator:
        if chosen is None:
            yield from enumerate(islice(samples(), count))
            return
        wanted, last = set(chosen), chosen[-1]
        for index, sample in enumerate(samples()):
            if index in wanted:
                yield index, sample
            if index >= last:
                return

    def batches() -> Iterator[Batch]:
        for index, sample in selected():
            if not isinstance(sample, dict):
                raise DataError(f"{section}.data: {data.builder}, sample {index} is a {type(sample).__name__}, "
                                "not a dict {input name: ndarray}")
            unknown = sorted(set(sample) - names)
            if unknown:
                raise DataError(f"{section}.data: {data.builder}, sample {index}: {', '.join(map(str, unknown))} "
                                f"are not model inputs (the data feeds: {', '.join(sorted(names))})")
            yield {name: np.asarray(value) for name, value in sample.items()}

    return DataSource(data.builder, ctx.inputs, count, batches, labels)


def _fingerprint(data: BuilderData, ctx: OpenContext) -> dict:
    """The entry point, its module's source, the args and every file an arg names."""
    source = entry_point_source(data.builder, ctx.resolve(Path(".")))
    module_name = data.builder.partition(":")[0]
    files = {key: sha256_file(Path(value)) for key, value in _args(data, ctx).items()
             if isinstance(value, str) and Path(value).is_file()}
    return {
        "builder": data.builder,
        "source": sha256_file(source) if source is not None and source.is_file() else module_name,
        "args": {key: data.args[key] for key in sorted(data.args)},
        "files": files,
    }


register_data_kind(DataKind("builder", BuilderData, _open, _fingerprint))
