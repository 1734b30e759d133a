"""Strided subsamples of tensors: every k-th value with k prime, so no channel or row is skipped in
lockstep with a power-of-two layout (calibration histograms, per-layer error)."""

from __future__ import annotations

import numpy as np

__all__ = ["next_prime", "sample_stride", "strided"]


def next_prime(n: int) -> int:
    """The smallest prime >= n (and >= 2)."""
    n = max(2, n)
    while any(n % p == 0 for p in range(2, int(n**0.5) + 1)):
        n += 1
    return n


def sample_stride(numel: int, size: int) -> int:
    """The prime stride that keeps at most about `size` of `numel` values."""
    return next_prime(-(-numel // size))


def strided(values: np.ndarray, size: int) -> np.ndarray:
    """At most about `size` values of `values` (flattened): every k-th from k // 2, k prime."""
    flat = np.asarray(values).reshape(-1)
    if flat.size <= size:
        return flat
    stride = sample_stride(flat.size, size)
    return flat[stride // 2 :: stride]
