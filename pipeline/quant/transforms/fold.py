"""Per-channel rescaling of an activation, folded into the constants on both sides of it.

`plan_fold(graph, tensor)` answers: can the activation `tensor` (the input X of one or more weight layers:
MatMul, Gemm, Conv, ConvTranspose, grouped and depthwise ones included) be replaced by X / s, per input
channel, without adding an op? The consumers take the scale in their weights (input channel c times s_c,
`layers.WeightLayer`), so their outputs are unchanged; upstream, X is traced back to a *fold site*, an op
whose output channels a constant scales: a weight layer (output channels and bias / s), a Mul by a
constant, or a LayerNormalization (gamma and beta / s).
Between the site and X the path may hold:

- Reshape, Flatten, Squeeze, Unsqueeze, Transpose: channels are permuted, not mixed;
- Relu, LeakyRelu, MaxPool, AveragePool, GlobalAveragePool, Identity: positively homogeneous per channel,
  so f(x / s) = f(x) / s for s > 0;
- Add of a per-channel constant (a bias: scaled too);
- Pad (constant mode, spatial axes): with the value 0 for any scales; with another value (bias
  absorption's shifted zero) only for one scale common to all channels (`uniform=True`: power-of-two
  alignment), the value scaled with it;
- Clip, only when the caller asks (`through_clip=True`): Clip(x / s, lo, hi) equals Clip(x, lo, hi) / s
  only where x stays inside [lo, hi] and [lo s, hi s] alike, so the plan lists the Clips (`FoldPlan.clips`)
  and the caller bounds s per channel from their calibration statistics (see `equalize`);
- MatMul(A, B) with the path through B (attention's P @ V): output column n is a mix of B's column n only.

Which site channel lands on which input channel of the consumer is found by pushing an array of channel
labels backwards through the path's shape ops (no op-specific index algebra to get wrong), and the fold is
refused unless that gives one consistent bijection. Every tensor on the path changes value (by 1/s per
channel), so its calibration statistics go stale: `FoldPlan.path` lists them.

Not foldable (refused with a reason): a tensor on the path read by anything else (the residual Add that
also reads a post-LN BERT's LayerNorm output), a graph input or output, any other op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ...core.editable import Editable
from ...core.ops import is_constant_pad
from .layers import weight_layer

__all__ = ["FoldPlan", "plan_fold", "plan_site", "NotFoldable"]

_RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "Identity"})
_POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool"})


class NotFoldable(Exception):
    """Internal: why a tensor's channels cannot be rescaled without new ops (reported, never raised out)."""


@dataclass
class FoldPlan:
    """How to rescale the channels of `tensor` (the input of `consumers`) by 1/s."""

    tensor: str
    consumers: list[onnx.NodeProto]
    site: onnx.NodeProto
    # site_map[c] = the consumer input channel that site output channel c becomes.
    site_map: np.ndarray
    site_axis: int = -1  # output-channel axis of the site's output
    path: list[str] = field(default_factory=list)  # tensors whose values change (site output ... tensor)
    _biases: list[tuple[onnx.NodeProto, int, np.ndarray]] = field(default_factory=list)  # (node, slot, labels)
    # Clips on the path: (node, channel axis of its output, clip_map: consumer channel of each Clip channel).
    clips: list[tuple[onnx.NodeProto, int, np.ndarray]] = field(default_factory=list)
    # Pads on the path whose value is not 0 (bias absorption's shifted zero): exact only for one scale
    # common to all channels, which `apply` then divides the value by (`plan_fold(..., uniform=True)`).
    pads: list[onnx.NodeProto] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return len(self.site_map)

    def site_weight_range(self, graph: Editable) -> np.ndarray | None:
        """max |W| per output channel of a weight-layer site, in consumer channel order (CLE's r1)."""
        layer = weight_layer(graph, self.site)
        if layer is None:
            return None
        per_site = layer.output_ranges()
        out = np.empty_like(per_site)
        out[self.site_map] = per_site
        return out

    def apply(self, graph: Editable, s: np.ndarray, tag: str) -> None:
        """Make `tensor` equal X / s (s > 0, one per consumer input channel); consumers' outputs unchanged."""
        s = np.asarray(s, dtype=np.float64)
        if s.shape != (self.channels,) or not np.all(np.isfinite(s)) or not np.all(s > 0):
            raise ValueError(f"fold {self.tensor}: need {self.channels} finite positive scales")
        for node in self.consumers:  # W input channels * s
            weight_layer(graph, node).set_weight(graph, weight_layer(graph, node).scaled_inputs(s), tag)
        site_s = s[self.site_map]  # per site output channel
        _scale_site(graph, self.site, site_s, self.site_axis, tag)
        for node, slot, labels in self._biases:
            value = graph.const(node.input[slot])
            graph.set_input_const(node, slot, value / s[labels], tag)
        if self.pads:
            if not np.allclose(s, s[0], rtol=1e-12, atol=0):
                raise ValueError(f"fold {self.tensor}: a Pad with a non-zero value on the path takes one scale only")
            for node in self.pads:
                graph.set_input_const(node, 2, graph.const(node.input[2]) / s[0], tag)


def _along(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _per_channel(labels: np.ndarray, axis: int) -> np.ndarray:
    """The label vector along `axis`; raises unless labels do not vary along any other axis."""
    moved = np.moveaxis(labels, axis, -1)
    vec = moved.reshape(-1, moved.shape[-1])
    if not np.all(vec == vec[:1]):
        raise NotFoldable("channels are mixed with other axes on the way")
    return vec[0]


def _const_operand(graph: Editable, node: onnx.NodeProto) -> tuple[int, int] | None:
    """(slot of the constant, slot of the dynamic input) for a binary op with one float constant."""
    a, b = (graph.const(node.input[0]) is not None), (graph.const(node.input[1]) is not None)
    if a == b:
        return None
    return (0, 1) if a else (1, 0)


def _broadcast_labels(graph: Editable, node: onnx.NodeProto, slot: int, labels: np.ndarray) -> np.ndarray:
    """Labels for a constant operand of shape C broadcast against the output: one label per element."""
    const = graph.const(node.input[slot])
    cshape = (1,) * (labels.ndim - const.ndim) + const.shape
    view = labels
    for axis, size in enumerate(cshape):
        if size == 1:
            first = np.take(view, [0], axis=axis)
            if not np.all(view == first):
                raise NotFoldable(f"{node.op_type} '{node.name}': constant is not per channel")
            view = first
    return view.reshape(const.shape)


def _label_axis(labels: np.ndarray) -> int:
    """The one axis along which channel labels vary (-1 preferred when several could be)."""
    for axis in (labels.ndim - 1, *range(labels.ndim - 1)):
        try:
            _per_channel(labels, axis)
            return axis
        except NotFoldable:
            continue
    raise NotFoldable("channels are mixed with other axes on the way")


def plan_fold(graph: Editable, tensor: str, *, through_clip: bool = False, uniform: bool = False) -> FoldPlan:
    """A `FoldPlan` for `tensor`, or raises NotFoldable with the reason. `through_clip`: a Clip may sit
    on the path (listed in `FoldPlan.clips`; the caller must bound the scales, see the module docstring).
    `uniform`: the caller scales every channel alike, so a Pad with a non-zero value may sit on the path
    (`FoldPlan.pads`)."""
    consumers = graph.consumers.get(tensor, [])
    if not consumers or tensor in graph.outputs:
        raise NotFoldable("read by no weight layer, or a graph output")
    axes = set()
    for node in consumers:
        layer = weight_layer(graph, node)
        if layer is None or node.input[0] != tensor:
            raise NotFoldable(f"also read by {node.op_type} '{node.name}', which has no weight to absorb a scale")
        axes.add(layer.activation_axis)
    shape = graph.shape(tensor)
    if shape is None or len(axes) != 1:
        raise NotFoldable("static shape unknown")
    axis = axes.pop() % len(shape)
    channels = shape[axis]
    labels = np.broadcast_to(_along(np.arange(channels), len(shape), axis), shape).copy()
    plan = FoldPlan(tensor, consumers, consumers[0], np.arange(channels))
    return _trace_site(graph, plan, labels, through_clip, uniform)


def plan_site(graph: Editable, tensor: str, axis: int) -> FoldPlan:
    """The fold site upstream of `tensor` (channels along `axis`), as a `FoldPlan` with no consumers:
    its `apply(graph, s, tag)` makes `tensor` X / s and leaves its readers to the caller (the residual
    stream's equalization scales every reader of a stream itself). `tensor` may have several readers;
    every tensor further up the path must have one, and no Clip may sit on it."""
    if tensor in graph.outputs:
        raise NotFoldable(f"'{tensor}' is a graph output")
    shape = _need_shape(graph, tensor)
    axis %= len(shape)
    labels = np.broadcast_to(_along(np.arange(shape[axis]), len(shape), axis), shape).copy()
    plan = FoldPlan(tensor, [], graph.producer.get(tensor), np.arange(shape[axis]))
    return _trace_site(graph, plan, labels, through_clip=False)


def _trace_site(graph: Editable, plan: FoldPlan, labels: np.ndarray, through_clip: bool,
                uniform: bool = False) -> FoldPlan:
    """Walk from `plan.tensor` up to its fold site, filling the plan (site, site_map, path, biases, clips)."""
    channels = plan.channels
    current = plan.tensor
    while True:
        plan.path.append(current)
        node = graph.producer.get(current)
        if node is None:
            raise NotFoldable("reaches a graph input")
        if current in graph.outputs:
            raise NotFoldable(f"'{current}' is a graph output")
        site_axis = _site_axis(graph, node, labels)
        if site_axis is not None:
            plan.site, plan.site_axis, plan.site_map = node, site_axis, _per_channel(labels, site_axis)
            break
        src, labels = _step_back(graph, node, labels, plan, through_clip, uniform)
        if graph.only_consumer(src) is None:
            raise NotFoldable(f"'{src}' is also read elsewhere (e.g. a residual Add)")
        current = src
    if sorted(plan.site_map.tolist()) != list(range(channels)):
        raise NotFoldable("site channels do not map one to one onto the consumer's channels")
    return plan


def _site_axis(graph: Editable, node: onnx.NodeProto, labels: np.ndarray) -> int | None:
    """The output-channel axis if `node` can absorb a per-channel scale (a fold site), else None."""
    op = node.op_type
    layer = weight_layer(graph, node)
    if layer is not None:
        return layer.activation_axis % labels.ndim
    if op == "LayerNormalization":
        if graph.attr(node, "axis", -1) not in (-1, labels.ndim - 1) or graph.const(node.input[1]) is None:
            raise NotFoldable(f"LayerNormalization '{node.name}': not over the last axis with a constant scale")
        return labels.ndim - 1
    if op == "Mul" and _const_operand(graph, node) is not None:
        axis = _label_axis(labels)
        cslot, _ = _const_operand(graph, node)
        const = graph.const(node.input[cslot])
        full = np.broadcast_to(const.reshape((1,) * (labels.ndim - const.ndim) + const.shape), labels.shape)
        _per_channel(full, axis)  # the constant must be one value per channel (or a scalar)
        return axis
    return None


def _step_back(graph: Editable, node: onnx.NodeProto, labels: np.ndarray, plan: FoldPlan,
               through_clip: bool = False, uniform: bool = False) -> tuple[str, np.ndarray]:
    """Move the labels from `node`'s output to the input on the path: (that input's name, its labels)."""
    op = node.op_type
    if op == "Clip" and through_clip:
        lo, hi = clip_bounds(graph, node)
        if not (lo <= 0 < hi):
            raise NotFoldable(f"Clip '{node.name}': bounds ({lo:g}, {hi:g}) do not hold 0 inside")
        axis = _label_axis(labels)
        plan.clips.append((node, axis, _per_channel(labels, axis)))
        src = node.input[0]
    elif op in _RESHAPES:
        src = node.input[0]
        labels = labels.reshape(_need_shape(graph, src))
    elif op == "Transpose":
        src = node.input[0]
        perm = graph.attr(node, "perm") or list(range(labels.ndim))[::-1]
        labels = labels.transpose(np.argsort(perm))
    elif op in _HOMOGENEOUS:  # same shape, same channels
        src = node.input[0]
    elif op == "Pad":
        src = node.input[0]
        axis = _label_axis(labels)
        in_shape = _need_shape(graph, src)
        pads, value = _constant_pad(graph, node)
        if pads is None or pads[axis % len(in_shape)] or pads[axis % len(in_shape) + len(in_shape)]:
            raise NotFoldable(f"Pad '{node.name}' is not a constant pad of the spatial axes only")
        if value != 0:
            if not uniform:
                raise NotFoldable(f"Pad '{node.name}' pads with {value:g}, which one scale per channel would not keep")
            plan.pads.append(node)
        labels = np.broadcast_to(_along(_per_channel(labels, axis), len(in_shape), axis % len(in_shape)), in_shape).copy()
    elif op in _POOLS:
        src = node.input[0]
        in_shape = _need_shape(graph, src)
        labels = np.broadcast_to(_along(_per_channel(labels, 1), len(in_shape), 1), in_shape).copy()
    elif op == "Add" and _const_operand(graph, node) is not None:
        cslot, dslot = _const_operand(graph, node)
        plan._biases.append((node, cslot, _broadcast_labels(graph, node, cslot, labels)))
        src = node.input[dslot]
        if _need_shape(graph, src) != labels.shape:
            raise NotFoldable(f"Add '{node.name}' broadcasts its dynamic input")
    elif op == "MatMul" and graph.const(node.input[0]) is None and graph.const(node.input[1]) is None:
        src = node.input[1]  # out[..., m, n] = sum_k A[..., m, k] B[..., k, n]: column n comes from B's
        b_shape = _need_shape(graph, src)
        if len(b_shape) != labels.ndim or b_shape[:-2] != labels.shape[:-2]:
            raise NotFoldable(f"MatMul '{node.name}' broadcasts its batch axes")
        row = np.take(labels, [0], axis=-2)
        if not np.all(labels == row):
            raise NotFoldable(f"MatMul '{node.name}': channels vary along rows")
        labels = np.broadcast_to(row, b_shape).copy()
    else:
        raise NotFoldable(f"{op} '{node.name}' sits between the scale and a place to fold it")
    return src, labels


def _constant_pad(graph: Editable, node: onnx.NodeProto) -> tuple[list[int] | None, float]:
    """(pads, value) of a constant-mode Pad with constant pads and value (opset >= 11), else (None, 0)."""
    pads = graph.inits.get(node.input[1]) if len(node.input) > 1 else None
    if not is_constant_pad(node) or pads is None or (len(node.input) > 3 and node.input[3]):
        return None, 0.0
    value = graph.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1)
    if value is None or value.size != 1:
        return None, 0.0
    return [int(v) for v in numpy_helper.to_array(pads).ravel()], float(value.ravel()[0])


def _need_shape(graph: Editable, name: str) -> tuple[int, ...]:
    shape = graph.shape(name)
    if shape is None:
        raise NotFoldable(f"static shape of '{name}' unknown")
    return shape


def _scale_site(graph: Editable, site: onnx.NodeProto, site_s: np.ndarray, axis: int, tag: str) -> None:
    op = site.op_type
    layer = weight_layer(graph, site)
    if layer is not None:
        layer.set_weight(graph, layer.scaled_outputs(1.0 / site_s), tag)
        has_bias = layer.has_bias_slot and len(site.input) > 2 and site.input[2]
        bias = graph.const(site.input[2]) if has_bias else None
        if bias is not None:
            graph.set_input_const(site, 2, np.broadcast_to(bias.reshape(-1), site_s.shape) / site_s, tag)
    elif op == "LayerNormalization":
        for slot in (1, 2):
            if len(site.input) > slot and site.input[slot]:
                graph.set_input_const(site, slot, graph.const(site.input[slot]) / site_s, tag)
    elif op == "Mul":
        cslot, _ = _const_operand(graph, site)
        const = graph.const(site.input[cslot])
        rank = len(graph.shape(site.output[0]))
        full = np.broadcast_to(const.reshape((1,) * (rank - const.ndim) + const.shape), graph.shape(site.output[0]))
        per_channel = _per_channel(full, axis)  # a scalar becomes one value per channel
        new = per_channel / site_s
        shape = [1] * (rank - axis) if axis >= 0 else [1] * (-axis)
        shape[0] = -1
        graph.set_input_const(site, cslot, new.reshape(shape), tag)


def clip_bounds(graph: Editable, node: onnx.NodeProto) -> tuple[float, float]:
    """(lo, hi) of a Clip with constant bounds (inputs from opset 11, attributes before); -inf/inf if absent."""
    bounds = []
    for slot, attr, default in ((1, "min", -np.inf), (2, "max", np.inf)):
        if len(node.input) > slot and node.input[slot]:
            value = graph.const(node.input[slot])
            if value is None or value.size != 1:
                raise NotFoldable(f"Clip '{node.name}': bound is not a constant")
            bounds.append(float(value.reshape(-1)[0]))
        else:
            bounds.append(float(graph.attr(node, attr, default)))
    return bounds[0], bounds[1]
