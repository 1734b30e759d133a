"""Streaming activation statistics and range methods (`pipeline.stats`)."""

from __future__ import annotations

import math
import time
import zipfile

import numpy as np
import pytest

from pipeline.quant import histogram as H
from pipeline.quant.ranges import choose_range
from pipeline.quant.ranges import methods as S
from pipeline.errors import DataError


def _select(stats, method, *, num_bits=8, symmetric=False):
    """The range a registered method gives (through the registry, as the quantizer asks for it)."""
    return choose_range(stats, method, bits=num_bits, symmetric=symmetric)[:2]

METHODS = ("minmax", "percentile", "entropy", "mse", "auto")


def _build(chunks, *, bins=H.DEFAULT_BINS, extremes=None) -> H.TensorStats:
    """Stats from a list of sample arrays; lo/hi are each chunk's own extremes unless given."""
    stats = H.TensorStats("t", bins=bins)
    for i, chunk in enumerate(chunks):
        chunk = np.asarray(chunk, dtype=np.float32)
        lo, hi = (chunk.min(), chunk.max()) if extremes is None else extremes[i]
        stats.update(chunk, lo, hi)
    return stats


def _chunks(draw, count=100, size=4096):
    return [draw(size).astype(np.float32) for _ in range(count)]


@pytest.fixture(scope="module")
def normal():
    rng = np.random.default_rng(0)
    return _build(_chunks(rng.standard_normal))


@pytest.fixture(scope="module")
def uniform():
    rng = np.random.default_rng(1)
    return _build(_chunks(lambda n: rng.uniform(-1, 1, n)))


@pytest.fixture(scope="module")
def student():
    """Student-t, 3 degrees of freedom: heavy tails that the subsample does see."""
    rng = np.random.default_rng(9)
    return _build(_chunks(lambda n: rng.standard_t(3, n)))


@pytest.fixture(scope="module")
def heavy():
    """Laplace bulk, and rare full-tensor extremes of +-60 that the subsample never contains."""
    rng = np.random.default_rng(2)
    chunks = _chunks(lambda n: rng.laplace(0.0, 0.5, n))
    extremes = [(min(c.min(), -60.0), max(c.max(), 60.0)) if i % 10 == 0 else (c.min(), c.max())
                for i, c in enumerate(chunks)]
    return _build(chunks, extremes=extremes)


# ---------------------------------------------------------------- histogram


def test_many_small_updates_equal_one_big_update():
    rng = np.random.default_rng(3)
    # Magnitudes grow, so R doubles many times (once by 2**20); includes zeros, -0.0 and bin edges.
    chunks = [rng.standard_normal(97).astype(np.float32) * np.float32(2.0**k) for k in range(-10, 12)]
    chunks.append(np.array([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0**-30, -(2.0**-30)], np.float32))
    chunks.append(rng.standard_normal(50).astype(np.float32) * np.float32(2.0**20))
    small = _build(chunks)
    whole = np.concatenate(chunks)
    big = _build([whole])
    assert small.exponent == big.exponent
    np.testing.assert_array_equal(small.hist, big.hist)
    assert (small.n, small.min, small.max) == (big.n, big.min, big.max) == (whole.size, whole.min(), whole.max())
    # Independent reference: every value lies in [edge_k, edge_k+1) of the final edges (exact floats).
    edges = big.edges()
    index = np.searchsorted(edges, whole.astype(np.float64), side="right") - 1
    np.testing.assert_array_equal(big.hist, np.bincount(index, minlength=big.bins))
    assert big.limit > max(-big.min, big.max) >= big.limit / 2


def test_memory_is_constant():
    rng = np.random.default_rng(4)
    base = rng.standard_normal(4096).astype(np.float32)
    stats = H.TensorStats("t")
    stats.update(base, base.min(), base.max())
    shape, nbytes = stats.hist.shape, stats.hist.nbytes
    for i in range(10_000):
        sample = base * np.float32(1 + i // 1000)  # grows now and then, forcing merges
        stats.update(sample, sample.min(), sample.max())
    assert stats.hist.shape == shape and stats.hist.nbytes == nbytes == 8 * H.DEFAULT_BINS
    assert stats.n == 10_001 * 4096 == stats.hist.sum() and stats.updates == 10_001


def test_nonfinite_values_are_counted_and_left_out():
    stats = H.TensorStats("bad")
    stats.update(np.array([1.0, np.nan, -np.inf, 2.0], np.float32), -np.inf, np.nan)
    assert stats.nonfinite == 4 and stats.n == 2 and (stats.min, stats.max) == (1.0, 2.0)
    stats.update(np.array([0.5, 3.0], np.float32), 0.5, 3.0)
    assert stats.nonfinite == 4 and stats.n == 4 and stats.hist.sum() == 4
    collector = H.StatsCollector(["ok", "bad"])
    collector.update("ok", np.ones(3, np.float32), 1.0, 1.0)
    collector.update("bad", np.array([np.nan], np.float32), 0.0, 0.0)
    assert collector.nonfinite_tensors() == ["bad"] and collector.count == 1


def test_sample_outside_lo_hi_widens_the_range():
    stats = H.TensorStats("t")
    stats.update(np.array([-5.0, 0.0, 9.0], np.float32), -1.0, 1.0)
    assert (stats.min, stats.max) == (-5.0, 9.0) and stats.limit == 16.0


def test_from_array_and_clipped_above():
    values = np.concatenate([np.linspace(-10, 12, 1000), np.full(200, -1e4), [np.nan]]).astype(np.float32)
    stats = H.TensorStats.from_array(values, "scores")
    assert (stats.min, stats.max, stats.n, stats.nonfinite, stats.updates) == (-1e4, 12.0, 1200, 1, 1)
    real = stats.clipped_above(-1e3)
    assert real.n == 1000 and real.max == 12.0 and stats.n == 1200  # the original is untouched
    assert -16.0 <= real.min <= -10.0  # a bound: bins are 16 wide with R = 2**14
    assert S.minmax(real, symmetric=True) == (-16.0, 16.0)
    np.testing.assert_array_equal(stats.clipped_above(-2e4).hist, stats.hist)
    with pytest.raises(DataError):
        S.minmax(stats.clipped_above(100.0))


def test_bins_must_be_a_power_of_two():
    with pytest.raises(ValueError):
        H.TensorStats("t", bins=1000)


# ---------------------------------------------------------------- expected MSE


@pytest.mark.parametrize("num_bits", [8, 16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shrink", [1.0, 0.3])
def test_expected_mse_matches_real_quantization(num_bits, symmetric, shrink):
    """The histogram estimate agrees with quantize-dequantize of the actual values (16 bits: step << bin)."""
    rng = np.random.default_rng(5)
    values = np.concatenate([rng.standard_normal(200_000), rng.exponential(1.0, 100_000)]).astype(np.float32)
    stats = _build([values])
    lo, hi = S.minmax(stats, symmetric=symmetric)
    lo, hi = lo * shrink, hi * shrink
    levels = 2**num_bits - 1
    if symmetric:
        scale, zero_point, qmin = (hi - lo) / levels, 0, -(levels + 1) // 2
    else:
        scale = (hi - lo) / levels
        zero_point, qmin = round(-lo / scale), 0
    q = np.clip(np.round(values / scale) + zero_point, qmin, qmin + levels)
    actual = np.mean(((q - zero_point) * scale - values.astype(np.float64)) ** 2)
    estimate = S.expected_quant_mse(stats, lo, hi, num_bits=num_bits, symmetric=symmetric)
    assert estimate == pytest.approx(actual, rel=0.05)


def test_expected_mse_of_representable_constant_is_zero():
    stats = _build([np.full(10, 2.0, np.float32)])
    assert S.expected_quant_mse(stats, 0.0, 2.0, num_bits=8, symmetric=False) == 0.0


# ---------------------------------------------------------------- range methods


def test_percentile_of_normal_samples(normal):
    lo, hi = S.percentile(normal, 99.9, symmetric=True)
    assert hi == -lo == pytest.approx(3.2905, abs=0.05)  # |x| ~ half-normal: Phi^-1(0.9995)
    lo, hi = S.percentile(normal, 99.9, symmetric=False)
    assert hi == pytest.approx(3.0902, abs=0.06) and lo == pytest.approx(-3.0902, abs=0.06)
    assert S.percentile(normal, 100, symmetric=False) == S.minmax(normal)


@pytest.mark.parametrize(("data", "narrower"), [("heavy", 0.5), ("student", 0.75)])
def test_entropy_and_mse_clip_heavy_tails(data, narrower, request):
    stats = request.getfixturevalue(data)
    _, full = S.minmax(stats, symmetric=True)
    assert full >= 60.0
    for symmetric in (True, False):
        for lo, hi in (S.entropy(stats, 8, symmetric=symmetric), S.mse(stats, 8, symmetric=symmetric)):
            assert hi < narrower * full and lo > -narrower * full
            assert S.expected_quant_mse(stats, lo, hi, symmetric=symmetric) < S.expected_quant_mse(
                stats, *S.minmax(stats, symmetric=symmetric), symmetric=symmetric
            )


def test_entropy_and_mse_keep_uniform_range(uniform):
    for symmetric in (True, False):
        lo_mm, hi_mm = S.minmax(uniform, symmetric=symmetric)
        for lo, hi in (S.entropy(uniform, 8, symmetric=symmetric), S.mse(uniform, 8, symmetric=symmetric)):
            assert hi >= 0.97 * hi_mm and lo <= 0.97 * lo_mm


def test_entropy_searches_many_candidates(normal):
    # onnxruntime's entropy with 128 bins has one candidate; ours must land inside the data, not at minmax.
    _, hi = S.entropy(normal, 8, symmetric=True)
    _, full = S.minmax(normal, symmetric=True)
    assert 2.0 < hi < full


@pytest.mark.parametrize("data", ["heavy", "student"])
def test_pow2_scale_is_power_of_two_and_beats_minmax_pow2(data, request):
    stats = request.getfixturevalue(data)
    scale = S.pow2_scale_mse(stats)
    assert math.frexp(scale)[0] == 0.5
    maxabs = max(-stats.min, stats.max)

    def pow2_mse(s):  # symmetric 8-bit with scale s: range (-127.5 s, 127.5 s) gives q in [-128, 127]
        return S.expected_quant_mse(stats, -127.5 * s, 127.5 * s, num_bits=8, symmetric=True)

    for rounding in (math.ceil, round):
        naive = 2.0 ** rounding(math.log2(maxabs / 127))
        assert pow2_mse(scale) < pow2_mse(naive)


def test_auto_picks_lowest_mse(heavy, uniform):
    choice = S.auto(heavy, 8, symmetric=True)
    errors = {m: S.expected_quant_mse(heavy, *_select(heavy, m, symmetric=True), symmetric=True)
              for m in ("minmax", "percentile", "entropy", "mse")}
    assert choice.method in errors and errors[choice.method] <= min(errors.values()) * 1.001
    lo, hi, method = choice  # the quantize stage unpacks three values
    assert (choice.lo, choice.hi) == _select(heavy, "auto", symmetric=True)
    assert S.auto(uniform, 8, symmetric=False).method == "minmax"  # ties go to the simplest method


# ---------------------------------------------------------------- edge cases


def _edge_cases():
    rng = np.random.default_rng(6)
    outlier = rng.standard_normal(4096).astype(np.float32)
    outlier[7] = 1e30
    return {
        "zeros": [np.zeros(4096, np.float32)] * 3,
        "one value": [np.array([3.0], np.float32)],
        "constant": [np.full(100, -0.25, np.float32)] * 2,
        "positive": [rng.uniform(1, 2, 4096).astype(np.float32)],
        "huge outlier": [outlier],
        "tiny": [np.array([1e-30, -3e-31], np.float32)],
    }


@pytest.mark.parametrize("case", list(_edge_cases()))
@pytest.mark.parametrize("num_bits", [8, 16])
def test_edge_cases_give_usable_ranges(case, num_bits):
    stats = _build(_edge_cases()[case])
    for symmetric in (True, False):
        widest = S.minmax(stats, symmetric=symmetric)
        for method in METHODS:
            lo, hi = _select(stats, method, num_bits=num_bits, symmetric=symmetric)
            assert math.isfinite(lo) and math.isfinite(hi), (method, lo, hi)
            assert lo <= 0.0 <= hi and hi - lo >= S.MIN_RANGE
            assert widest[0] <= lo and hi <= widest[1], (method, lo, hi, widest)
            if symmetric:
                assert lo == -hi
    scale = S.pow2_scale_mse(stats, num_bits)
    assert scale > 0 and math.frexp(scale)[0] == 0.5


def test_all_zero_and_empty_tensors():
    zeros = _build([np.zeros(16, np.float32)])
    assert S.minmax(zeros) == (0.0, S.MIN_RANGE)
    assert S.minmax(zeros, symmetric=True) == (-S.MIN_RANGE, S.MIN_RANGE)
    only_extremes = H.TensorStats("t")
    only_extremes.update(np.zeros(0, np.float32), -1.0, 2.0)  # no subsample: fall back to min/max
    for method in METHODS:
        assert _select(only_extremes, method) == (-1.0, 2.0)
    with pytest.raises(DataError, match="'never'"):
        S.minmax(H.TensorStats("never"))
    with pytest.raises(ValueError):
        _select(zeros, "bogus")


# ---------------------------------------------------------------- persistence


def test_save_load_round_trip_and_deterministic_bytes(tmp_path, heavy):
    rng = np.random.default_rng(7)
    collector = H.StatsCollector(["a", "b/c:0", "unused"], bins=256)
    for _ in range(5):
        x = rng.standard_normal(500).astype(np.float32)
        collector.update("a", x, x.min(), x.max())
        collector.update("b/c:0", np.abs(x) * 100, 0.0, float(np.abs(x).max() * 100))
    collector.update("a", np.array([np.nan], np.float32), 0.0, 0.0)
    first, second = tmp_path / "one.npz", tmp_path / "two.npz"
    collector.save(first)
    collector.save(second)
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as archive:  # np.savez would stamp the current time on each member
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert not list(tmp_path.glob(".*.tmp"))
    loaded = H.StatsCollector.load(second)
    assert loaded.names == collector.names and loaded.bins == 256 and loaded.count == 6
    for name in collector.names:
        a, b = collector[name], loaded[name]
        np.testing.assert_array_equal(a.hist, b.hist)
        assert (a.exponent, a.min, a.max, a.n, a.updates, a.nonfinite) == (
            b.exponent, b.min, b.max, b.n, b.updates, b.nonfinite)
    assert S.mse(loaded["b/c:0"], 8) == S.mse(collector["b/c:0"], 8)
    with np.load(second, allow_pickle=False) as data:  # plain npz, no pickle
        assert data["hist"].shape == (3, 256)
    loaded.save(tmp_path / "three.npz")
    assert (tmp_path / "three.npz").read_bytes() == first.read_bytes()


def test_load_rejects_foreign_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="rerun calibrate"):
        H.StatsCollector.load(bad)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DataError):
        H.StatsCollector.load(tmp_path / "other.npz")
    with pytest.raises(DataError):
        H.StatsCollector.load(tmp_path / "missing.npz")


# ---------------------------------------------------------------- speed (reported, not asserted)


def test_update_speed_report():
    rng = np.random.default_rng(8)
    samples = [rng.standard_normal(4096).astype(np.float32) for _ in range(16)]
    extremes = [(float(s.min()), float(s.max())) for s in samples]
    collector = H.StatsCollector([f"t{i}" for i in range(100)])
    start = time.perf_counter()
    for step in range(20):
        sample, (lo, hi) = samples[step % 16], extremes[step % 16]
        for name in collector.names:
            collector.update(name, sample, lo, hi)
    per_call = (time.perf_counter() - start) / (20 * 100) * 1e6
    print(f"\nStatsCollector.update, 4096-value sample: {per_call:.1f} us per call")
    assert collector.count == 20


def test_fused_activation_inputs_are_not_measured_and_take_the_activations_quantization():
    """Conv -> Relu -> Clip(0, 6) -> Conv: calibration skips the two values only an activation reads (the
    quantizer gives them the last activation's range, bits and scale, as the NPU's fused kernel
    requantizes once), and the 16-bit promotion free_16bit would give the Conv output does not split them."""
    from onnx import helper, numpy_helper

    from pipeline.core.formats import Format
    from pipeline.quant.qdq import quantize_qdq
    from pipeline.quant.statistics import collect_histograms
    from pipeline.targets import get_target
    from tests.graph_builders import tiny_model

    rng = np.random.default_rng(3)
    inits = {"w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "b1": np.zeros(8, np.float32),
             "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32),
             "w2": rng.standard_normal((4, 8, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Clip", ["r", "lo", "hi"], ["a"]),
             helper.make_node("Conv", ["a", "w2"], ["y"])]
    model = tiny_model(nodes, inits, [("x", [1, 3, 8, 8])], ["y"])
    batches = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(6)]
    stats = collect_histograms(model, batches, progress=False)
    assert "c" not in stats and "r" not in stats and {"a", "y", "x"} <= set(stats.names)
    qmodel, ranges, _ = quantize_qdq(model, stats, target=get_target("xdna2"), fmt=Format.A8W8, method="minmax",
                                     promote={"c": 16, "r": 16})
    assert ranges["c"]["method"] == ranges["r"]["method"] == "fused:minmax"
    assert ranges["c"]["bits"] == ranges["r"]["bits"] == 8 and ranges["c"]["hi"] == ranges["a"]["hi"]
    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    scales = {n.input[0]: float(inits[n.input[1]]) for n in qmodel.graph.node if n.op_type == "QuantizeLinear"}
    assert scales["c"] == scales["a"]
