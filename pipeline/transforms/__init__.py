"""Accuracy transforms of the float graph, applied by the quantize stage before Q/DQ insertion.

Each is optional in the recipe (`quantization.cross_layer_equalization`, `.smoothquant` = alpha,
`.bias_correction`) and reported per layer. They run in this order, on a copy of the prepared model:

1. cross-layer equalization: data-free (weights only);
2. SmoothQuant: needs each smoothed input's per-channel max |x|;
3. bias correction: needs each weight layer's per-channel input mean and the weights the quantizer makes.

Statistics are requested first and gathered in one bounded streaming pass (`channel_stats`, at most
`samples` calibration samples), after equalization (which needs none) and before SmoothQuant; SmoothQuant
updates the statistics it invalidates analytically (x / s), so bias correction needs no second pass.

Where they run, and what goes stale: the calibrate stage's per-tensor histograms describe the prepared
model. Equalization and SmoothQuant rescale the channels of the tensors between a fold site and the
weight layer (`FoldPlan.path`): those histograms are wrong afterwards, every other tensor is unchanged
(up to float rounding). Bias correction changes the float function slightly, so everything downstream
of a corrected layer is stale. `TransformResult.stale` lists the tensors; the quantize stage recollects
statistics on the transformed model when it is not empty, so every range comes from the graph that is
quantized. Validation still compares against the prepared (untransformed) model: the reference is the
model the user gave, not ours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import onnx

from ._graph import Editable
from .bias_correction import BiasCorrection, dequantized_weights
from .channel_stats import ChannelStats, collect_channel_stats
from .equalize import CrossLayerEqualization
from .fold import FoldPlan, NotFoldable, plan_fold
from .smoothquant import SmoothQuant

__all__ = [
    "TransformResult",
    "apply_transforms",
    "CrossLayerEqualization",
    "SmoothQuant",
    "BiasCorrection",
    "ChannelStats",
    "collect_channel_stats",
    "dequantized_weights",
    "plan_fold",
    "FoldPlan",
    "NotFoldable",
]


@dataclass
class TransformResult:
    model: onnx.ModelProto
    report: dict = field(default_factory=dict)
    stale: set[str] = field(default_factory=set)

    @property
    def changed(self) -> bool:
        return bool(self.report)


def _downstream(model: onnx.ModelProto, starts: Iterable[str]) -> set[str]:
    """Every tensor computed from any of the nodes named in `starts` (their outputs included)."""
    start = set(starts)
    reached: set[str] = set()
    for node in model.graph.node:  # topologically sorted
        if node.name in start or any(i in reached for i in node.input if i):
            reached.update(o for o in node.output if o)
    return reached


def apply_transforms(
    model: onnx.ModelProto,
    *,
    cross_layer_equalization: bool = False,
    smoothquant: float | None = None,
    bias_correction: bool = False,
    batches: Callable[[], Iterable[dict]] | None = None,
    samples: int = 128,
    quantize: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None,
) -> TransformResult:
    """Apply the requested transforms to a copy of `model`.

    `batches()` yields calibration samples (needed by SmoothQuant and bias correction); `quantize(model)`
    returns the QDQ model the quantizer makes of a float model (bias correction reads its weights).
    """
    result = TransformResult(onnx.ModelProto.FromString(model.SerializeToString()))
    if not (cross_layer_equalization or smoothquant is not None or bias_correction):
        return result
    graph = Editable(result.model)
    if cross_layer_equalization:
        cle = CrossLayerEqualization()
        cle(graph)
        result.report["cross_layer_equalization"] = {"applied": cle.applied, "skipped": cle.skipped}
        result.stale |= {t for entry in cle.applied for t in _path(graph, entry["tensor"])}
    smooth = SmoothQuant(alpha=smoothquant) if smoothquant is not None else None
    plans = smooth.tensors(graph) if smooth is not None else {}
    corrector = BiasCorrection() if bias_correction else None
    wanted = set(plans) | (set(corrector.inputs(graph)) if corrector is not None else set())
    stats: dict[str, ChannelStats] = {}
    if wanted:
        if batches is None:
            raise ValueError("SmoothQuant and bias correction need calibration batches")
        graph = Editable(result.model)  # shapes and names after equalization
        plans = {t: plan_fold(graph, t) for t in plans}
        tensors = {}
        for t in sorted(wanted):
            consumer = graph.consumers[t][0]
            tensors[t] = (len(graph.shape(t)), graph.input_channel_axis(consumer))
        stats = collect_channel_stats(result.model, tensors, batches(), limit=samples)
    if smooth is not None:
        scales = smooth(graph, plans, stats)
        for tensor, s in scales.items():
            stats[tensor] = stats[tensor].rescaled(s)
            result.stale.update(plans[tensor].path)
        result.report["smoothquant"] = {
            "alpha": smoothquant, "samples": _samples(stats), "applied": smooth.applied, "skipped": smooth.skipped,
        }
    if corrector is not None:
        if quantize is None:
            raise ValueError("bias correction needs the quantizer (to read the weights it makes)")
        quantized = dequantized_weights(quantize(result.model))
        corrected = corrector(graph, stats, quantized)
        result.stale |= _downstream(result.model, corrected)
        result.report["bias_correction"] = {
            "samples": _samples(stats), "applied": corrector.applied, "skipped": corrector.skipped,
        }
    return result


def _path(graph: Editable, tensor: str) -> list[str]:
    try:
        return plan_fold(graph, tensor).path
    except NotFoldable:  # cannot happen after a successful fold; be conservative anyway
        return [tensor]


def _samples(stats: dict[str, ChannelStats]) -> int:
    return max((s.samples for s in stats.values()), default=0)
