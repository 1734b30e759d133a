"""Residual-stream equalization: one per-channel scale for every tensor a chain of residual Adds joins.

Cross-layer equalization leaves a residual block's ends alone: the tensor between a block's projection and
the next block is read by an Add too, and `fold.plan_fold` refuses it. In an inverted-residual CNN
(MobileNetV2, EfficientNet, MobileNetV3) that tensor is the *stream*: x1 = x0 + f1(x0), x2 = x1 + f2(x1),
... Its channels differ in range by one to two decades, and every block's expand convolution reads it at
per-tensor int8: the quiet channels round to a few levels (MobileNetV2 A8W8: per-channel scales on the
stream's int8 pairs alone would add about 1.2 dB of logit SQNR, `scripts/activation_noise.py`).

The whole stream can take one scale s per channel without a new op, because an Add commutes with it:
every weight layer whose output enters the stream (each block's projection, the stage's first block)
divides its output channel c (and bias) by s_c, every weight layer that reads a stream tensor multiplies
its input channel c by s_c, and the Adds (and Relu/Identity between them, as in ResNets) pass X / s on.
The float function is unchanged up to rounding. A stream that anything else reads (a pooling head, a
Concat, a graph output) or that enters from something other than a fold site is left alone, with the
reason in the report.

Choosing s: three per-tensor grids meet on each channel: the stream's activations (range a_c, over every
stream tensor on the calibration data), the readers' input columns (q_c) and the writers' output rows
(p_c). Each grid wants its channels level: the activations and the writers want s_c proportional to a_c
and p_c, the readers want s_c proportional to 1 / q_c. log s_c is the mean of log a_c, log p_c and
-log q_c weighted by `activations`, `writers` and `readers` (default 1, 0, 1: activation resolution
traded evenly for the readers' weight resolution, as SmoothQuant's alpha = 0.5), normalized to a
geometric mean of 1 and bounded like equalization's scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from pydantic import Field, model_validator

from ...core.editable import Editable
from ..statistics import ChannelStats
from .base import Transform, TransformConfig, TransformContext, register_transform
from .fold import FoldPlan, NotFoldable, plan_site
from .layers import weight_layer
from .smoothquant import SCALE_LIMITS

__all__ = ["ResidualEqualization", "Stream", "find_streams"]

# Ops inside a stream: channel-wise positively homogeneous (f(x / s) = f(x) / s for s > 0), same shape.
_PASS_THROUGH = frozenset({"Relu", "LeakyRelu", "Identity"})


class ResidualEqualizationConfig(TransformConfig):
    # How much each grid's levelling counts (see the module docstring); at least one must count.
    activations: float = Field(1.0, ge=0.0)
    readers: float = Field(1.0, ge=0.0)
    writers: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _some_weight(self) -> "ResidualEqualizationConfig":
        if self.activations + self.readers + self.writers <= 0:
            raise ValueError("at least one of activations, readers, writers must be above 0")
        return self


@dataclass
class Stream:
    """The tensors one chain of residual Adds joins, who writes them and who reads them."""

    tensors: list[str]
    axis: int
    channels: int
    writers: list[FoldPlan] = field(default_factory=list)  # one per tensor entering the stream
    readers: list[onnx.NodeProto] = field(default_factory=list)  # weight layers reading a stream tensor
    members: list[onnx.NodeProto] = field(default_factory=list)  # the Adds and pass-through ops

    @property
    def name(self) -> str:
        return self.tensors[-1]


def _residual_adds(graph: Editable) -> list[onnx.NodeProto]:
    """Adds of two computed tensors of the output's shape (no broadcast): the joins of residual blocks."""
    adds = []
    for node in graph.model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2 or any(i in graph.inits for i in node.input):
            continue
        shape = graph.shape(node.output[0])
        if shape is not None and all(graph.shape(i) == shape for i in node.input):
            adds.append(node)
    return adds


def _groups(graph: Editable) -> list[tuple[list[str], list[onnx.NodeProto]]]:
    """Tensors joined by residual Adds (and the Relu/Identity ops between them), with those ops, in graph
    order: union-find over tensor names."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    members = _residual_adds(graph)
    for node in members:
        union(node.input[0], node.output[0])
        union(node.input[1], node.output[0])
    # A pass-through op whose input is in a stream carries the stream on (a ResNet's Relu after its Add).
    for node in graph.model.graph.node:
        if node.op_type in _PASS_THROUGH and node.input[0] in parent and graph.shape(node.output[0]) == graph.shape(node.input[0]):
            union(node.input[0], node.output[0])
            members.append(node)
    order = {}
    for node in graph.model.graph.node:
        for name in (*node.input, *node.output):
            if name in parent:
                order.setdefault(name, len(order))
    grouped: dict[str, tuple[list[str], list[onnx.NodeProto]]] = {}
    for name in sorted(parent, key=lambda n: order.get(n, len(order))):
        grouped.setdefault(find(name), ([], []))[0].append(name)
    for node in members:
        grouped[find(node.output[0])][1].append(node)
    return list(grouped.values())


def find_streams(graph: Editable) -> tuple[list[Stream], list[dict]]:
    """Every residual stream that can take a per-channel scale, and the refused ones with their reason."""
    streams, refused = [], []
    for tensors, ops in _groups(graph):
        try:
            streams.append(_plan_stream(graph, tensors, ops))
        except NotFoldable as why:
            refused.append({"tensor": tensors[-1], "tensors": len(tensors), "reason": str(why)})
    return streams, refused


def _plan_stream(graph: Editable, tensors: list[str], ops: list[onnx.NodeProto]) -> Stream:
    member_ids = {id(n) for n in ops}
    shapes = {graph.shape(t) for t in tensors}
    if None in shapes or len(shapes) != 1:
        raise NotFoldable("static shapes unknown or not all alike")
    shape = shapes.pop()
    readers, axes = [], set()
    for tensor in tensors:
        if tensor in graph.outputs:
            raise NotFoldable(f"'{tensor}' is a graph output")
        for node in graph.consumers.get(tensor, []):
            if id(node) in member_ids:
                continue
            layer = weight_layer(graph, node)
            if layer is None or node.input[0] != tensor:
                raise NotFoldable(f"'{tensor}' is read by {node.op_type} '{node.name}', which has no weight to absorb a scale")
            if all(r is not node for r in readers):
                readers.append(node)
            axes.add(layer.activation_axis % len(shape))
    if not readers:
        raise NotFoldable("no weight layer reads the stream")
    if len(axes) != 1:
        raise NotFoldable("readers disagree on the channel axis")
    axis = axes.pop()
    stream = Stream(tensors, axis, shape[axis], readers=readers, members=ops)
    produced_inside = {o for n in ops for o in n.output}
    for tensor in tensors:
        if tensor in produced_inside:
            continue
        writer = plan_site(graph, tensor, axis)  # no Clip on the way: it would bound s
        if weight_layer(graph, writer.site) is None:
            # A LayerNorm or Mul site would take the scale too; in a CNN stream it is not expected, and a
            # weight layer's rows are what `writers` balances.
            raise NotFoldable(f"'{tensor}' is made by {writer.site.op_type} '{writer.site.name}', not a weight layer")
        stream.writers.append(writer)
    if not stream.writers:
        raise NotFoldable("no weight layer writes the stream")
    return stream


@register_transform
class ResidualEqualization(Transform):
    name = "residual_equalization"
    Config = ResidualEqualizationConfig

    def requests(self, graph: Editable) -> dict[str, tuple[int, int]]:
        streams, _ = find_streams(graph)
        return {t: (len(graph.shape(t)), s.axis) for s in streams for t in s.tensors}

    def apply(self, graph: Editable, stats: dict[str, ChannelStats], ctx: TransformContext) -> set[str]:
        streams, self.skipped = find_streams(graph)
        stale: set[str] = set()
        for stream in streams:
            if any(t not in stats for t in stream.tensors):
                self.skipped.append({"tensor": stream.name, "reason": "no calibration statistics of the stream"})
                continue
            a = np.max([stats[t].absmax for t in stream.tensors], axis=0).astype(np.float64)
            q = np.max([weight_layer(graph, n).input_ranges() for n in stream.readers], axis=0)
            p = np.max([w.site_weight_range(graph) for w in stream.writers], axis=0)
            s = self.scales(a, p, q)
            for node in stream.readers:
                layer = weight_layer(graph, node)
                layer.set_weight(graph, layer.scaled_inputs(s), "streq")
            for writer in stream.writers:
                writer.apply(graph, s, "streq")
                stale.update(writer.path)
            for tensor in stream.tensors:
                stats[tensor] = stats[tensor].rescaled(s)
            stale.update(stream.tensors)
            self.applied.append({
                "tensor": stream.name,
                "tensors": len(stream.tensors),
                "writers": [w.site.name for w in stream.writers],
                "readers": [n.name for n in stream.readers],
                # Per-tensor int8 resolution of the stream's quietest channel: its range over the largest.
                "worst_channel_share_before": _share(a),
                "worst_channel_share_after": _share(a / s),
            })
        return stale

    def scales(self, a: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Per channel, the weighted mean in log space of what each grid asks for (a_c, p_c, 1 / q_c),
        with a geometric mean of 1 over the channels; a dead channel (any range 0) keeps s = 1."""
        c = self.config
        live = (a > 0) & (p > 0) & (q > 0)
        log_s = np.zeros_like(a)
        log_s[live] = (c.activations * np.log(a[live]) + c.writers * np.log(p[live]) - c.readers * np.log(q[live])) \
            / (c.activations + c.writers + c.readers)
        if live.any():
            log_s[live] -= log_s[live].mean()
        return np.clip(np.exp(log_s), *SCALE_LIMITS)

    def report(self) -> dict:
        c = self.config
        return {"weights": {"activations": c.activations, "readers": c.readers, "writers": c.writers},
                **super().report()}


def _share(r: np.ndarray) -> float:
    live = r[r > 0]
    return float(live.min() / live.max()) if live.size else 1.0
