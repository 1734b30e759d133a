"""The base of every typed settings model (recipe sections, data kinds, transform settings): unknown keys
are rejected, values are frozen; and the checks pydantic's lax mode leaves out.

Lax mode turns `samples: true` into 1, `cross_layer_equalization: 1` into True and `samples: "16"` into 16,
and accepts `.nan` and `.inf` for any float. Strict mode would also refuse a path given as a string, so
instead `coerced_values` compares what the YAML said with what validation made of it, and `non_finite_values`
finds NaN and infinity anywhere in the raw data: each returns one `path: problem` line per value.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel", "coerced_values", "non_finite_values"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def non_finite_values(raw: object, path: str = "") -> list[str]:
    """`path: ...` for every NaN or infinite float in plain data (dicts, lists, scalars)."""
    if isinstance(raw, float) and not math.isfinite(raw):
        return [f"{path or '<top>'}: {raw} is not a finite number (a recipe takes no NaN or infinity)"]
    if isinstance(raw, dict):
        return [line for key, value in raw.items() for line in non_finite_values(value, _join(path, key))]
    if isinstance(raw, (list, tuple)):
        return [line for index, value in enumerate(raw) for line in non_finite_values(value, _join(path, index))]
    return []


def _scalar_coercion(raw: object, value: object) -> str | None:
    if isinstance(raw, bytes) and not isinstance(value, bytes):
        return "is binary data (!!binary); give plain text"
    if isinstance(raw, bool) and not isinstance(value, bool) and isinstance(value, (int, float)):
        return f"{str(raw).lower()} is a boolean; give a number"
    if not isinstance(raw, bool) and isinstance(raw, (int, float, str)) and isinstance(value, bool):
        return f"{raw!r} is not a boolean; give true or false"
    if isinstance(raw, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{raw!r} is text; write the number without quotes"
    return None


def coerced_values(raw: object, value: object, path: str = "") -> list[str]:
    """`path: ...` wherever validation turned the raw value into another kind of scalar (a boolean into a
    number, a number into a boolean, a quoted number into a number). `value` is the validated object."""
    if isinstance(value, BaseModel) and isinstance(raw, dict):
        fields = type(value).model_fields
        return [
            line
            for key, item in raw.items()
            if isinstance(key, str) and key in fields
            for line in coerced_values(item, getattr(value, key), _join(path, key))
        ]
    if isinstance(value, dict) and isinstance(raw, dict):
        return [line for key, item in raw.items() if key in value
                for line in coerced_values(item, value[key], _join(path, key))]
    if isinstance(value, (list, tuple)) and isinstance(raw, (list, tuple)) and len(value) == len(raw):
        return [line for index, (item, made) in enumerate(zip(raw, value))
                for line in coerced_values(item, made, _join(path, index))]
    problem = _scalar_coercion(raw, value)
    return [f"{path or '<top>'}: {problem}"] if problem else []
