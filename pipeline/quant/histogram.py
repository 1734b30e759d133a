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

The range methods that read these statistics are in `pipeline.quant.ranges`.
"""

from __future__ import annotations

import copy
import io
import math
import os
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import DataError

__all__ = ["DEFAULT_BINS", "MIN_EXP", "TensorStats", "StatsCollector"]

DEFAULT_BINS = 2048
MIN_EXP = -126  # R never goes below 2**-126 (float32's smallest normal)
_FORMAT_VERSION = 1


class TensorStats:
    """Streaming statistics of one tensor. See the module docstring for the histogram layout."""

    __slots__ = ("name", "bins", "hist", "exponent", "min", "max", "n", "updates", "nonfinite")

    def __init__(self, name: str = "", *, bins: int = DEFAULT_BINS) -> None:
        if bins < 8 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 8, not {bins}")
        self.name = name
        self.bins = bins
        self.hist = np.zeros(bins, dtype=np.int64)
        self.exponent = MIN_EXP  # R = 2**exponent
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
            need = math.frexp(maxabs)[1] if maxabs > 0 else MIN_EXP  # 2**need > maxabs
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
        values_ok = shapes_ok and (arrays["hist"] >= 0).all() and (arrays["exponent"] >= MIN_EXP).all()
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
