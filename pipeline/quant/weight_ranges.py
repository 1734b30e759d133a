"""Weight ranges: the per-tensor scale of a constant weight, chosen from its exact values, as a registry.

Activations only have streamed histograms (`pipeline.quant.ranges`); a weight is known exactly, so its
scale is chosen on the values themselves. A method is a function `(values, request) -> scale`,
registered with `@register_weight_method("name")`; the quantizer applies it to every weight of a Conv,
ConvTranspose, Gemm or MatMul (`quantize_qdq(..., weight_method=...)`). Symmetric grids only
(q in [-qmax, qmax], zero point 0), which is what every format here uses for weights.

- `minmax`: scale = max|w| / qmax (onnxruntime's own choice);
- `mse`: the scale of lowest squared rounding + clipping error over the weight's values: a 1-D search
  over the clipping threshold (64 geometric steps down to max|w| / 16, then a linear refinement). A lone
  outlier (a depthwise kernel's centre tap, a transformer FFN's 7.9 among values of std 0.05) is clipped
  when the resolution this buys the other values is worth more than its own error.
`power_of_two`: the scale is a power of two (XINT8): the candidates are 2**k, the same objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["WeightRequest", "register_weight_method", "weight_methods", "weight_scale", "rounding_error"]

_SUBSAMPLE = 1 << 18  # values the search evaluates (a strided subsample of larger weights)


@dataclass(frozen=True)
class WeightRequest:
    bits: int = 8
    power_of_two: bool = False

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


WeightMethod = Callable[[np.ndarray, WeightRequest], float]
_METHODS: dict[str, WeightMethod] = {}


def register_weight_method(name: str) -> Callable[[WeightMethod], WeightMethod]:
    def register(func: WeightMethod) -> WeightMethod:
        if name in _METHODS:
            raise ValueError(f"weight range method {name!r} is already registered")
        _METHODS[name] = func
        return func

    return register


def weight_methods() -> tuple[str, ...]:
    return tuple(_METHODS)


def rounding_error(values: np.ndarray, scales: np.ndarray, qmax: int) -> np.ndarray:
    """Sum of squared quantize-dequantize errors of `values` for each candidate scale."""
    return np.array([float(((np.clip(np.round(values / s), -qmax, qmax) * s - values) ** 2).sum())
                     for s in np.asarray(scales, np.float64).ravel()])


def _pow2_at_least(x: float) -> float:
    """The smallest power of two >= x (x > 0)."""
    k = math.ceil(math.log2(x))
    while math.ldexp(1.0, k - 1) >= x:
        k -= 1
    while math.ldexp(1.0, k) < x:
        k += 1
    return math.ldexp(1.0, k)


def weight_scale(values: np.ndarray, method: str, *, bits: int = 8, power_of_two: bool = False) -> float:
    """The scale of one weight tensor by the registered `method`."""
    func = _METHODS.get(str(method))
    if func is None:
        raise ValueError(f"unknown weight range method {method!r}; known: {', '.join(_METHODS)}")
    values = np.asarray(values, np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0 or not np.any(values):
        return 1.0 if power_of_two else 1e-8
    return float(func(values, WeightRequest(bits, power_of_two)))


@register_weight_method("minmax")
def _minmax(values: np.ndarray, r: WeightRequest) -> float:
    scale = float(np.abs(values).max()) / r.qmax
    return _pow2_at_least(scale) if r.power_of_two else scale


@register_weight_method("mse")
def _mse(values: np.ndarray, r: WeightRequest) -> float:
    if values.size > _SUBSAMPLE:
        values = values[:: -(-values.size // _SUBSAMPLE)]
    top = float(np.abs(values).max()) / r.qmax
    if r.power_of_two:
        first = _pow2_at_least(top)
        candidates = np.ldexp(1.0, np.arange(round(math.log2(first)), round(math.log2(first)) - 9, -1))
        return float(candidates[int(np.argmin(rounding_error(values, candidates, r.qmax)))])
    grid = np.geomspace(top, top / 16, 64)
    k = int(np.argmin(rounding_error(values, grid, r.qmax)))
    fine = np.linspace(grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)], 33)
    errors = rounding_error(values, fine, r.qmax)
    return float(fine[int(np.argmin(errors))])
