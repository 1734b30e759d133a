"""Range methods: the registry (`registry.py`), the methods (`methods.py`), the builtin names (`builtin.py`)."""

from . import builtin  # noqa: F401  (registers minmax, percentile, entropy, mse, auto)
from .registry import RangeRequest, choose_range, range_methods, register_range_method

__all__ = ["RangeRequest", "register_range_method", "range_methods", "choose_range"]
