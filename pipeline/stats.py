"""Streaming per-tensor activation statistics, and the range methods that read them.

The calibrate stage feeds, per activation and per sample, the tensor's exact min and max (ReduceMin and
ReduceMax in the graph) and a strided subsample of about 4,096 of its values. `TensorStats` keeps:

* the exact running min and max;
* a signed histogram of the subsampled values with a fixed number of bins over [-R, R), R = 2**exponent the
  smallest power of two above every |value| seen. When new data exceeds R, R doubles (as often as needed)
  by summing adjacent bin pairs. Bin edges are k * 2R / bins, so after doubling every old bin lies inside
  one new bin and the merge is exact: the counts equal those of a histogram built at the final R in one go.
  Memory is `bins` int64 counts per tensor, whatever the number of samples;
* the number of values binned, of updates, and of non-finite values (`nonfinite`).

Non-finite values are counted, never binned and never raised on here: the caller reads `nonfinite` (or
`StatsCollector.nonfinite_tensors()`) and raises one `DataError` naming every bad tensor. A NaN or inf
`lo`/`hi` counts as one non-finite value each and is left out of the running min/max.

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

import copy

import io
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import DataError

__all__ = [
    "DEFAULT_BINS",
    "MIN_RANGE",
    "TensorStats",
    "StatsCollector",
    "AutoChoice",
    "minmax",
    "percentile",
    "entropy",
    "mse",
    "pow2_scale_mse",
    "auto",
    "select_range",
    "expected_quant_mse",
]

DEFAULT_BINS = 2048
MIN_RANGE = 1e-8  # narrowest range returned: keeps scale > 0 for all-zero tensors
_MIN_EXP = -126  # R never goes below 2**-126 (float32's smallest normal)
_FORMAT_VERSION = 1
_AUTO_TOL = 1e-3  # auto prefers the simpler method when within 0.1% of the best expected MSE


class TensorStats:
    """Streaming statistics of one tensor. See the module docstring for the histogram layout."""

    __slots__ = ("name", "bins", "hist", "exponent", "min", "max", "n", "updates", "nonfinite")

    def __init__(self, name: str = "", *, bins: int = DEFAULT_BINS) -> None:
        if bins < 8 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 8, not {bins}")
        self.name = name
        self.bins = bins
        self.hist = np.zeros(bins, dtype=np.int64)
        self.exponent = _MIN_EXP  # R = 2**exponent
        self.min = math.inf
        self.max = -math.inf
        self.n = 0
        self.updates = 0
        self.nonfinite = 0

    @property
    def limit(self) -> float:
        """R: the histogram covers [-R, R)."""
        return math.ldexp(1.0, self.exponent)

    @property
    def bin_width(self) -> float:
        return math.ldexp(2.0, self.exponent) / self.bins

    def edges(self) -> np.ndarray:
        return (np.arange(self.bins + 1) - self.bins // 2) * self.bin_width

    def abs_hist(self) -> np.ndarray:
        """Counts of |x| over [0, R) in bins/2 bins of width `bin_width`."""
        half = self.bins // 2
        return self.hist[half:] + self.hist[half - 1 :: -1]

    @classmethod
    def from_array(cls, values: np.ndarray, name: str = "", *, bins: int = DEFAULT_BINS) -> "TensorStats":
        """Statistics of every value of one array (e.g. a weight), as a single update."""
        x = np.asarray(values, dtype=np.float32).reshape(-1)
        finite = np.isfinite(x)
        stats = cls(name, bins=bins)
        stats.nonfinite = int(x.size - np.count_nonzero(finite))
        x = x[finite] if stats.nonfinite else x
        if x.size:
            stats.update(x, x.min(), x.max())
        return stats

    def clipped_above(self, threshold: float) -> "TensorStats":
        """A copy holding only the values above `threshold` (e.g. without an attention mask's -1e4 spike).

        Bins wholly at or below `threshold` are dropped. The new min is a bound, not exact: the larger of
        `threshold` and the first kept bin's left edge. R and so the bin width stay as they are: a -1e4
        spike leaves bins 16 wide for the values that remain.
        """
        kept = TensorStats(self.name, bins=self.bins)
        kept.exponent, kept.updates, kept.nonfinite = self.exponent, self.updates, self.nonfinite
        edges = self.edges()
        kept.hist = np.where(edges[1:] <= threshold, 0, self.hist)
        kept.n = int(kept.hist.sum())
        if self.max > threshold:
            first = np.flatnonzero(kept.hist)
            left = edges[first[0]] if first.size else -math.inf
            kept.min, kept.max = max(self.min, float(threshold), float(left)), self.max
        return kept

    def update(self, sample: np.ndarray, lo: float, hi: float) -> None:
        """Add one calibration sample: a subsample of the tensor and the tensor's exact extremes."""
        # Activations are float32: a float64 value beyond float32's range is inf there, so it is here too.
        x = np.asarray(sample, dtype=np.float32).reshape(-1)
        lo, hi = float(np.float32(lo)), float(np.float32(hi))
        self.updates += 1
        if not math.isfinite(lo):
            self.nonfinite += 1
            lo = math.inf
        if not math.isfinite(hi):
            self.nonfinite += 1
            hi = -math.inf
        if x.size:
            smin, smax = float(x.min()), float(x.max())  # NaN propagates, so this also finds NaN
            if not (math.isfinite(smin) and math.isfinite(smax)):
                finite = np.isfinite(x)
                self.nonfinite += int(x.size - np.count_nonzero(finite))
                x = x[finite]
                smin, smax = (float(x.min()), float(x.max())) if x.size else (math.inf, -math.inf)
            # A value outside [lo, hi] means lo/hi were not the tensor's extremes: widen, never drop it.
            lo, hi = min(lo, smin), max(hi, smax)
        if lo <= hi:
            self.min, self.max = min(self.min, lo), max(self.max, hi)
            maxabs = max(-self.min, self.max)
            need = math.frexp(maxabs)[1] if maxabs > 0 else _MIN_EXP  # 2**need > maxabs
            if need > self.exponent:
                self._grow(need)
        if x.size:
            half = self.bins // 2
            # floor(x * bins / 2R): the scale is a power of two, so in float64 the product is exact; the
            # doubling merge relies on that.
            t = np.multiply(x, math.ldexp(half, -self.exponent), dtype=np.float64)
            np.floor(t, out=t)
            t += half
            self.hist += np.bincount(t.astype(np.intp), minlength=self.bins)
            self.n += x.size

    def _grow(self, exponent: int) -> None:
        """Set R = 2**exponent by summing groups of 2**k adjacent bins (exact: edges nest)."""
        half = self.bins // 2
        factor = 1 << min(exponent - self.exponent, half.bit_length() - 1)  # beyond bins/2 nothing changes
        groups = self.bins // factor
        merged = np.zeros_like(self.hist)
        merged[half - groups // 2 : half + groups // 2] = self.hist.reshape(groups, factor).sum(axis=1)
        self.hist = merged
        self.exponent = exponent

    def __repr__(self) -> str:
        return (
            f"TensorStats({self.name!r}, min={self.min:g}, max={self.max:g}, n={self.n}, "
            f"updates={self.updates}, R=2**{self.exponent}, nonfinite={self.nonfinite})"
        )


class StatsCollector:
    """`TensorStats` for a fixed set of tensors, saved to and loaded from one .npz file."""

    _ARRAYS = ("hist", "exponent", "min", "max", "n", "updates", "nonfinite")

    def __init__(self, names: Iterable[str], *, bins: int = DEFAULT_BINS) -> None:
        names = tuple(names)
        if len(set(names)) != len(names):
            raise ValueError("tensor names must be unique")
        self.bins = bins
        self._stats = {name: TensorStats(name, bins=bins) for name in names}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._stats)

    @property
    def count(self) -> int:
        """Samples seen: the most updates any tensor has had (each sample updates every tensor once)."""
        return max((s.updates for s in self._stats.values()), default=0)

    def update(self, name: str, sample: np.ndarray, lo: float, hi: float) -> None:
        self._stats[name].update(sample, lo, hi)

    def __getitem__(self, name: str) -> TensorStats:
        return self._stats[name]

    def alias(self, name: str, source: str) -> None:
        """Give `name` a copy of `source`'s statistics (a Reshape/Transpose output holds the same values)."""
        stats = copy.deepcopy(self._stats[source])
        stats.name = name
        self._stats[name] = stats

    def __contains__(self, name: object) -> bool:
        return name in self._stats

    def __len__(self) -> int:
        return len(self._stats)

    def nonfinite_tensors(self) -> list[str]:
        """Names of the tensors that saw a NaN or inf, in collector order."""
        return [name for name, s in self._stats.items() if s.nonfinite]

    def save(self, path: Path) -> None:
        """Write one .npz (no pickle) atomically; the same statistics always give the same bytes."""
        stats = list(self._stats.values())
        arrays = {
            "format_version": np.array(_FORMAT_VERSION, dtype=np.int64),
            "bins": np.array(self.bins, dtype=np.int64),
            "names": np.array(self.names, dtype=str) if stats else np.zeros(0, dtype="<U1"),
            "hist": np.stack([s.hist for s in stats]) if stats else np.zeros((0, self.bins), np.int64),
        }
        for key in self._ARRAYS[1:]:
            dtype = np.float64 if key in ("min", "max") else np.int64
            arrays[key] = np.array([getattr(s, key) for s in stats], dtype=dtype)
        buffer = io.BytesIO()
        # np.savez stamps each member with the current time; fixed ZipInfo fields make the bytes stable.
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            for key, value in arrays.items():
                member = io.BytesIO()
                np.lib.format.write_array(member, value, allow_pickle=False)
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.create_system = 3
                info.external_attr = 0o644 << 16
                archive.writestr(info, member.getvalue())
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(buffer.getvalue())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: Path) -> "StatsCollector":
        """Read a file written by `save`; a missing, foreign or damaged file raises `DataError`."""
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            with data:
                arrays = {key: data[key] for key in ("format_version", "bins", "names", *cls._ARRAYS)}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise DataError(f"calibration statistics {path}: cannot read ({exc}); rerun calibrate") from exc
        version, bins, names = int(arrays["format_version"]), int(arrays["bins"]), arrays["names"]
        count = len(names)
        shapes_ok = arrays["hist"].shape == (count, bins) and all(
            arrays[key].shape == (count,) for key in cls._ARRAYS[1:]
        )
        values_ok = shapes_ok and (arrays["hist"] >= 0).all() and (arrays["exponent"] >= _MIN_EXP).all()
        if version != _FORMAT_VERSION or not values_ok or bins < 8 or bins & (bins - 1):
            raise DataError(
                f"calibration statistics {path}: format version {version} or array shapes do not match "
                f"this pipeline (version {_FORMAT_VERSION}); rerun calibrate"
            )
        collector = cls([str(name) for name in names], bins=bins)
        for index, stats in enumerate(collector._stats.values()):
            stats.hist = arrays["hist"][index].astype(np.int64)
            for key in cls._ARRAYS[1:]:
                value = arrays[key][index]
                setattr(stats, key, float(value) if key in ("min", "max") else int(value))
        return collector


# ---------------------------------------------------------------- range methods


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
    if num_bits not in (8, 16):
        raise ValueError(f"num_bits must be 8 or 16, not {num_bits}")


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


def select_range(
    stats: TensorStats, method: str, *, num_bits: int = 8, symmetric: bool = False, p: float = 99.999
) -> tuple[float, float]:
    """Dispatch on a recipe's method name ("minmax", "percentile", "entropy", "mse", "auto")."""
    method = getattr(method, "value", method)
    if method == "minmax":
        return minmax(stats, symmetric=symmetric)
    if method == "percentile":
        return percentile(stats, p, symmetric=symmetric)
    if method == "entropy":
        return entropy(stats, num_bits, symmetric=symmetric)
    if method == "mse":
        return mse(stats, num_bits, symmetric=symmetric)
    if method == "auto":
        choice = auto(stats, num_bits, symmetric=symmetric, p=p)
        return choice.lo, choice.hi
    raise ValueError(f"unknown range method {method!r}")
