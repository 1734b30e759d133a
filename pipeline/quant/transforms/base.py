"""Accuracy transforms of the float graph, applied before Q/DQ insertion, as a registry.

A transform is a `Transform` subclass registered under its recipe name (`@register_transform`), with its
settings as a pydantic `Config` (so the recipe schema validates them). Protocol: `requests(graph)` names the
per-channel statistics it reads on the current graph (`{tensor: (rank, channel axis)}`); `apply(graph,
stats, ctx)` edits the model in place and returns the tensors whose values it changed (their calibration
histograms are stale); `report()` says what it did, per layer. The recipe lists transforms in order
(`quantization.transforms`); adding one is one module plus its import in `pipeline.quant.transforms`.

A `QuantizedTransform` (AdaRound) works on the QDQ model instead: it needs the quantized neighbours and
the quantizer's grids, so the quantize flow runs it after Q/DQ insertion (`apply_quantized`), whatever its
place in the list; `apply_transforms` leaves it out.

Statistics: when a transform needs statistics that are not there yet, one streaming pass
(`pipeline.quant.statistics`, at most `ctx.samples` calibration samples) gathers the requests of that
transform and of every later one, on the graph as it is then; a transform that rescales a tensor it
measured updates those statistics itself (x / s), so later transforms need no second pass.

Where they run, and what goes stale: the calibrate stage's per-tensor histograms describe the prepared
model. Equalization and SmoothQuant rescale the channels of the tensors between a fold site and the weight
layer (`FoldPlan.path`); bias correction changes the float function slightly, so everything downstream of a
corrected layer is stale. `TransformResult.stale` lists the tensors; the quantize flow recollects
statistics on the transformed model when it is not empty. Validation still compares against the prepared
(untransformed) model: the reference is the model the user gave, not ours.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import onnx
from pydantic import BaseModel, ConfigDict

from ...core.editable import Editable
from ...core.onnx_io import copy_model
from ..statistics import ChannelStats, StatisticsService

__all__ = [
    "Transform", "QuantizedTransform", "TransformContext", "TransformResult", "register_transform",
    "transform_registry", "apply_transforms", "downstream", "make_transforms",
]


class TransformConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class TransformContext:
    """What transforms may use besides the graph: calibration batches (`batches()` starts a fresh
    iterator), how many to read, and `quantize(model) -> QDQ model` (the quantizer the flow will use)."""

    batches: Callable[[], Iterable[dict]] | None = None
    samples: int = 128
    quantize: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None
    progress: bool = False  # long steps (AdaRound's layers) show a tqdm bar


class Transform(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[TransformConfig]] = TransformConfig
    after_quantization: ClassVar[bool] = False

    def __init__(self, config: TransformConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()
        self.applied: list[dict] = []
        self.skipped: list[dict] = []

    def requests(self, graph: Editable) -> dict[str, tuple[int, int]]:
        """Per-channel statistics this transform reads: {tensor: (rank, channel axis)}. None by default."""
        return {}

    @abstractmethod
    def apply(self, graph: Editable, stats: dict[str, ChannelStats], ctx: TransformContext) -> set[str]:
        """Edit `graph.model` in place; return the tensors whose values changed."""

    def report(self) -> dict:
        return {"applied": self.applied, "skipped": self.skipped}


class QuantizedTransform(Transform):
    """A step on the QDQ model (see the module docstring): `apply_quantized(qmodel, float model, ctx)`
    returns the new QDQ model; the float model is the one that was quantized (same node names)."""

    after_quantization = True

    def apply(self, graph: Editable, stats: dict[str, ChannelStats], ctx: TransformContext) -> set[str]:
        raise TypeError(f"{self.name} runs on the QDQ model (apply_quantized), not on the float graph")

    @abstractmethod
    def apply_quantized(self, qmodel: onnx.ModelProto, float_model: onnx.ModelProto,
                        ctx: TransformContext) -> onnx.ModelProto:
        """The QDQ model with this step applied (a new model; `qmodel` is left as it was)."""


_REGISTRY: dict[str, type[Transform]] = {}


def register_transform(cls: type[Transform]) -> type[Transform]:
    if cls.name in _REGISTRY:
        raise ValueError(f"transform {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def transform_registry() -> dict[str, type[Transform]]:
    return dict(_REGISTRY)


def make_transforms(steps: Iterable[tuple[str, dict]]) -> list[Transform]:
    """Transform objects for (registered name, settings) pairs, settings validated by each `Config`."""
    return [_REGISTRY[name](_REGISTRY[name].Config.model_validate(dict(settings))) for name, settings in steps]


@dataclass
class TransformResult:
    model: onnx.ModelProto
    report: dict = field(default_factory=dict)
    stale: set[str] = field(default_factory=set)
    # What a rewrite needs from the quantizer (e.g. `outlier_split`): activations at 16 bits, and MAC nodes
    # that read 16 bits. A transform states them as its `promote16` / `wide_nodes` attributes.
    promote16: set[str] = field(default_factory=set)
    wide_nodes: set[str] = field(default_factory=set)

    @property
    def changed(self) -> bool:
        return bool(self.report)


def downstream(model: onnx.ModelProto, starts: Iterable[str]) -> set[str]:
    """Every tensor computed from any of the nodes named in `starts` (their outputs included)."""
    start = set(starts)
    reached: set[str] = set()
    for node in model.graph.node:  # topologically sorted
        if node.name in start or any(i in reached for i in node.input if i):
            reached.update(o for o in node.output if o)
    return reached


def apply_transforms(model: onnx.ModelProto, transforms: Sequence[Transform], ctx: TransformContext) -> TransformResult:
    """Apply `transforms` in order to a copy of `model` (see the module docstring); steps that run after
    quantization are left to the caller."""
    transforms = [t for t in transforms if not t.after_quantization]
    result = TransformResult(copy_model(model))
    if not transforms:
        return result
    graph = Editable(result.model)
    stats: dict[str, ChannelStats] = {}
    measured: set[str] = set()
    for index, transform in enumerate(transforms):
        wanted = transform.requests(graph)
        if set(wanted) - measured:
            # One pass for this transform and every later one, on the graph as it is now.
            requests = {}
            for later in transforms[index:]:
                requests.update(later.requests(graph) if later is not transform else wanted)
            if ctx.batches is None:
                raise ValueError(f"{transform.name} needs calibration batches (TransformContext.batches)")
            graph = Editable(result.model)  # shapes and names after the transforms so far
            service = StatisticsService(result.model, optimize=False)
            service.request_channels(dict(sorted(requests.items())))
            stats.update(service.collect(ctx.batches(), limit=ctx.samples).channels)
            measured |= set(requests)
        result.stale |= transform.apply(graph, stats, ctx)
        result.report[transform.name] = transform.report()
        result.promote16 |= set(getattr(transform, "promote16", ()))
        result.wide_nodes |= set(getattr(transform, "wide_nodes", ()))
    return result
