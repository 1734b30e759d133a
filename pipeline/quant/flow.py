"""The quantize flow: accuracy transforms -> statistics recollected where stale -> fallback search -> QDQ.

Steps, in order, each optional but the last:
1. the transforms (`pipeline.quant.transforms`) rewrite a copy of the float model;
2. the histograms they made stale are recollected on the transformed model (`statistics`), so every
   range comes from the graph that is quantized;
3. the accuracy-aware fallback (`fallback`) chooses which tensors go to 16 bits and which nodes to BF16
   or the CPU, scored on held-out data by the caller's `fallback` function;
4. Q/DQ insertion (`qdq.quantize_qdq`) with the chosen configuration;
5. the steps that work on the QDQ model (`QuantizedTransform`: AdaRound), in their recipe order. The
   fallback's candidates are scored without them (rounding is learned once, on the final model).
Done here, not in calibrate, so calibrate's statistics stay those of the prepared model and quantize can be
rerun with other settings without running the model again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import onnx

from ..core.formats import Format
from .fallback import FallbackConfig, FallbackResult, npu_numerics
from .histogram import StatsCollector
from .qdq import quantize_qdq
from .statistics import collect_histograms
from .transforms import TransformContext, TransformResult, apply_transforms, make_transforms

__all__ = ["QuantizeSettings", "QuantizeOutcome", "run_quantize_flow"]


@dataclass(frozen=True)
class QuantizeSettings:
    target: object
    fmt: Format
    method: str
    percentile: float = 99.999
    exclude_nodes: tuple[str, ...] = ()
    transforms: Sequence[tuple[str, dict]] = ()  # (registered name, settings), in order
    transform_samples: int = 128
    promoted_method: str = "minmax"
    weight_method: str | None = None  # `pipeline.quant.weight_ranges`; None: the quantizer's own


@dataclass
class QuantizeOutcome:
    model: onnx.ModelProto  # the QDQ model
    ranges: dict
    info: dict
    config: FallbackConfig = field(default_factory=FallbackConfig)
    float_model: onnx.ModelProto | None = None  # the float graph that was quantized, when transforms changed it
    transforms: TransformResult | None = None
    histograms: StatsCollector | None = None  # recollected statistics, when transforms made some stale
    fallback: FallbackResult | None = None
    emulated: onnx.ModelProto | None = None  # the QDQ model with its BF16 nodes rounded, when there are any


def run_quantize_flow(
    model: onnx.ModelProto,
    histograms: StatsCollector,
    settings: QuantizeSettings,
    *,
    calibration: Callable[[int | None], Iterable[dict]],
    fallback: Callable[[onnx.ModelProto, Callable[[FallbackConfig], tuple]], FallbackResult] | None = None,
    progress: bool = False,
) -> QuantizeOutcome:
    """Run the flow (see the module docstring). `calibration(limit)` opens the calibration data (all of
    it for None); `fallback(float model, quantize)` runs the search and returns its result."""
    common = dict(target=settings.target, fmt=settings.fmt, method=settings.method, percentile=settings.percentile,
                  weight_method=settings.weight_method)
    transformed, transform_result = model, None
    steps = make_transforms(settings.transforms) if settings.transforms else []
    samples = settings.transform_samples
    ctx = TransformContext(
        batches=lambda: calibration(samples),
        samples=samples,
        # Bias correction reads the weights the quantizer makes; they depend on the weights only.
        quantize=lambda m: quantize_qdq(m, histograms, **common, exclude_nodes=settings.exclude_nodes)[0],
    )
    seconds: dict[str, float] = {}
    if steps:
        start = time.perf_counter()
        transform_result = apply_transforms(model, steps, ctx)
        seconds["float_transforms"] = time.perf_counter() - start
        transformed = transform_result.model
        if transform_result.stale:
            start = time.perf_counter()
            histograms = collect_histograms(transformed, calibration(None), progress=progress)
            seconds["recollect_statistics"] = time.perf_counter() - start

    def quantize(config: FallbackConfig):
        moved = sorted(config.bf16 | config.cpu)
        return quantize_qdq(transformed, histograms, **common, exclude_nodes=[*settings.exclude_nodes, *moved],
                            promote={t: 16 for t in config.promote}, promote_method=settings.promoted_method)

    config, searched = FallbackConfig(), None
    if fallback is not None:
        searched = fallback(transformed, quantize)
        config = searched.config
    start = time.perf_counter()
    quantized, ranges, info = quantize(config)
    seconds["qdq"] = time.perf_counter() - start
    for step in (s for s in steps if s.after_quantization):
        start = time.perf_counter()
        quantized = step.apply_quantized(quantized, transformed, ctx)
        seconds[step.name] = time.perf_counter() - start
        transform_result.report[step.name] = step.report()
    info["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    outcome = QuantizeOutcome(quantized, ranges, info, config, fallback=searched)
    if config.bf16:
        outcome.emulated = npu_numerics(quantized, config)
    if transform_result is not None:
        outcome.float_model, outcome.transforms = transformed, transform_result
        if transform_result.stale:
            outcome.histograms = histograms
        info["transforms"] = {name: len(part["applied"]) for name, part in transform_result.report.items()}
    if searched is not None:
        info["fallback"] = {"passed": searched.passed, **config.to_json(),
                            "chosen": searched.chosen.to_json() if searched.chosen else None}
    return outcome
