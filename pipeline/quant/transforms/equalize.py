"""Cross-layer equalization (Nagel et al., 2019, "Data-Free Quantization"), for CNNs.

For two weight layers in a row, W1 -> (Relu, Clip, pooling, reshapes) -> W2, output channel i of W1 and
input channel i of W2 can trade a factor: W1[i] / s_i, W2[:, i] * s_i leaves the network's output
unchanged (Relu and max/average pooling commute with a positive per-channel scale). With
s_i = sqrt(r1_i / r2_i), r the per-channel max |w|, both ranges become sqrt(r1_i r2_i): under per-tensor
int8 weights, a channel with tiny weights next to one with large weights no longer rounds to zero.
Grouped and depthwise convolutions take part on either side (`layers.WeightLayer`), so MobileNet's
expand -> depthwise -> project chains are equalized; a tensor that a residual Add also reads is never
rescaled (`fold.plan_fold` refuses it), so the pairs inside a residual block are, the block's ends not.
Chains are swept until the scales settle, as in the paper.

ReLU6 (Clip(0, 6)) does not commute with a scale: Clip(x / s, 0, 6) = Clip(x, 0, 6 s) / s. `clip`:
- `bounded` (default): the Clip stays; on the calibration data (per-channel max and min of the Clip's
  output, one statistics pass) it acts as before when a channel that reaches the bound keeps s = 1 and
  every other channel keeps s >= max_c / 6 (its largest value stays under the moved bound). The float
  function is unchanged wherever the data stays inside what calibration saw;
- `as_relu`: the paper's choice, the Clip becomes a Relu and s is free; this changes the float function
  where activations pass 6 (MobileNetV2's first depthwise layer and last 1x1 conv do: about 24 dB
  logit SQNR against the original on our crops);
- `skip`: pairs with a Clip between them are left alone.
The report gives, per pair, the channels a bound held, and `float_output_sqnr_db`: the model's outputs
after against before on `check_samples` calibration samples (inf when nothing moved).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ...core.editable import Editable
from ...core.onnx_io import copy_model
from ..statistics import ChannelStats
from .base import Transform, TransformConfig, TransformContext, register_transform
from .fold import FoldPlan, NotFoldable, clip_bounds, plan_fold
from .layers import weight_inputs, weight_layer
from .smoothquant import SCALE_LIMITS

__all__ = ["CrossLayerEqualization", "output_sqnr_db"]

_SATURATED = 1 - 1e-6  # a Clip output within this share of the bound counts as clipped


class CrossLayerEqualizationConfig(TransformConfig):
    sweeps: int = Field(20, ge=1)
    tolerance: float = Field(1e-3, gt=0)
    clip: Literal["bounded", "as_relu", "skip"] = "bounded"
    # bounded: a channel whose calibration maximum comes within a factor `clip_headroom` of the bound is
    # held (s = 1), and the others keep that factor below the moved bound: room for unseen data.
    clip_headroom: float = Field(1.0, ge=1.0)
    check_samples: int = Field(8, ge=0)


@register_transform
class CrossLayerEqualization(Transform):
    name = "cross_layer_equalization"
    Config = CrossLayerEqualizationConfig
    ops = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

    def plans(self, graph: Editable, *, record: bool = False) -> dict[str, FoldPlan]:
        """Every pair whose shared tensor can be rescaled; the rest go to `skipped` when `record`."""
        plans = {}
        for tensor, consumers in weight_inputs(graph, self.ops).items():
            names = [n.name for n in consumers]
            try:
                plan = plan_fold(graph, tensor, through_clip=self.config.clip != "skip")
            except NotFoldable as why:
                if record:
                    self.skipped.append({"tensor": tensor, "consumers": names, "reason": str(why)})
                continue
            if plan.site_weight_range(graph) is None:
                if record:
                    self.skipped.append({"tensor": tensor, "consumers": names,
                                         "reason": f"made by {plan.site.op_type} '{plan.site.name}', not a weight layer"})
                continue
            plans[tensor] = plan
        return plans

    def requests(self, graph: Editable) -> dict[str, tuple[int, int]]:
        wanted = {}
        for plan in self.plans(graph).values():
            if self.config.clip == "bounded":
                for node, axis, _ in plan.clips:
                    wanted[node.output[0]] = (len(graph.shape(node.output[0])), axis)
        return wanted

    def apply(self, graph: Editable, stats: dict[str, ChannelStats], ctx: TransformContext) -> set[str]:
        """Equalize every foldable pair; the tensors between each pair change (by 1/s per channel)."""
        before = copy_model(graph.model) if self.config.check_samples and ctx.batches is not None else None
        self.equalize(graph, stats)
        if before is not None and self.applied:
            self.float_output_sqnr_db = output_sqnr_db(before, graph.model, ctx.batches(), self.config.check_samples)
        return {t for entry in self.applied for t in entry.pop("_path")}

    def report(self) -> dict:
        extra = {"clip": self.config.clip}
        if hasattr(self, "float_output_sqnr_db"):
            value = self.float_output_sqnr_db  # None: the outputs did not move at all
            extra["float_output_sqnr_db"] = value if np.isfinite(value) else None
        return {**extra, **super().report()}

    def equalize(self, graph: Editable, stats: dict[str, ChannelStats] | None = None) -> dict[str, np.ndarray]:
        """Equalize every foldable pair; returns {tensor between the pair: accumulated s} (X became X / s)."""
        plans = self.plans(graph, record=True)
        bounds = {}
        for tensor, plan in list(plans.items()):
            try:
                bounds[tensor] = self._bounds(graph, plan, stats or {})
            except NotFoldable as why:
                self.skipped.append({"tensor": tensor, "consumers": [n.name for n in plan.consumers], "reason": str(why)})
                del plans[tensor]
        if self.config.clip == "as_relu":
            for plan in plans.values():
                for node, _, _ in plan.clips:
                    node.op_type = "Relu"
                    del node.input[1:]
        # Sweep on in-memory copies of the weights (the graph is written once, with the accumulated scales).
        layers = {n.name: weight_layer(graph, n) for p in plans.values() for n in (p.site, *p.consumers)}
        total = {t: np.ones(p.channels) for t, p in plans.items()}
        before = {t: self._ranges(layers, p) for t, p in plans.items()}
        for _ in range(self.config.sweeps):
            largest = 0.0
            for tensor, plan in plans.items():
                r1, r2 = self._ranges(layers, plan)
                ok = (r1 > 0) & (r2 > 0)
                s = np.clip(np.where(ok, np.sqrt(np.where(ok, r1, 1) / np.where(ok, r2, 1)), 1.0), *SCALE_LIMITS)
                lo, hi = bounds[tensor]
                s = np.clip(total[tensor] * s, lo, hi) / total[tensor]
                for node in plan.consumers:
                    layers[node.name].weight = layers[node.name].scaled_inputs(s)
                site = layers[plan.site.name]
                site.weight = site.scaled_outputs(1.0 / s[plan.site_map])
                total[tensor] *= s
                largest = max(largest, float(np.abs(np.log(s)).max()))
            if largest < self.config.tolerance:
                break
        for tensor, plan in plans.items():
            plan.apply(graph, total[tensor], "cle")
            if stats:  # the measured tensors on the path are x / s now: later transforms read that
                for node, _, clip_map in plan.clips:
                    if node.output[0] in stats:
                        stats[node.output[0]] = stats[node.output[0]].rescaled(total[tensor][clip_map])
        for tensor, plan in plans.items():
            (r1a, r2a), (r1b, r2b) = before[tensor], self._ranges(layers, plan)
            lo, hi = bounds[tensor]
            self.applied.append({
                "tensor": tensor,
                "pair": [plan.site.name, *(n.name for n in plan.consumers)],
                "through": [n.op_type for n, _, _ in plan.clips],
                # Per-tensor int8 resolution a channel gets: its range over the tensor's largest range.
                "worst_channel_share_before": [_worst_share(r1a), _worst_share(r2a)],
                "worst_channel_share_after": [_worst_share(r1b), _worst_share(r2b)],
                "channels_held_by_clip": int(np.sum(lo >= hi)),
                "channels_at_clip_bound": int(np.sum((lo < hi) & (total[tensor] <= lo * (1 + 1e-9)) & (lo > SCALE_LIMITS[0]))),
                "_path": list(plan.path),
            })
        return total

    def _bounds(self, graph: Editable, plan: FoldPlan, stats: dict[str, ChannelStats]) -> tuple[np.ndarray, np.ndarray]:
        """Per consumer channel, the range the accumulated scale may take (see the module docstring)."""
        lo, hi = np.full(plan.channels, SCALE_LIMITS[0]), np.full(plan.channels, SCALE_LIMITS[1])
        if self.config.clip != "bounded":
            if self.config.clip == "as_relu" and any(clip_bounds(graph, n)[0] != 0 for n, _, _ in plan.clips):
                raise NotFoldable("a Clip on the path does not start at 0 (as_relu turns only ReLU6-like Clips into Relu)")
            return lo, hi
        for node, _, clip_map in plan.clips:
            found = stats.get(node.output[0])
            if found is None or found.max is None:
                raise NotFoldable(f"Clip '{node.name}': no calibration statistics of its output")
            c_lo, c_hi = clip_bounds(graph, node)
            top, bottom = np.empty(plan.channels), np.empty(plan.channels)
            top[clip_map], bottom[clip_map] = found.max, found.min
            held = np.zeros(plan.channels, bool)
            room = self.config.clip_headroom
            if np.isfinite(c_hi):
                held |= top * room >= c_hi * _SATURATED
                lo = np.maximum(lo, np.where(top > 0, room * top / c_hi, 0.0))
            if np.isfinite(c_lo) and c_lo < 0:
                held |= bottom * room <= c_lo * _SATURATED
                lo = np.maximum(lo, np.where(bottom < 0, room * bottom / c_lo, 0.0))
            lo, hi = np.where(held, 1.0, lo), np.where(held, 1.0, hi)
        return lo, np.maximum(hi, lo)

    @staticmethod
    def _ranges(layers: dict, plan: FoldPlan) -> tuple[np.ndarray, np.ndarray]:
        """(site output range, consumers' input range) per consumer channel, from the in-memory weights."""
        per_site = layers[plan.site.name].output_ranges()
        r1 = np.empty_like(per_site)
        r1[plan.site_map] = per_site
        r2 = np.zeros(plan.channels)
        for node in plan.consumers:
            r2 = np.maximum(r2, layers[node.name].input_ranges())
        return r1, r2


def _worst_share(r: np.ndarray) -> float:
    live = r[r > 0]
    return float(live.min() / live.max()) if live.size else 1.0


def output_sqnr_db(reference, changed, batches, samples: int) -> float:
    """SQNR (dB) of `changed`'s outputs against `reference`'s over the first `samples` batches."""
    from ...core.onnx_io import make_session

    ref = make_session(reference, optimize=False)
    new = make_session(changed, optimize=False)
    signal = noise = 0.0
    for index, batch in enumerate(batches):
        if index >= samples:
            break
        for a, b in zip(ref.run(None, batch), new.run(None, batch)):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            signal += float((a**2).sum())
            noise += float(((a - b) ** 2).sum())
    if noise == 0:
        return float("inf")
    return round(10 * np.log10(max(signal, 1e-300) / noise), 2)
