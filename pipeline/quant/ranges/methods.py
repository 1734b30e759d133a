"""Range methods: the clipping range (or power-of-two scale) of one tensor from its streamed statistics.

Range methods (`minmax`, `percentile`, `entropy`, `mse`, `auto`) return `(lo, hi)` as the quantizer will
use it: it always contains 0, is (-a, a) when symmetric, and is never narrower than `MIN_RANGE` (an
all-zero tensor gives (0, 1e-8), or (-1e-8, 1e-8) when symmetric), so the scale is always > 0.
`pow2_scale_mse` returns a power-of-two scale for XINT8. Quantizer convention (onnxruntime's
`compute_scale_zp`): scale = (hi - lo) / (2**bits - 1); symmetric: zero point 0, q in [-2**(bits-1),
2**(bits-1) - 1]; asymmetric: zero point round(-lo / scale), q in [0, 2**bits - 1].

The expected quantization MSE treats the values of each bin as uniform over the bin (clipped to the exact
min/max) and integrates rounding and clipping error exactly, so it stays right when a quantization step is
finer than a bin (16 bits). The histogram holds only the subsample: a lone extreme outside it counts in
the exact min/max but weighs nothing in the MSE, which is what an average error over elements means.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ...errors import DataError
from ..histogram import TensorStats

__all__ = [
    "MIN_RANGE",
    "AutoChoice",
    "minmax",
    "percentile",
    "entropy",
    "mse",
    "pow2_scale_mse",
    "auto",
    "expected_quant_mse",
]

MIN_RANGE = 1e-8  # narrowest range returned: keeps scale > 0 for all-zero tensors
_AUTO_TOL = 1e-3  # auto prefers the simpler method when within 0.1% of the best expected MSE


class AutoChoice(NamedTuple):
    lo: float
    hi: float
    method: str  # "minmax", "percentile", "entropy" or "mse"


def _check(stats: TensorStats) -> None:
    if not stats.min <= stats.max:
        raise DataError(
            f"activation '{stats.name}': no finite calibration value was recorded "
            f"({stats.updates} updates, {stats.nonfinite} non-finite values)"
        )


def _finalize(lo: float, hi: float, symmetric: bool) -> tuple[float, float]:
    """The range the quantizer will use: contains 0, (-a, a) if symmetric, at least MIN_RANGE wide."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        a = max(-lo, hi, MIN_RANGE)
        return -a, a
    if hi - lo < MIN_RANGE:
        hi = lo + MIN_RANGE
    return lo, hi


def _bins(stats: TensorStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-empty bins as (left, right, count), the edges clipped to the exact min/max."""
    index = np.flatnonzero(stats.hist)
    edges = stats.edges()
    left = np.clip(edges[index], stats.min, stats.max)
    right = np.clip(edges[index + 1], stats.min, stats.max)
    return left, right, stats.hist[index].astype(np.float64)


def _check_bits(num_bits: int) -> None:
    if not (isinstance(num_bits, int) and 2 <= num_bits <= 16):
        raise ValueError(f"num_bits must be an integer from 2 to 16, not {num_bits}")


def _grid(lo, hi, num_bits: int, symmetric: bool):
    """Vectorised quantizer from ranges: (scale, lowest, highest representable value)."""
    _check_bits(num_bits)
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    levels = 2.0**num_bits - 1
    if symmetric:
        scale = np.maximum(2.0 * np.maximum(-lo, hi) / levels, 1e-300)
        return scale, -(levels + 1) / 2 * scale, (levels - 1) / 2 * scale
    scale = np.maximum((hi - lo) / levels, 1e-300)
    zero_point = np.clip(np.round(-lo / scale), 0, levels)
    return scale, -zero_point * scale, (levels - zero_point) * scale


def _frac_h(f):
    """Integral over [0, f] of (v - 1/2)**2, for f in [0, 1]."""
    return ((f - 0.5) ** 3 + 0.125) / 3.0


def _mse(bins, scale, low, high) -> np.ndarray:
    """Expected squared error per value for K quantizers (arrays of shape (K,)), uniform within a bin."""
    left, right, counts = bins
    total = counts.sum()
    scale, low, high = (np.asarray(v, dtype=np.float64).reshape(-1, 1) for v in (scale, low, high))
    if total == 0:
        return np.zeros(scale.shape[0])
    # Rounding error over the in-range part: with u = x/scale + 1/2, (x - Q(x))**2 = scale**2 (frac(u) - 1/2)**2.
    ua = np.clip(left, low, high) / scale + 0.5
    ub = np.clip(right, low, high) / scale + 0.5
    fa, fb = np.floor(ua), np.floor(ub)
    integral = scale**3 * ((fb - fa) / 12.0 + _frac_h(ub - fb) - _frac_h(ua - fa))
    # Clipping error of the parts above `high` and below `low`.
    integral += ((np.maximum(right, high) - high) ** 3 - (np.maximum(left, high) - high) ** 3) / 3.0
    integral += ((low - np.minimum(left, low)) ** 3 - (low - np.minimum(right, low)) ** 3) / 3.0
    width = right - left
    narrow = width <= 1e-9 * scale  # a point mass (constant tensor) or a bin far finer than a step
    point = np.clip(np.round(left / scale) * scale, low, high) - left
    per_bin = np.where(narrow, point**2, integral / np.where(narrow, 1.0, width))
    return per_bin @ counts / total


def expected_quant_mse(
    stats: TensorStats, lo: float, hi: float, *, num_bits: int = 8, symmetric: bool = False
) -> float:
    """Expected squared quantize-dequantize error per value, for the range (lo, hi), over the histogram."""
    _check(stats)
    return float(_mse(_bins(stats), *_grid(np.array([lo]), np.array([hi]), num_bits, symmetric))[0])


def minmax(stats: TensorStats, *, symmetric: bool = False) -> tuple[float, float]:
    """The exact running min and max."""
    _check(stats)
    return _finalize(stats.min, stats.max, symmetric)


def _quantile(counts: np.ndarray, q: float, origin: float, width: float) -> float:
    """The q-quantile of a histogram starting at `origin`, linear inside the bin."""
    cum = np.cumsum(counts)
    target = q * cum[-1]
    j = min(int(np.searchsorted(cum, target, side="left")), len(counts) - 1)
    before = cum[j - 1] if j else 0
    frac = (target - before) / counts[j] if counts[j] else 1.0
    return origin + width * (j + min(max(frac, 0.0), 1.0))


def percentile(stats: TensorStats, p: float = 99.999, *, symmetric: bool = False) -> tuple[float, float]:
    """The p-th percentile of |x| (symmetric), or the (100-p)-th and p-th of x; clamped to min/max."""
    _check(stats)
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], not {p}")
    if stats.n == 0 or p == 100:
        return minmax(stats, symmetric=symmetric)
    width = stats.bin_width
    if symmetric:
        t = min(_quantile(stats.abs_hist(), p / 100, 0.0, width), max(-stats.min, stats.max))
        return _finalize(-t, t, True)
    lo = _quantile(stats.hist, 1 - p / 100, -stats.limit, width)
    hi = _quantile(stats.hist, p / 100, -stats.limit, width)
    return _finalize(min(max(lo, stats.min), stats.max), min(max(hi, stats.min), stats.max), False)


def _xlogx(x: np.ndarray) -> np.ndarray:
    return x * np.log(np.where(x > 0, x, 1.0))


def entropy(stats: TensorStats, num_bits: int = 8, *, symmetric: bool = False) -> tuple[float, float]:
    """TensorRT-style threshold: the t minimising KL(P || Q) on the |x| histogram.

    Candidates are every bin edge from 2**(num_bits-1) bins up to the last non-empty bin (about 900 for
    int8 with the default 2,048 bins), evaluated at once from cumulative sums. P folds the clipped mass
    into its last bin; Q merges P's bins into 2**(num_bits-1) groups and spreads each group's mass over its
    non-empty bins. When the data spans no more bins than there are levels (16 bits, or extremes that the
    subsample never saw) nothing is lost inside the histogram: t is the edge of its last non-empty bin.
    Asymmetric: (-t, t) intersected with the exact [min, max].
    """
    _check(stats)
    _check_bits(num_bits)
    counts = stats.abs_hist().astype(np.float64)
    nonzero = np.flatnonzero(counts)
    levels = 2 ** (num_bits - 1)
    if nonzero.size == 0:
        return minmax(stats, symmetric=symmetric)
    cands = np.arange(min(levels, nonzero[-1] + 1), nonzero[-1] + 2)  # threshold = cands * bin_width
    stride = -(-cands.size * (levels + 1) // (1 << 22))  # caps the (K, levels+1) arrays for huge `bins`
    cands = cands[::-1][::stride][::-1]  # keeps the last candidate: the edge of the last non-empty bin
    csum = np.concatenate([[0.0], np.cumsum(counts)])
    cnz = np.concatenate([[0], np.cumsum(counts > 0)])
    cxlogx = np.concatenate([[0.0], np.cumsum(_xlogx(counts))])
    total = csum[-1]
    bounds = (np.arange(levels + 1)[None, :] * cands[:, None]) // levels  # group edges, (K, levels+1)
    group = csum[bounds[:, 1:]] - csum[bounds[:, :-1]]
    group_nz = cnz[bounds[:, 1:]] - cnz[bounds[:, :-1]]
    # sum_k p_k log q_k, with q_k = group sum / non-empty bins in the group (P = counts inside the group).
    plogq = _xlogx(group).sum(axis=1) - (group * np.log(np.maximum(group_nz, 1))).sum(axis=1)
    kept = csum[cands]
    outside = total - kept
    last = counts[cands - 1]
    q_last = np.where(last > 0, group[:, -1] / np.maximum(group_nz[:, -1], 1), 1e-4 * kept)  # smoothed
    plogq += outside * np.log(np.maximum(q_last, 1e-300))
    plogp = cxlogx[cands - 1] + _xlogx(last + outside)
    with np.errstate(divide="ignore"):
        kl = (plogp - plogq) / total - np.log(total) + np.log(kept)
    kl = np.where(kept > 0, kl, np.inf)
    t = min(float(cands[int(np.argmin(kl))]) * stats.bin_width, max(-stats.min, stats.max))
    if symmetric:
        return _finalize(-t, t, True)
    return _finalize(max(-t, stats.min), min(t, stats.max), False)


def _search(objective: Callable[[np.ndarray], np.ndarray], top: float, floor: float) -> tuple[float, float]:
    """Minimise a vectorised objective over t in [floor, top]: a geometric grid, then a linear refinement.

    Grids run from wide to narrow, so ties go to the widest candidate (less clipping).
    """
    grid = np.geomspace(top, min(floor, top), 64)
    errors = objective(grid)
    k = int(np.argmin(errors))
    fine = np.linspace(grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)], 33)
    fine_errors = objective(fine)
    j = int(np.argmin(fine_errors))
    if fine_errors[j] < errors[k]:
        return float(fine[j]), float(fine_errors[j])
    return float(grid[k]), float(errors[k])


def mse(stats: TensorStats, num_bits: int = 8, *, symmetric: bool = False) -> tuple[float, float]:
    """The clipping range with the lowest expected quantization MSE (rounding + clipping).

    Symmetric: a 1-D search over the threshold. Asymmetric: shrink both ends together, then refine the
    upper and the lower end in turn.
    """
    lo0, hi0 = minmax(stats, symmetric=symmetric)
    if stats.n == 0:
        return lo0, hi0
    bins, floor = _bins(stats), stats.bin_width

    def cost(lo, hi) -> np.ndarray:
        return _mse(bins, *_grid(lo, hi, num_bits, symmetric))

    if symmetric:
        t, _ = _search(lambda t: cost(-t, t), hi0, floor)
        return _finalize(-t, t, True)
    best = (lo0, hi0)
    best_err = float(cost(np.array([lo0]), np.array([hi0]))[0])
    alpha, err = _search(lambda a: cost(a * lo0, a * hi0), 1.0, floor / (hi0 - lo0))
    if err < best_err:
        best, best_err = (alpha * lo0, alpha * hi0), err
    if best[1] > 0:
        hi, err = _search(lambda h: cost(np.full_like(h, best[0]), h), hi0, floor)
        if err < best_err:
            best, best_err = (best[0], hi), err
    if best[0] < 0:
        neg, err = _search(lambda n: cost(-n, np.full_like(n, best[1])), -lo0, floor)
        if err < best_err:
            best, best_err = (-neg, best[1]), err
    return _finalize(*best, False)


def pow2_scale_mse(stats: TensorStats, num_bits: int = 8) -> float:
    """XINT8: the power-of-two scale 2**k (symmetric, q in [-2**(b-1), 2**(b-1)-1]) of lowest expected MSE.

    Tries k from the smallest scale that clips nothing, k0 = ceil(log2(maxabs / qmax)), down to k0 - 16.
    """
    _check(stats)
    _check_bits(num_bits)
    qmax = 2 ** (num_bits - 1) - 1
    maxabs = max(-stats.min, stats.max, MIN_RANGE)
    k0 = math.ceil(math.log2(maxabs / qmax))
    while qmax * math.ldexp(1.0, k0) < maxabs:  # guard log2 rounding
        k0 += 1
    while qmax * math.ldexp(1.0, k0 - 1) >= maxabs:
        k0 -= 1
    scales = np.ldexp(1.0, np.arange(k0, k0 - 17, -1))  # wide to narrow: ties keep the larger scale
    if stats.n == 0:
        return float(scales[0])
    errors = _mse(_bins(stats), scales, -(qmax + 1) * scales, qmax * scales)
    return float(scales[int(np.argmin(errors))])


def auto(
    stats: TensorStats, num_bits: int = 8, *, symmetric: bool = False, p: float = 99.999
) -> AutoChoice:
    """Per tensor, the minmax / percentile(p) / entropy / mse range of lowest expected MSE.

    Returns `(lo, hi, method)`. A method within 0.1% of the best wins over a later one in that order (the
    simpler range); `expected_quant_mse` gives the winner's error.
    """
    candidates = {
        "minmax": minmax(stats, symmetric=symmetric),
        "percentile": percentile(stats, p, symmetric=symmetric),
        "entropy": entropy(stats, num_bits, symmetric=symmetric),
        "mse": mse(stats, num_bits, symmetric=symmetric),
    }
    errors = {
        name: expected_quant_mse(stats, lo, hi, num_bits=num_bits, symmetric=symmetric)
        for name, (lo, hi) in candidates.items()
    }
    best = min(errors.values())
    name = next(n for n, e in errors.items() if e <= best * (1 + _AUTO_TOL))
    return AutoChoice(*candidates[name], name)
