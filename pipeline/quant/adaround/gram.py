"""Streamed second moments of each layer's input and its float target: what AdaRound's loss needs, in
memory that does not grow with the data.

For a layer y = W x (per group: W [M, K], x a fan-in vector of K), the reconstruction error of a rounded
weight W' over rows (x~, t) is sum ||W' x~ - t||^2 = tr(W' G W'^T) - 2 tr(W' P) + c with G = sum x~ x~^T,
P = sum x~ t^T, c = sum ||t||^2. Here x~ is the layer's input *in the quantized model* (upstream
quantization error included) and t = W x the float layer's output without its bias *in the float model*
(AdaRound's asymmetric reconstruction). One calibration sample at a time: both models run with the
layer inputs / outputs exposed, a deterministic subsample of output positions is taken per layer (im2col
at those positions only for a Conv), and G, P, c, the sums of x~ and t and the row count accumulate.
Memory per layer: group x K x K (+ K x M), whatever the number of samples.

When a layer will see fewer rows than its fan-in (a classifier Gemm after global pooling: one row per
sample, K = 1280), the rows themselves are kept instead (at most K of them, so still bounded), and the
solver works on them: cheaper than a K x K Gram matrix and exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx

from ...core.onnx_io import expose_outputs, make_session
from .layers import QuantLayer

__all__ = ["LayerMoments", "collect_moments", "empty_moments", "add_sample"]


@dataclass
class LayerMoments:
    """Per group g: G [g, K, K] (or rows X [g, n, K] and targets T [g, n, M] when few), P [g, K, M], c,
    sums of x~ [g, K] and of t [g, M], and n rows."""

    gram: np.ndarray | None
    cross: np.ndarray | None
    rows: list | None
    targets: list | None
    sum_x: np.ndarray
    sum_t: np.ndarray
    sum_tt: float
    n: int = 0
    flush_rows: int = 1024
    _buffer: list = field(default_factory=list)

    @classmethod
    def empty(cls, groups: int, fan_in: int, per_group_out: int, keep_rows: bool) -> "LayerMoments":
        shape_g, shape_p = (groups, fan_in, fan_in), (groups, fan_in, per_group_out)
        return cls(
            None if keep_rows else np.zeros(shape_g), None if keep_rows else np.zeros(shape_p),
            [] if keep_rows else None, [] if keep_rows else None,
            np.zeros((groups, fan_in)), np.zeros((groups, per_group_out)), 0.0,
            flush_rows=max(fan_in, 1024),
        )

    def add(self, x: np.ndarray, t: np.ndarray) -> None:
        """x [g, r, K], t [g, r, M] (float64)."""
        if self.rows is not None:
            self.rows.append(x.astype(np.float32))
            self.targets.append(t.astype(np.float32))
        else:
            self._buffer.append((x.astype(np.float32), t.astype(np.float32)))
            if sum(b[0].shape[1] for b in self._buffer) >= self.flush_rows:
                self._flush()
        self.sum_x += x.sum(axis=1)
        self.sum_t += t.sum(axis=1)
        self.sum_tt += float((t * t).sum())
        self.n += x.shape[1]

    def _flush(self) -> None:
        """float32 products of the buffered rows (one large BLAS product), summed into float64."""
        if not self._buffer:
            return
        x = np.concatenate([b[0] for b in self._buffer], axis=1)
        t = np.concatenate([b[1] for b in self._buffer], axis=1)
        self._buffer.clear()
        xt = np.swapaxes(x, 1, 2)
        if x.shape[0] == 1:  # dense: one large BLAS product on a contiguous transpose
            xt = np.ascontiguousarray(xt)
        self.gram += np.matmul(xt, x)
        self.cross += np.matmul(xt, t)

    def finish(self) -> None:
        self._flush()
        if self.rows is not None:
            self.rows = np.concatenate(self.rows, axis=1)
            self.targets = np.concatenate(self.targets, axis=1)


def _positions(total: int, keep: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(total) if total <= keep else np.sort(rng.choice(total, keep, replace=False))


def _conv_rows(layer: QuantLayer, x: np.ndarray, y_shape: tuple, keep: int, rng) -> tuple[np.ndarray, tuple]:
    """im2col of x [N, C, H...] at `keep` sampled output positions: ([g, r, K], index of those positions)."""
    c = layer.conv
    k, strides, dil = c["kernel"], c["strides"], c["dilations"]
    dims = len(k)
    pads = c["pads"]
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + dims]) for i in range(dims)])
    out_spatial = y_shape[2:]
    flat = _positions(y_shape[0] * int(np.prod(out_spatial)), keep, rng)
    where = np.unravel_index(flat, (y_shape[0], *out_spatial))
    batch = where[0]
    index = [batch[:, None]]  # gather padded[n, :, i0 + a*d0, i1 + b*d1, ...] -> [r, C, k...]
    for axis in range(dims):
        taps = where[axis + 1][:, None] * strides[axis] + np.arange(k[axis])[None, :] * dil[axis]
        shape = [len(flat)] + [1] * dims
        shape[axis + 1] = k[axis]
        index.append(taps.reshape(shape))
    index[0] = batch.reshape([len(flat)] + [1] * dims)
    moved = np.moveaxis(padded, 1, -1)  # [N, H..., C]
    patches = moved[tuple(index)]  # [r, k..., C]
    patches = np.moveaxis(patches, -1, 1)  # [r, C, k...]
    r = patches.shape[0]
    grouped = patches.reshape(r, layer.group, -1).transpose(1, 0, 2)
    return grouped, where


def _layer_rows(layer: QuantLayer, x: np.ndarray, y: np.ndarray, keep: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(x~ rows [g, r, K], targets t [g, r, M]) of one sample."""
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    if layer.op == "Conv":
        rows, where = _conv_rows(layer, x, y.shape, keep, rng)
        t = np.moveaxis(y, 1, -1)[where]  # [r, O]
    else:
        flat_x = x.reshape(-1, x.shape[-1])
        flat_y = y.reshape(-1, y.shape[-1])
        pick = _positions(len(flat_x), keep, rng)
        rows, t = flat_x[pick][None], flat_y[pick]
    if layer.bias_float is not None:
        t = t - layer.bias_float
    t = t.reshape(t.shape[0], layer.group, -1).transpose(1, 0, 2)
    return rows, t


def rows_per_sample(layer: QuantLayer, shape: list[int] | None, positions: int, samples: int, per_fan_in: int) -> int:
    """Output positions sampled per sample: enough for `per_fan_in` rows per fan-in element over all
    samples (a 3x3 depthwise layer, fan-in 9, needs far fewer than a 1x1 conv of fan-in 960), at least
    one, at most `positions` and the positions there are."""
    fan_in = layer.grouped(layer.w_float).shape[2]
    wanted = max(1, -(-per_fan_in * fan_in // max(samples, 1)))
    if shape is not None:
        spatial = int(np.prod(shape[:-1])) if layer.op != "Conv" else int(np.prod([shape[0], *shape[2:]]))
        wanted = min(wanted, spatial)
    return min(wanted, positions)


def empty_moments(
    layers: list[QuantLayer], *, samples: int, positions: int, output_shapes: dict[str, list[int]] | None = None,
    per_fan_in: int = 16,
) -> tuple[dict[str, LayerMoments], dict[str, int]]:
    """({layer name: empty moments}, {layer name: output positions kept per sample})."""
    shapes = output_shapes or {}
    moments: dict[str, LayerMoments] = {}
    keep = {}
    for layer in layers:
        fan_in = layer.grouped(layer.w_float).shape[2]
        keep[layer.name] = rows_per_sample(layer, shapes.get(layer.output), positions, samples, per_fan_in)
        few = samples * keep[layer.name] < fan_in
        moments[layer.name] = LayerMoments.empty(layer.group, fan_in, layer.n_out // layer.group, few)
    return moments, keep


def add_sample(moments: dict[str, LayerMoments], keep: dict[str, int], layers: list[QuantLayer], index: int,
               xs: list[np.ndarray], ys: list[np.ndarray], seed: int = 0) -> None:
    """Sample `index`'s rows into each layer's moments: xs its inputs, ys its float outputs, per layer."""
    for number, (layer, x, y) in enumerate(zip(layers, xs, ys)):
        rng = np.random.default_rng([seed, index, number])
        moments[layer.name].add(*_layer_rows(layer, x, y, keep[layer.name], rng))


def collect_moments(
    qmodel: onnx.ModelProto, float_model: onnx.ModelProto, layers: list[QuantLayer], batches: Iterable[dict],
    *, samples: int, positions: int, output_shapes: dict[str, list[int]] | None = None, seed: int = 0,
    quantized_inputs: bool = True, per_fan_in: int = 16,
) -> dict[str, LayerMoments]:
    """One streamed pass over at most `samples` batches: {layer name: its moments}. `quantized_inputs`
    False: the layer inputs come from the float model too (every layer then judged on its own rounding
    alone, and only the float model runs)."""
    qsession = None
    wanted = [l.output for l in layers]
    q_exposed = list(dict.fromkeys(l.input for l in layers))  # two layers may read one DQ output
    q_position = {name: i for i, name in enumerate(q_exposed)}
    if quantized_inputs:
        qsession = make_session(expose_outputs(qmodel, q_exposed, replace=True),
                                npu_emulation=True)
    else:
        wanted += [l.float_input for l in layers]
    exposed = list(dict.fromkeys(wanted))  # a layer's input may be another layer's output
    fsession = make_session(expose_outputs(float_model, exposed, replace=True), optimize=False)
    position = {name: i for i, name in enumerate(exposed)}
    moments, keep = empty_moments(layers, samples=samples, positions=positions, output_shapes=output_shapes,
                                  per_fan_in=per_fan_in)
    f_inputs = {i.name for i in fsession.get_inputs()}
    q_inputs = {i.name for i in qsession.get_inputs()} if qsession is not None else set()
    for index, batch in enumerate(batches):
        if index >= samples:
            break
        values = fsession.run(None, {k: v for k, v in batch.items() if k in f_inputs})
        ys = [values[position[l.output]] for l in layers]
        if qsession is not None:
            q_values = qsession.run(None, {k: v for k, v in batch.items() if k in q_inputs})
            xs = [q_values[q_position[l.input]] for l in layers]
        else:
            xs = [values[position[l.float_input]] for l in layers]
        add_sample(moments, keep, layers, index, xs, ys, seed)
    for m in moments.values():
        m.finish()
    return moments
