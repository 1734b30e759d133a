"""Range methods as a registry: the recipe's `calibration.method` names one; `choose_range` applies it.

A method is a function `(stats, request) -> (lo, hi)` or `(lo, hi, name used)` registered under its name
with `@register_range_method("name")`. Adding a method is one module holding such a function, imported
by `pipeline.quant.ranges`; the recipe schema accepts every registered name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..histogram import TensorStats

__all__ = ["RangeRequest", "register_range_method", "range_methods", "choose_range"]


@dataclass(frozen=True)
class RangeRequest:
    """What the quantizer will do with the range: `bits` wide, symmetric or not; `percentile` for the
    methods that clip at one (percentile, auto)."""

    bits: int = 8
    symmetric: bool = True
    percentile: float = 99.999


RangeMethod = Callable[[TensorStats, RangeRequest], tuple]
_METHODS: dict[str, RangeMethod] = {}


def register_range_method(name: str) -> Callable[[RangeMethod], RangeMethod]:
    def register(func: RangeMethod) -> RangeMethod:
        if name in _METHODS:
            raise ValueError(f"range method {name!r} is already registered")
        _METHODS[name] = func
        return func

    return register


def range_methods() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_METHODS)


def choose_range(stats: TensorStats, method: str, *, bits: int, symmetric: bool, percentile: float = 99.999):
    """(lo, hi, method used) for one tensor; `method` is a registered name (an enum's value works too)."""
    name = str(getattr(method, "value", method))
    func = _METHODS.get(name)
    if func is None:
        raise ValueError(f"unknown range method {name!r}; known: {', '.join(_METHODS)}")
    found = func(stats, RangeRequest(bits, symmetric, percentile))
    lo, hi, used = found if len(found) == 3 else (*found, name)
    return float(lo), float(hi), used
