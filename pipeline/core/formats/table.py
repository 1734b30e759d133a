"""The format table: what each quantization format means, as data (onnxruntime's tensor overrides idea).

A format is a `FormatSpec` row: bit widths and storage types of activations and weights, symmetry,
granularity, power-of-two scales, the onnxruntime quantizer types that produce it, and the opset its Q/DQ
need. The quantizer (`pipeline.quant.qdq`) builds Q/DQ from the row, `pipeline.inspect` checks a model
against it, targets list the formats they take by name. Adding a format is one module that calls
`register_format` (see `a16w4.py`), imported by `pipeline.core.formats`.

`Format` is the format's name: a `str` that only a registered name can become, interned so that
`Format("bf16") is Format.BF16`, and carrying its row as `.spec`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Format", "FormatSpec", "register_format", "all_formats", "get_format"]


@dataclass(frozen=True)
class FormatSpec:
    """One format. Dtype names are numpy's ("int8"); `None` bits: a float format (no Q/DQ)."""

    name: str
    description: str
    activation_bits: int | None
    weight_bits: int | None
    # Storage types a model of this format may hold (inspect accepts these).
    activation_dtypes: frozenset[str] = frozenset()
    weight_dtypes: frozenset[str] = frozenset()
    # onnxruntime QuantType member names the quantizer uses to produce it.
    activation_type: str = ""
    weight_type: str = ""
    symmetric_activations: bool = True
    per_channel_weights: bool = False  # what the quantizer writes
    per_channel_accepted: bool = False  # whether per-axis scales are documented as accepted (inspect warns if not)
    power_of_two: bool = False
    reduce_range: bool = False
    # Q/DQ of 16-bit (and 4-bit) types are standard from opset 21 (16-bit) / 21 (4-bit); below that they
    # live in onnxruntime's com.microsoft domain.
    contrib_ops: bool = False
    # True when no documented NPU compiler takes the format: it is emulated (and placed) as described only.
    emulated_only: bool = False

    @property
    def quantized(self) -> bool:
        return self.activation_bits is not None


_SPECS: dict[str, FormatSpec] = {}
_INTERNED: dict[str, "Format"] = {}


class Format(str):
    """A registered format's name (see the module docstring). `Format(name)` raises ValueError if unknown."""

    def __new__(cls, name: object) -> "Format":
        if isinstance(name, Format):
            return name
        key = str(getattr(name, "value", name)).strip().lower()
        found = _INTERNED.get(key)
        if found is None:
            known = ", ".join(_INTERNED)
            raise ValueError(f"unknown format {name!r}; known formats: {known}")
        return found

    @classmethod
    def _intern(cls, name: str) -> "Format":
        value = str.__new__(cls, name)
        _INTERNED[name] = value
        return value

    @property
    def value(self) -> str:  # the enum-style spelling the rest of the code and the JSON use
        return str(self)

    @property
    def spec(self) -> FormatSpec:
        return _SPECS[str(self)]

    def __repr__(self) -> str:
        return f"Format({str(self)!r})"

    def __reduce__(self):  # pickles (multiprocessing) as a lookup, keeping the interning
        return (Format, (str(self),))

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):  # recipe fields typed `Format`
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(
            cls, core_schema.str_schema(), serialization=core_schema.plain_serializer_function_ser_schema(str)
        )

    # The builtin formats, set by `builtin.py` at import (type checkers see them here).
    XINT8: "Format"
    A8W8: "Format"
    A16W8: "Format"
    BF16: "Format"
    U8S8: "Format"


def register_format(spec: FormatSpec) -> Format:
    """Add a format to the table; returns its `Format`. Registering a name twice is a programming error."""
    if spec.name in _SPECS:
        raise ValueError(f"format {spec.name!r} is already registered")
    if spec.name != spec.name.lower() or not spec.name.isidentifier():
        raise ValueError(f"format names are lowercase identifiers, not {spec.name!r}")
    _SPECS[spec.name] = spec
    return Format._intern(spec.name)


def all_formats() -> Iterator[Format]:
    """Every registered format, in registration order."""
    return iter(list(_INTERNED.values()))


def get_format(name: object) -> FormatSpec:
    return Format(name).spec
