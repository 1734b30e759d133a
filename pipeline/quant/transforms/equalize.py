"""Cross-layer equalization (Nagel et al., 2019, "Data-Free Quantization"), for CNNs.

For two weight layers in a row, W1 -> (Relu, pooling, reshapes) -> W2, output channel i of W1 and input
channel i of W2 can trade a factor: W1[i] / s_i, W2[:, i] * s_i leaves the network's output unchanged
(Relu and max/average pooling commute with a positive per-channel scale). With s_i = sqrt(r1_i / r2_i),
r the per-channel max |w|, both ranges become sqrt(r1_i r2_i): under per-tensor int8 weights, a channel
with tiny weights next to one with large weights no longer rounds to zero. Data-free: weights only.
Chains (conv1 -> conv2 -> conv3) are swept until the scales settle, as in the paper.
"""

from __future__ import annotations

import numpy as np

from ...core.editable import Editable
from .base import Transform, TransformConfig, TransformContext, register_transform
from .fold import NotFoldable, plan_fold
from .smoothquant import SCALE_LIMITS, weight_inputs

__all__ = ["CrossLayerEqualization"]


class CrossLayerEqualizationConfig(TransformConfig):
    sweeps: int = 20
    tolerance: float = 1e-3


@register_transform
class CrossLayerEqualization(Transform):
    name = "cross_layer_equalization"
    Config = CrossLayerEqualizationConfig
    ops = frozenset({"Conv", "Gemm", "MatMul"})

    def apply(self, graph: Editable, stats, ctx: TransformContext) -> set[str]:
        """Equalize every foldable pair; the tensors between each pair change (by 1/s per channel)."""
        self.equalize(graph)
        return {t for entry in self.applied for t in _path(graph, entry["tensor"])}

    def equalize(self, graph: Editable) -> dict[str, np.ndarray]:
        """Equalize every foldable pair; returns {tensor between the pair: accumulated s} (X became X / s)."""
        plans = {}
        for tensor, consumers in weight_inputs(graph, self.ops).items():
            names = [n.name for n in consumers]
            try:
                plan = plan_fold(graph, tensor)
            except NotFoldable as why:
                self.skipped.append({"tensor": tensor, "consumers": names, "reason": str(why)})
                continue
            if plan.site_weight_range(graph) is None:
                self.skipped.append({"tensor": tensor, "consumers": names,
                                     "reason": f"made by {plan.site.op_type} '{plan.site.name}', not a weight layer"})
                continue
            plans[tensor] = plan
        total = {t: np.ones(p.channels) for t, p in plans.items()}
        before = {t: self._ranges(graph, p) for t, p in plans.items()}
        for _ in range(self.config.sweeps):
            largest = 0.0
            for tensor, plan in plans.items():
                r1, r2 = self._ranges(graph, plan)
                ok = (r1 > 0) & (r2 > 0)
                s = np.clip(np.where(ok, np.sqrt(np.where(ok, r1, 1) / np.where(ok, r2, 1)), 1.0), *SCALE_LIMITS)
                plan.apply(graph, s, "cle")
                total[tensor] *= s
                largest = max(largest, float(np.abs(np.log(s)).max()))
            if largest < self.config.tolerance:
                break
        for tensor, plan in plans.items():
            (r1a, r2a), (r1b, r2b) = before[tensor], self._ranges(graph, plan)
            self.applied.append({
                "tensor": tensor,
                "pair": [plan.site.name, *(n.name for n in plan.consumers)],
                # Per-tensor int8 resolution a channel gets: its range over the tensor's largest range.
                "worst_channel_share_before": [_worst_share(r1a), _worst_share(r2a)],
                "worst_channel_share_after": [_worst_share(r1b), _worst_share(r2b)],
            })
        return total

    @staticmethod
    def _ranges(graph: Editable, plan) -> tuple[np.ndarray, np.ndarray]:
        r1 = plan.site_weight_range(graph)
        r2 = np.zeros(plan.channels)
        for node in plan.consumers:
            w, axis = graph.weight(node)
            r2 = np.maximum(r2, np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(axis=1))
        return r1, r2


def _worst_share(r: np.ndarray) -> float:
    return float(r.min() / r.max()) if r.max() > 0 else 1.0


def _path(graph: Editable, tensor: str) -> list[str]:
    try:
        return plan_fold(graph, tensor).path
    except NotFoldable:  # cannot happen after a successful fold; be conservative anyway
        return [tensor]
