"""Outlier channel split: the few input channels that carry a layer's outliers get their own small MatMul.

Transformers keep a handful of embedding dimensions for huge values (Bondarenko et al., 2021; Dettmers
et al., 2022 "LLM.int8()"): MiniLM's FFN down projections read, in layers 0-3, one channel that is ~25
on the [CLS] token and small elsewhere, and the *same* row of the weight holds the matrix's largest
weight (7.9 among values of std 0.045). Per-tensor int8 on both sides cannot carry that product (about
19 dB of output SQNR), and SmoothQuant cannot help: moving the scale from one side to the other leaves
one of them with the outlier. Splitting the channel out does:

    X -+-> Mul(mask) -> X' -> MatMul(W with rows J zeroed)  -+-> Add -> Y      (int8 x int8)
       +-> Slice(J) [-> Concat] -> X_J -> MatMul(W[J, :]) --+                  (16-bit x int8, k x N MACs)

`mask` is 1 except 0 at the split channels J, so X' has no outlier and the main weight's range no longer
holds the outlier row: both quantize well at int8. The side MatMul reads the k split channels at 16
bits: k/K of the layer's MACs (2/1536 in MiniLM's FFN), counted 16-bit. Channels are chosen per
activation X shared by its weight layers (Q/K/V read one X), by the score max|x_j| * max_readers max|w_j|
against the median score (`ratio`), at most `channels` of them. The float function is unchanged.

The rewrite needs X and X_J at 16 bits (their readers are a Mul and the side MatMuls) and the side
MatMuls reading 16 bits: the transform says so (`promote16`, `wide_nodes`), and the quantizer follows.
SmoothQuant, if it runs after, folds its 1/s into the mask (a Mul by a constant is a fold site).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import Field

from ...core.editable import Editable
from ..statistics import ChannelStats
from .base import Transform, TransformConfig, TransformContext, register_transform
from .layers import weight_inputs

__all__ = ["OutlierSplit", "choose_channels"]


class OutlierSplitConfig(TransformConfig):
    # At most this many channels split out per activation.
    channels: int = Field(2, ge=1, le=64)
    # A channel is an outlier when its score is at least `ratio` times the median score.
    ratio: float = Field(16.0, gt=1)


def choose_channels(x_max: np.ndarray, w_max: np.ndarray, channels: int, ratio: float) -> list[int]:
    """The split channels: largest scores max|x_j| * max|w_j| first, those >= ratio x median, at most `channels`."""
    score = np.asarray(x_max, np.float64) * np.asarray(w_max, np.float64)
    median = float(np.median(score))
    if not np.isfinite(median) or median <= 0:
        return []
    order = np.argsort(-score, kind="stable")[:channels]
    return sorted(int(j) for j in order if score[j] >= ratio * median)


@register_transform
class OutlierSplit(Transform):
    name = "outlier_split"
    Config = OutlierSplitConfig
    ops = frozenset({"MatMul", "Gemm"})

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.promote16: set[str] = set()
        self.wide_nodes: set[str] = set()

    def _candidates(self, graph: Editable) -> dict[str, list[onnx.NodeProto]]:
        found = {}
        for tensor, readers in weight_inputs(graph, self.ops).items():
            shape = graph.shape(tensor)
            if shape is None:
                self.skipped.append({"tensor": tensor, "reason": "static shape unknown"})
            elif any(graph.input_channel_axis(n) != -1 for n in readers):
                self.skipped.append({"tensor": tensor, "reason": "a reader's channels are not on the last axis"})
            else:
                found[tensor] = readers
        return found

    def requests(self, graph: Editable) -> dict[str, tuple[int, int]]:
        self.skipped = []
        return {t: (len(graph.shape(t)), -1) for t in self._candidates(graph)}

    def apply(self, graph: Editable, stats: dict[str, ChannelStats], ctx: TransformContext) -> set[str]:
        self.skipped = []
        changed: set[str] = set()
        for tensor, readers in self._candidates(graph).items():
            if tensor not in stats:
                continue
            w_max = np.max([np.abs(_rows(graph, n)).max(axis=1) for n in readers], axis=0)
            chosen = choose_channels(stats[tensor].absmax, w_max, self.config.channels, self.config.ratio)
            if not chosen:
                continue
            changed |= self._split(graph, tensor, readers, chosen, stats[tensor].absmax)
        return changed

    def report(self) -> dict:
        return {"channels": self.config.channels, "ratio": self.config.ratio, **super().report()}

    def _split(self, graph: Editable, tensor: str, readers: list[onnx.NodeProto], chosen: list[int],
               x_max: np.ndarray) -> set[str]:
        shape = list(graph.shape(tensor))
        k_in = shape[-1]
        mask = np.ones(k_in, np.float32)
        mask[chosen] = 0.0
        new_nodes: list[onnx.NodeProto] = []
        masked = _fresh_value(graph, f"{tensor}_main", shape)
        new_nodes.append(helper.make_node("Mul", [tensor, _const(graph, f"{tensor}_split_mask", mask)], [masked],
                                          name=graph.names.fresh(f"{tensor}_split_mask_mul")))
        parts = []
        for start, stop in _runs(chosen):
            part = _fresh_value(graph, f"{tensor}_split_{start}", shape[:-1] + [stop - start])
            consts = [_const(graph, f"{tensor}_split_{start}_{key}", np.array([v], np.int64))
                      for key, v in (("starts", start), ("ends", stop), ("axes", len(shape) - 1))]
            new_nodes.append(helper.make_node("Slice", [tensor, *consts], [part], name=graph.names.fresh(f"{part}_slice")))
            parts.append(part)
        side_in = parts[0]
        if len(parts) > 1:
            side_in = _fresh_value(graph, f"{tensor}_split", shape[:-1] + [len(chosen)])
            new_nodes.append(helper.make_node("Concat", parts, [side_in], axis=-1,
                                              name=graph.names.fresh(f"{side_in}_concat")))
        _insert_after(graph, graph.producer.get(tensor), new_nodes)
        self.promote16 |= {tensor, side_in, *parts}
        changed = {masked, side_in, *parts}
        for node in readers:
            changed |= self._split_reader(graph, node, masked, side_in, chosen)
        self.applied.append({
            "tensor": tensor, "consumers": [n.name for n in readers], "channels": chosen,
            "channel_max": [float(x_max[j]) for j in chosen],
            "rest_max": float(np.delete(x_max, chosen).max()) if len(chosen) < k_in else 0.0,
        })
        return changed

    def _split_reader(self, graph: Editable, node: onnx.NodeProto, masked: str, side_in: str,
                      chosen: list[int]) -> set[str]:
        w = _rows(graph, node)  # (K, N)
        side_w, main_w = w[chosen], w.copy()
        main_w[chosen] = 0.0
        transposed = node.op_type == "Gemm" and graph.attr(node, "transB", 0)
        graph.set_input_const(node, 1, main_w.T if transposed else main_w, "split_main")
        old = node.input[0]
        node.input[0] = masked
        graph.consumers[old] = [n for n in graph.consumers.get(old, []) if n is not node]
        graph.consumers.setdefault(masked, []).append(node)
        out = node.output[0]
        out_shape = list(graph.shape(out))
        main_out = _fresh_value(graph, f"{out}_main", out_shape)
        side_out = _fresh_value(graph, f"{out}_side", out_shape)
        node.output[0] = main_out
        graph.producer[main_out] = node
        side = helper.make_node("MatMul", [side_in, _const(graph, f"{node.name}_split_weight", side_w)], [side_out],
                                name=graph.names.fresh(f"{node.name}_split_side"))
        add = helper.make_node("Add", [main_out, side_out], [out], name=graph.names.fresh(f"{node.name}_split_add"))
        _insert_after(graph, node, [side, add])
        self.wide_nodes.add(side.name)
        return {main_out, side_out}


def _rows(graph: Editable, node: onnx.NodeProto) -> np.ndarray:
    """The weight as (input channels, output channels)."""
    w, axis = graph.weight(node)
    return w if axis == 0 else w.T


def _runs(chosen: list[int]) -> list[tuple[int, int]]:
    """Contiguous [start, stop) runs of sorted channel indices (one Slice each)."""
    runs: list[list[int]] = []
    for j in chosen:
        if runs and runs[-1][1] == j:
            runs[-1][1] = j + 1
        else:
            runs.append([j, j + 1])
    return [(a, b) for a, b in runs]


def _const(graph: Editable, base: str, value: np.ndarray) -> str:
    name = graph.names.fresh(base)
    tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
    graph.model.graph.initializer.append(tensor)
    graph.inits[name] = graph.model.graph.initializer[-1]
    return name


def _fresh_value(graph: Editable, base: str, shape: list[int]) -> str:
    """A new float activation with a declared shape (statistics find activations through value_info)."""
    name = graph.names.fresh(base)
    graph.model.graph.value_info.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
    graph.shapes[name] = tuple(shape)
    return name


def _insert_after(graph: Editable, anchor: onnx.NodeProto | None, new_nodes: list[onnx.NodeProto]) -> None:
    """Insert `new_nodes` after `anchor` (at the start for a graph input) and index them in `graph`."""
    nodes = graph.model.graph.node
    index = 0 if anchor is None else next(i for i, n in enumerate(nodes) if n is anchor) + 1
    for offset, node in enumerate(new_nodes):
        nodes.insert(index + offset, node)
        node = nodes[index + offset]
        for name in node.output:
            graph.producer[name] = node
        for name in node.input:
            if name:
                graph.consumers.setdefault(name, []).append(node)
