"""Bounds on what the pipeline reads, so a hostile or clumsy input fails fast with one message instead of
exhausting memory or time (a YAML alias bomb, a zip bomb in an .npz, one 20 MB line of text, a
196-megapixel image).

Each limit has a default and an environment variable that overrides it (`NPU_PIPELINE_MAX_*`, a positive
integer). The README's "Limits" table lists the same rows; tests/test_hostile_limits.py checks that it does.
A limit that is hit raises the caller's error class with `exceeded(...)`'s message: the file, the value,
the limit and how to raise it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import PipelineError

__all__ = ["Limit", "LIMITS", "limit", "exceeded"]


@dataclass(frozen=True)
class Limit:
    name: str
    env: str
    default: int
    unit: str
    what: str  # the subject of the message: "<where>: <what> is N <unit>, over the limit of ..."
    doc: str  # the README table's description
    # Values above this cannot be honoured (the YAML composer recurses once per level: Python's stack).
    ceiling: int | None = None


LIMITS = {
    item.name: item
    for item in (
        Limit("recipe_bytes", "NPU_PIPELINE_MAX_RECIPE_BYTES", 1 << 20, "bytes", "the file",
              "size of a recipe file"),
        Limit("yaml_depth", "NPU_PIPELINE_MAX_YAML_DEPTH", 64, "levels", "the nesting depth",
              "nesting depth of a recipe, aliases expanded (at most 200)", ceiling=200),
        Limit("yaml_nodes", "NPU_PIPELINE_MAX_YAML_NODES", 100_000, "nodes", "the size with every alias expanded",
              "YAML nodes of a recipe, each alias counted as a copy of what it names"),
        Limit("npz_member_bytes", "NPU_PIPELINE_MAX_NPZ_MEMBER_BYTES", 4 << 30, "bytes", "the uncompressed size",
              "uncompressed size of one array of an .npz (zip header, checked before reading)"),
        Limit("text_line_chars", "NPU_PIPELINE_MAX_TEXT_LINE_CHARS", 100_000, "characters", "the length",
              "length of one line of a text data set"),
        Limit("image_pixels", "NPU_PIPELINE_MAX_IMAGE_PIXELS", 64_000_000, "pixels", "the size",
              "width x height of one image (image header, checked before decoding)"),
        Limit("manifest_bytes", "NPU_PIPELINE_MAX_MANIFEST_BYTES", 16 << 20, "bytes", "the size",
              "size of a bundle's manifest.json (verify, infer)"),
    )
}


def limit(name: str) -> int:
    """The limit's value: its environment variable when set, else its default."""
    item = LIMITS[name]
    raw = os.environ.get(item.env, "").strip()
    if not raw:
        return item.default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise PipelineError(f"{item.env}={raw!r}: not a positive integer (unset it for the default, {item.default:,})")
    if item.ceiling is not None and value > item.ceiling:
        raise PipelineError(f"{item.env}={raw!r}: at most {item.ceiling:,} (the default is {item.default:,})")
    return value


def exceeded(name: str, where: str, value: int | None = None) -> str:
    """The message for a hit limit: what, where, the limit, how to raise it (`value` None: counting
    stopped at the limit)."""
    item = LIMITS[name]
    amount = f"{value:,} {item.unit}" if value is not None else f"more than {limit(name):,} {item.unit}"
    return (
        f"{where}: {item.what} is {amount}, over the limit of {limit(name):,} "
        f"(set {item.env} to raise it)"
    )
