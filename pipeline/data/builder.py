"""Data kind `builder`: samples made by trusted code named in the recipe (`module:function`, like
`model.builder`).

The function returns an iterable of {input name: ndarray}, or (that iterable, labels). A sized iterable
(with __len__) gives its count up front; otherwise one pass counts it. A re-iterable result is iterated once
per pass over the data; a one-shot iterator (a generator) makes every pass call the function again. Only
one sample is held at a time. String arguments naming an existing file (relative to the recipe) are
passed as absolute paths, as for model builders.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable, Iterator, Sized
from itertools import islice
from pathlib import Path
from typing import Literal, Union

import numpy as np
from pydantic import Field, field_validator

from ..core.fileio import sha256_file
from ..core.schema import StrictModel
from ..errors import DataError
from .base import Batch, DataKind, DataSource, OpenContext, register_data_kind

__all__ = ["BuilderData"]


class BuilderData(StrictModel):
    """Samples made by trusted Python code, like `model.builder`: `builder(**args)` returns an iterable
    of `{input name: ndarray of the input's declared shape}` (sized, or counted by one pass), or a
    pair (samples, labels)."""

    kind: Literal["builder"]
    builder: str
    args: dict[str, Union[str, int, float, bool]] = Field(default_factory=dict)

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
    module_name, _, func_name = data.builder.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DataError(f"{where}: cannot import module '{module_name}' ({err})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise DataError(f"{where}: module '{module_name}' has no function '{func_name}'")
    try:
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

    count = min(ctx.limit, len(first)) if isinstance(first, Sized) else sum(1 for _ in islice(samples(), ctx.limit))
    if count == 0:
        raise DataError(f"{section}.data: {data.builder} made no samples")
    if labels is not None and (labels.ndim == 0 or len(labels) < count):
        raise DataError(f"{section}.data: {data.builder} gave {labels.size} labels for {count} samples (one per sample)")

    def batches() -> Iterator[Batch]:
        for index, sample in enumerate(islice(samples(), count)):
            if not isinstance(sample, dict):
                raise DataError(f"{section}.data: {data.builder}, sample {index} is a {type(sample).__name__}, "
                                "not a dict {input name: ndarray}")
            unknown = sorted(set(sample) - names)
            if unknown:
                raise DataError(f"{section}.data: {data.builder}, sample {index}: {', '.join(map(str, unknown))} "
                                f"are not model inputs ({', '.join(sorted(names))})")
            yield {name: np.asarray(value) for name, value in sample.items()}

    return DataSource(data.builder, ctx.inputs, count, batches, None if labels is None else labels[:count])


def _fingerprint(data: BuilderData, ctx: OpenContext) -> dict:
    """The entry point, its module's source, the args and every file an arg names."""
    module_name = data.builder.partition(":")[0]
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        found = None  # the stage then fails on it with a clear error
    source = Path(found.origin) if found is not None and found.origin else None
    files = {key: sha256_file(Path(value)) for key, value in _args(data, ctx).items()
             if isinstance(value, str) and Path(value).is_file()}
    return {
        "builder": data.builder,
        "source": sha256_file(source) if source is not None and source.is_file() else module_name,
        "args": {key: data.args[key] for key in sorted(data.args)},
        "files": files,
    }


register_data_kind(DataKind("builder", BuilderData, _open, _fingerprint))
