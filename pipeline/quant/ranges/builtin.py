"""The builtin range methods, registered under the names recipes use."""

from __future__ import annotations

from . import methods as M
from .registry import RangeRequest, register_range_method


@register_range_method("minmax")
def _minmax(stats, r: RangeRequest):
    return M.minmax(stats, symmetric=r.symmetric)


@register_range_method("percentile")
def _percentile(stats, r: RangeRequest):
    return M.percentile(stats, r.percentile, symmetric=r.symmetric)


@register_range_method("entropy")
def _entropy(stats, r: RangeRequest):
    return M.entropy(stats, r.bits, symmetric=r.symmetric)


@register_range_method("mse")
def _mse(stats, r: RangeRequest):
    return M.mse(stats, r.bits, symmetric=r.symmetric)


@register_range_method("auto")
def _auto(stats, r: RangeRequest):
    return M.auto(stats, r.bits, symmetric=r.symmetric, p=r.percentile)
