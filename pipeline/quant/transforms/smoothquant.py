"""SmoothQuant (Xiao et al., 2023): move activation outliers of MatMul/Gemm inputs into the weights.

Per input channel j of a weight layer's input X: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), then
X' = X / s and W' = W * s (rows), which leaves X @ W unchanged. alpha = 0.5 gives both the same range
max|X_j W_j|^(1/2); a larger alpha moves more of the difficulty into the weights. Per-tensor int8 weights
with a single huge element (MiniLM's FFN down projections hold a 7.9 among values of std 0.045) gain too:
the row holding it is divided by s_j where the activation channel is small.

The division by s is folded into the op that makes X (see `fold`): no op is added, so the graph the NPU
runs has the same ops. An input that cannot take it (the LayerNorm output that a post-LN BERT also sends
into its residual Add) is skipped and reported, unless `residual: true`: then the residual branch gets X
back through one elementwise Mul by s (`residual`), the MatMuls read the smoothed X / s, and the Mul's
output carries the outliers on to the residual Add (at 16 bits where the fallback puts the residual
stream; at int8 the Mul would only move the outliers into its own Q/DQ pair). `residual_alpha` is the
alpha of those inputs (default: `alpha`).
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
from .residual import (
    Restore, insert_restore, plan_with_restore, set_restore_scale, snap_for_mul_site, snap_to_int8_grid,
)

__all__ = ["SmoothQuant", "SCALE_LIMITS"]

SCALE_LIMITS = (1e-4, 1e4)  # keeps a dead channel (max |x| = 0) or a zero weight row from blowing up s


class SmoothQuantConfig(TransformConfig):
    alpha: float = Field(0.5, ge=0, le=1)
    # Also smooth inputs whose source feeds a residual branch, restored there by a Mul (see the docstring).
    residual: bool = False
    residual_alpha: float | None = Field(None, ge=0, le=1)


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
        """The inputs this transform can smooth (each with its fold plan); the rest go to `skipped`.
        With `residual`, inputs that need a restoring Mul are planned as if it were there (`restores`)."""
        plans = {}
        self.skipped, self.restores = [], {}
        for tensor, consumers in weight_inputs(graph, self.ops).items():
            try:
                plans[tensor] = plan_fold(graph, tensor)
            except NotFoldable as why:
                reason = str(why)
                if self.config.residual:
                    try:
                        plan, restore = plan_with_restore(graph, tensor)
                        if any(p.site is plan.site for p in plans.values()):
                            raise NotFoldable(f"site '{plan.site.name}' already takes another input's scale")
                        plans[tensor], self.restores[tensor] = plan, restore
                        continue
                    except NotFoldable as also:
                        reason += f"; with a residual Mul: {also}"
                self.skipped.append({"tensor": tensor, "consumers": [n.name for n in consumers], "reason": reason})
        return plans

    def requests(self, graph: Editable) -> dict[str, tuple[int, int]]:
        return {t: (len(graph.shape(t)), graph.input_channel_axis(graph.consumers[t][0])) for t in self.tensors(graph)}

    def apply(self, graph: Editable, stats: dict[str, ChannelStats], ctx: TransformContext) -> set[str]:
        """Smooth every foldable input; its statistics become those of X / s for the transforms after it."""
        plans = self.tensors(graph)
        for tensor, restore in self.restores.items():
            if tensor in stats:
                insert_restore(graph, restore)
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
            restore: Restore | None = getattr(self, "restores", {}).get(tensor)
            alpha = self.alpha if restore is None or self.config.residual_alpha is None else self.config.residual_alpha
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.power(x_max, alpha) / np.power(w_max, 1.0 - alpha)
            s = np.where((x_max > 0) & (w_max > 0) & np.isfinite(s), s, 1.0)
            s = np.clip(s, *SCALE_LIMITS)
            if restore is not None:  # the Mul's constant must survive its own int8 quantization exactly
                s = snap_to_int8_grid(s)
            s = snap_for_mul_site(graph, plan, s)  # likewise a Mul site's new constant
            plan.apply(graph, s, "smooth")
            if restore is not None:
                set_restore_scale(graph, plan, restore, s, "restore")
            scales[tensor] = s
            self.applied.append({
                "tensor": tensor,
                "consumers": [n.name for n in plan.consumers],
                "folded_into": f"{plan.site.op_type} '{plan.site.name}'",
                **({"restored_by": f"Mul '{restore.mul.name}'", "alpha": alpha} if restore is not None else {}),
                "act_range_before": float(x_max.max()),
                "act_range_after": float((x_max / s).max()),
                "weight_range_before": float(w_max.max()),
                "weight_range_after": float((w_max * s).max()),
            })
        return scales
