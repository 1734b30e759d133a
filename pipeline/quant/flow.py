"""The quantize flow: accuracy transforms -> statistics recollected where stale -> fallback search -> QDQ.

Steps, in order, each optional but the last:
1. the transforms (`pipeline.quant.transforms`) rewrite a copy of the float model;
2. the histograms they made stale are recollected on the transformed model (`statistics`), so every
   range comes from the graph that is quantized; the range guard (`guard`) finds tensors that mix
   ranges and keeps them at 16 bits or float in every configuration below;
3. int8 ranges of MAC inputs by the reading layer's output error (`output_ranges`), when asked;
4. the accuracy-aware fallback (`fallback`) chooses which tensors go to 16 bits and which nodes to A16W8,
   BF16 or the CPU, scored on held-out data by the caller's `fallback` function;
5. Q/DQ insertion (`qdq.quantize_qdq`) with the chosen configuration;
6. the steps that work on the QDQ model (`QuantizedTransform`: AdaRound), in their recipe order. The
   fallback's candidates are scored without them (rounding is learned once, on the final model).
A 16-bit value never costs an int8 MAC: MatMul/Gemm/Conv readers get an int8 copy (`requant`) unless the
configuration (or a transform, e.g. the outlier split's side MatMuls) names them 16-bit readers.
Done here, not in calibrate, so calibrate's statistics stay those of the prepared model and quantize can be
rerun with other settings without running the model again.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..core.formats import Format
from .fallback import FallbackConfig, FallbackResult, npu_numerics
from .guard import GuardConfig, GuardResult, find_mixed_ranges
from .histogram import StatsCollector
from .mac_share import mac_shares
from .output_ranges import output_error_ranges
from .qdq import quantize_qdq
from .shared_grid import fused_activation_inputs
from .statistics import activation_tensors, collect_histograms
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
    guard: GuardConfig = GuardConfig()
    free_16bit: bool = False  # every value a non-MAC op reads at 16 bits (MAC readers: int8 copies)
    output_error_ranges: bool = False
    output_error_samples: int = 8
    weight_method: str | None = None  # `pipeline.quant.weight_ranges`; None: the quantizer's own
    output_method: str | None = None  # the graph outputs' range method; None: `method`


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
    guard: GuardResult = field(default_factory=GuardResult)


def run_quantize_flow(
    model: onnx.ModelProto,
    histograms: StatsCollector,
    settings: QuantizeSettings,
    *,
    calibration: Callable[[int | None], Iterable[dict]],
    fallback: Callable[[onnx.ModelProto, Callable[[FallbackConfig], tuple], GuardResult], FallbackResult] | None = None,
    progress: bool = False,
) -> QuantizeOutcome:
    """Run the flow (see the module docstring). `calibration(limit)` opens the calibration data (all of
    it for None); `fallback(float model, quantize, guard)` runs the search and returns its result."""
    common = dict(target=settings.target, fmt=settings.fmt, method=settings.method, percentile=settings.percentile,
                  weight_method=settings.weight_method, output_method=settings.output_method)
    transformed, transform_result = model, None
    steps = make_transforms(settings.transforms) if settings.transforms else []
    samples = settings.transform_samples
    ctx = TransformContext(
        batches=lambda: calibration(samples),
        samples=samples,
        # Bias correction reads the weights the quantizer makes; they depend on the weights only.
        quantize=lambda m: quantize_qdq(m, _WithPlaceholders(histograms, m), **common,
                                        exclude_nodes=settings.exclude_nodes)[0],
        progress=progress,
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

    guard = find_mixed_ranges(transformed, histograms, settings.guard, target=settings.target, fmt=settings.fmt,
                              batches=calibration)
    promote16, wide = _sixteen_bit_base(transformed, histograms, transform_result, settings)
    int8_ranges, range_report = {}, None
    if settings.output_error_ranges and Format(settings.fmt).spec.activation_bits == 8:
        chosen = output_error_ranges(transformed, histograms, calibration(settings.output_error_samples),
                                     symmetric=Format(settings.fmt).spec.symmetric_activations,
                                     weight_bits=Format(settings.fmt).spec.weight_bits)
        int8_ranges = {t: (c.lo, c.hi) for t, c in chosen.items()}
        range_report = {t: c.to_json() for t, c in sorted(chosen.items())}

    @functools.lru_cache(maxsize=4)  # the fallback's last configurations: the chosen one is not redone
    def quantize(config: FallbackConfig):
        moved = sorted((config.bf16 | config.cpu | guard.float_nodes) - set(settings.exclude_nodes))
        return quantize_qdq(transformed, histograms, **common, exclude_nodes=[*settings.exclude_nodes, *moved],
                            promote={t: 16 for t in config.promote | promote16 | guard.promote},
                            promote_method=settings.promoted_method,
                            wide_nodes=(config.wide | wide) - set(moved), int8_ranges=int8_ranges)

    config, searched = FallbackConfig(), None
    if fallback is not None:
        searched = fallback(transformed, quantize, guard)
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
    info["range_guard"] = guard.to_json()
    outcome = QuantizeOutcome(quantized, ranges, info, config, fallback=searched, guard=guard)
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
    if range_report is not None:
        info["output_error_ranges"] = range_report
    info["mac_shares"] = mac_shares(quantized).to_json()  # int8 x int8 as an audit of the QDQ model counts it
    return outcome


class _WithPlaceholders:
    """`histograms` plus a placeholder range for the activations a transform added (a split's side path, a
    restoring Mul): the transforms' quantizer is only read for its weights, which do not depend on them."""

    def __init__(self, histograms: StatsCollector, model: onnx.ModelProto) -> None:
        self._base = histograms
        missing = [t for t in activation_tensors(model) if t not in histograms]
        self._extra = StatsCollector(missing)
        for name in missing:
            self._extra.update(name, np.array([-1.0, 1.0], np.float32), -1.0, 1.0)

    @property
    def names(self) -> tuple[str, ...]:
        return self._base.names + self._extra.names

    def __contains__(self, name: object) -> bool:
        return name in self._base or name in self._extra

    def __getitem__(self, name: str):
        return self._base[name] if name in self._base else self._extra[name]


def _sixteen_bit_base(model, histograms: StatsCollector, transforms: TransformResult | None,
                      settings: QuantizeSettings) -> tuple[frozenset[str], frozenset[str]]:
    """Values at 16 bits and MAC nodes reading 16 bits before any fallback: what the transforms' rewrites
    need, and with `free_16bit` every measured value (the requantizing plan keeps the ones only MAC nodes
    read at int8)."""
    promote = set(transforms.promote16) if transforms is not None else set()
    wide = set(transforms.wide_nodes) if transforms is not None else set()
    if settings.free_16bit:
        # The values only a Relu/Clip reads are not measured (they take the activation's quantization), but
        # the plan must see them: a layout op before one (Reshape -> Relu) keeps its source at their width.
        promote |= set(histograms.names) | set(fused_activation_inputs(model))
    return frozenset(promote), frozenset(wide)
