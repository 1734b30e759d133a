"""The Ryzen AI operator table (`ryzenai_npu_ops.csv`, Ryzen AI 1.5 "Supported Operators", one column per
format), shipped inside this package."""

from __future__ import annotations

import csv
import io
from importlib import resources

from ..core.formats import Format

__all__ = ["npu_op_table"]

_CSV = "ryzenai_npu_ops.csv"


def _read_csv() -> dict[Format, frozenset[str]]:
    text = resources.files(__package__).joinpath(_CSV).read_text(encoding="utf-8")
    rows = csv.reader(io.StringIO("".join(l for l in text.splitlines(True) if not l.startswith("#"))))
    header = next(rows)
    if header[0] != "op":
        raise RuntimeError(f"{_CSV}: first column must be 'op', got {header[0]!r}")  # a packaging bug
    columns = {Format(name): i for i, name in enumerate(header) if i > 0}
    table: dict[Format, set[str]] = {fmt: set() for fmt in columns}
    for row in rows:
        for fmt, i in columns.items():
            if row[i].strip() == "1":
                table[fmt].add(row[0].strip())
    return {fmt: frozenset(ops) for fmt, ops in table.items()}


_NPU_OPS = _read_csv()


def npu_op_table(fmt: Format) -> frozenset[str]:
    """ONNX op types the Ryzen AI NPU compiler covers in `fmt` (the CSV's column); empty if none."""
    return _NPU_OPS.get(Format(fmt), frozenset())
