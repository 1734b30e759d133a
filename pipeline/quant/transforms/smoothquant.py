"""SmoothQuant (Xiao et al., 2023): move activation outliers of MatMul/Gemm inputs into the weights.

Per input channel j of a weight layer's input X: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), then
X' = X / s and W' = W * s (rows), which leaves X @ W unchanged. alpha = 0.5 gives both the same range
max|X_j W_j|^(1/2); a larger alpha moves more of the difficulty into the weights. Per-tensor int8 weights
with a single huge element (MiniLM's FFN down projections hold a 7.9 among values of std 0.045) gain too:
the row holding it is divided by s_j where the activation channel is small.

The division by s is folded into the op that makes X (see `fold`): no op is added, so the graph the NPU
runs has the same ops. An input that cannot take it (the LayerNorm output that a post-LN BERT also sends
into its residual Add) is skipped and reported, not given an extra Mul: that Mul's input would carry the
outliers into its own int8 Q/DQ pair and gain nothing.
"""

from __future__ import annotations

import numpy as np
import onnx
from pydantic import Field

from ...core.editable import Editable
from ..statistics import ChannelStats
from .base import Transform, TransformConfig, TransformContext, register_transform
from .fold import FoldPlan, NotFoldable, plan_fold
from .layers import weight_inputs

__all__ = ["SmoothQuant", "SCALE_LIMITS"]

SCALE_LIMITS = (1e-4, 1e4)  # keeps a dead channel (max |x| = 0) or a zero weight row from blowing up s


class SmoothQuantConfig(TransformConfig):
    alpha: float = Field(0.5, ge=0, le=1)


@register_transform
class SmoothQuant(Transform):
    """The transform; `alpha` in [0, 1]."""

    name = "smoothquant"
    Config = SmoothQuantConfig
    ops = frozenset({"MatMul", "Gemm"})

    @property
    def alpha(self) -> float:
        return self.config.alpha

    def tensors(self, graph: Editable) -> dict[str, FoldPlan]:
        """The inputs this transform can smooth (each with its fold plan); the rest go to `skipped`."""
        plans = {}
        self.skipped = []
        for tensor, consumers in weight_inputs(graph, self.ops).items():
            try:
                plans[tensor] = plan_fold(graph, tensor)
            except NotFoldable as why:
                self.skipped.append({"tensor": tensor, "consumers": [n.name for n in consumers], "reason": str(why)})
        return plans

    def requests(self, graph: Editable) -> dict[str, tuple[int, int]]:
        return {t: (len(graph.shape(t)), graph.input_channel_axis(graph.consumers[t][0])) for t in self.tensors(graph)}

    def apply(self, graph: Editable, stats: dict[str, ChannelStats], ctx: TransformContext) -> set[str]:
        """Smooth every foldable input; its statistics become those of X / s for the transforms after it."""
        plans = {t: plan_fold(graph, t) for t in self.tensors(graph)}
        scales = self.smooth(graph, plans, stats)
        stale: set[str] = set()
        for tensor, s in scales.items():
            stats[tensor] = stats[tensor].rescaled(s)
            stale.update(plans[tensor].path)
        self.samples = max((s.samples for s in stats.values()), default=0)
        return stale

    def report(self) -> dict:
        return {"alpha": self.alpha, "samples": getattr(self, "samples", 0), **super().report()}

    def smooth(self, graph: Editable, plans: dict[str, FoldPlan], stats: dict[str, ChannelStats]) -> dict[str, np.ndarray]:
        """Smooth every planned input that has statistics; returns {tensor: s} (X became X / s)."""
        scales = {}
        for tensor, plan in plans.items():
            if tensor not in stats:
                continue
            x_max = stats[tensor].absmax
            w_max = np.zeros_like(x_max)
            for node in plan.consumers:
                w, axis = graph.weight(node)
                w_max = np.maximum(w_max, np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(axis=1))
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.power(x_max, self.alpha) / np.power(w_max, 1.0 - self.alpha)
            s = np.where((x_max > 0) & (w_max > 0) & np.isfinite(s), s, 1.0)
            s = np.clip(s, *SCALE_LIMITS)
            plan.apply(graph, s, "smooth")
            scales[tensor] = s
            self.applied.append({
                "tensor": tensor,
                "consumers": [n.name for n in plan.consumers],
                "folded_into": f"{plan.site.op_type} '{plan.site.name}'",
                "act_range_before": float(x_max.max()),
                "act_range_after": float((x_max / s).max()),
                "weight_range_before": float(w_max.max()),
                "weight_range_after": float((w_max * s).max()),
            })
        return scales
