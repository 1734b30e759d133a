"""Int8 ranges of MAC inputs chosen by the error of the MAC's *output*, not of the input alone.

A range method scores a clipping range by the input's own quantization error. What the network feels is
the error of the layer that reads it: clipping a channel the weights barely use costs nothing, rounding
a channel they amplify costs a lot. For every int8 activation a MatMul/Gemm/Conv reads (through layout ops,
grouped by the value the Q/DQ pair sits on), a few candidate ranges from its histogram (minmax, high
percentiles, the MSE range, shrunk minmax) are scored by

    sum over its MAC readers of || fq(X) @ Wq - X @ W ||^2      (the other operand float for X @ Y)

with Wq the per-tensor int8 weight the quantizer will make, over a few calibration samples of the float
model, streamed (one sample's activations in memory). Conv readers are left to the range method.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper
from threadpoolctl import threadpool_limits

from ..core.onnx_io import expose_outputs, make_session
from ..core.ops import LAYOUT_OPS
from .histogram import StatsCollector
from .ranges import choose_range

__all__ = ["RangeChoice", "mac_input_sources", "output_error_ranges", "CANDIDATE_SHRINK"]

CANDIDATE_SHRINK = (0.75, 0.5)  # fractions of the largest |x| tried besides the histogram's ranges
_PERCENTILES = (99.9999, 99.999, 99.99, 99.9)


@dataclass(frozen=True)
class RangeChoice:
    lo: float
    hi: float
    candidate: str  # which candidate won ("minmax", "p99.99", "mse", "x0.5", ...)
    error_db: float  # output SQNR of the readers with it (dB, higher is better)
    minmax_db: float  # ... and with the plain minmax range, for the report

    def to_json(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "candidate": self.candidate,
                "output_sqnr_db": round(self.error_db, 3), "minmax_output_sqnr_db": round(self.minmax_db, 3)}


def mac_input_sources(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """{source value: [(MatMul/Gemm node, input slot)]}: the activations MAC nodes read, traced back through
    layout ops to the tensor whose Q/DQ pair sets their range."""
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    found: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        slots = [0, 1] if node.op_type == "MatMul" else [0]
        for slot in slots:
            name = node.input[slot]
            if name in inits:
                continue
            src = producer.get(name)
            while src is not None and src.op_type in LAYOUT_OPS and src.input[0] not in inits:
                name, src = src.input[0], producer.get(src.input[0])
            found.setdefault(name, []).append((node, slot))
    return found


def _fake_quant(x: np.ndarray, lo: float, hi: float, bits: int, symmetric: bool) -> np.ndarray:
    if symmetric:
        a = max(abs(lo), abs(hi), 1e-30)
        scale = a / (2 ** (bits - 1) - 1)
        return np.clip(np.round(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale
    scale = max(hi - lo, 1e-30) / (2**bits - 1)
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 2**bits - 1) - zero) * scale


def _weight(model: onnx.ModelProto, node: onnx.NodeProto, bits: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(rounded, float) constant second operand of a MatMul/Gemm as (K, N), the rounded one per tensor
    symmetric as the quantizer makes it; None when it is not a constant."""
    init = {i.name: i for i in model.graph.initializer}
    if node.input[1] not in init:
        return None
    w = numpy_helper.to_array(init[node.input[1]]).astype(np.float32)
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        w = w.T
    a = float(np.abs(w).max()) or 1.0
    return _fake_quant(w, -a, a, bits, True), w


def _candidates(stats, bits: int, symmetric: bool) -> dict[str, tuple[float, float]]:
    out = {"minmax": choose_range(stats, "minmax", bits=bits, symmetric=symmetric)[:2]}
    for p in _PERCENTILES:
        out[f"p{p:g}"] = choose_range(stats, "percentile", bits=bits, symmetric=symmetric, percentile=p)[:2]
    out["mse"] = choose_range(stats, "mse", bits=bits, symmetric=symmetric)[:2]
    lo, hi = out["minmax"]
    for f in CANDIDATE_SHRINK:
        out[f"x{f:g}"] = (lo * f, hi * f)
    unique: dict[tuple[float, float], str] = {}
    for name, (lo, hi) in out.items():
        unique.setdefault((round(lo, 7), round(hi, 7)), name)
    return {name: out[name] for name in unique.values()}


def output_error_ranges(
    model: onnx.ModelProto,
    histograms: StatsCollector,
    batches: Iterable[dict],
    *,
    tensors: Collection[str] | None = None,
    bits: int = 8,
    weight_bits: int = 8,
    symmetric: bool = True,
    rows: int = 64,
) -> dict[str, RangeChoice]:
    """{source value: the candidate range of least reader output error}; `tensors` limits the values
    decided (default: every MAC input source the histograms know). Each sample contributes `rows` rows
    (tokens) of each reader's input, evenly strided: the error of X @ W is a sum over rows."""
    sources = {s: r for s, r in mac_input_sources(model).items()
               if s in histograms and (tensors is None or s in tensors)}
    if not sources:
        return {}
    inits = {i.name for i in model.graph.initializer}
    weights, names = {}, set()
    for source, readers in sources.items():
        kept = []
        for node, slot in readers:
            weights[node.name] = _weight(model, node, weight_bits) if slot == 0 else None
            if weights[node.name] is None and node.input[1 - slot] in inits:
                continue  # a constant first operand: not a layout this scores
            names.add(node.input[slot])
            if weights[node.name] is None:
                names.add(node.input[1 - slot])
            kept.append((node, slot))
        sources[source] = kept
    sources = {s: r for s, r in sources.items() if r}
    cands = {s: _candidates(histograms[s], bits, symmetric) for s in sources}
    names = sorted(names)
    session = make_session(expose_outputs(model, names, replace=True), optimize=False)
    # Many small matmuls: one BLAS thread (several oversubscribe a shared machine: measured 5x slower).
    with threadpool_limits(limits=1, user_api="blas"):
        noise, signal = _score(session, batches, sources, cands, weights, bits, symmetric, rows)
    chosen = {}
    for source, errs in noise.items():
        best = min(errs, key=lambda n: (errs[n], n))
        lo, hi = cands[source][best]
        chosen[source] = RangeChoice(float(lo), float(hi), best, _db(signal[source], errs[best]),
                                     _db(signal[source], errs["minmax"]))
    return chosen


def _score(session, batches, sources, cands, weights, bits: int, symmetric: bool, rows: int):
    """Streamed squared output errors {source: {candidate: sum}} and output energies {source: sum}."""
    noise = {s: dict.fromkeys(c, 0.0) for s, c in cands.items()}
    signal = dict.fromkeys(sources, 0.0)
    index = {o.name: i for i, o in enumerate(session.get_outputs())}
    for batch in batches:
        values = session.run(None, batch)
        for source, readers in sources.items():
            for node, slot in readers:
                x = values[index[node.input[slot]]].astype(np.float32)
                found = weights.get(node.name)
                if found is not None:  # X @ Wq against X @ W
                    wq, w = found
                    x2 = _strided_rows(x.reshape(-1, x.shape[-1]), rows)
                    ref = x2 @ w
                    fixed = x2 @ wq - ref
                    signal[source] += float(np.vdot(ref, ref))
                    for name, (lo, hi) in cands[source].items():
                        err = (_fake_quant(x2, lo, hi, bits, symmetric) - x2) @ wq + fixed
                        noise[source][name] += float(np.vdot(err, err))
                    continue
                other = values[index[node.input[1 - slot]]].astype(np.float32)
                if slot == 0:  # rows of the left operand: the output rows they make
                    x = _strided_rows(x, rows, axis=-2)
                else:
                    other = _strided_rows(other, rows, axis=-2)
                ref = x @ other if slot == 0 else other @ x
                signal[source] += float(np.vdot(ref, ref))
                for name, (lo, hi) in cands[source].items():
                    d = _fake_quant(x, lo, hi, bits, symmetric) - x
                    err = d @ other if slot == 0 else other @ d
                    noise[source][name] += float(np.vdot(err, err))
    return noise, signal


def _strided_rows(x: np.ndarray, rows: int, axis: int = 0) -> np.ndarray:
    n = x.shape[axis]
    if n <= rows:
        return x
    return np.take(x, np.arange(0, n, -(-n // rows)), axis=axis)


def _db(signal: float, noise: float) -> float:
    return 10 * np.log10(max(signal, 1e-30) / max(noise, 1e-30))
