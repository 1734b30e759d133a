"""Quantize: the prepared float model to the target's format, from the calibrate stage's statistics.

QDQ insertion is onnxruntime's (`QDQQuantizer`), fed with *our* ranges: its own calibrators are not run.
What we decide is what to quantize and with which range:

- operators: those the target runs on the NPU in this format (its operator table) that onnxruntime can
  quantize; the rest stay float and the placement report says they fall back to the CPU;
- the attention-mask path (float tensors computed from integer inputs by casts and constants) stays float:
  quantizing it is how onnxruntime and Quark turn MiniLM's cosine into 0.35 and 0.25;
- ranges: the recipe's method per tensor; Softmax inputs that carry an additive mask get a mask-aware range
  (the masked spike is ignored, and the range is wide enough that clipped masked scores still vanish);
- XINT8: power-of-two scales chosen by minimising quantization MSE, for activations and weights alike.

Before Q/DQ insertion, the recipe's accuracy transforms (cross-layer equalization, SmoothQuant, bias
correction; `pipeline.transforms`) rewrite a copy of the float model, and statistics that went stale are
recollected on it; then, if the recipe enables it, the accuracy-aware fallback (`pipeline.fallback`)
chooses which tensors go to 16 bits and which nodes to BF16 or the CPU, checking the gates on held-out
calibration data. Both are done here so calibrate's statistics stay those of the prepared model.

BF16 needs no quantizer: the NPU compiles the float32 model to bfloat16 itself, so the artifact is the
float model, and validation runs a copy that rounds to bfloat16 at every op boundary.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RecipeError, StageError
from ..onnx_utils import load_onnx, save_onnx
from ..recipe import CalibMethod, Format, Recipe
from ..runner import RunContext, Stage, atomic_write, dump_json
from .. import stats as S

__all__ = ["QuantizeStage", "FormatSpec", "FORMATS", "resolve_format", "mask_path_nodes", "quantize_qdq", "choose_range"]

# Ops onnxruntime's QDQ quantizer knows how to wrap; the target's table decides which of them we ask for.
_COMPUTE_OPS = {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "Clip", "LeakyRelu",
    "Sigmoid", "HardSigmoid", "Softmax", "AveragePool", "GlobalAveragePool", "MaxPool", "Concat", "Resize",
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Pad", "Gather", "Where",
    "Tanh", "Erf", "Pow", "Sqrt", "ReduceMean", "LayerNormalization", "InstanceNormalization",
}


@dataclass(frozen=True)
class FormatSpec:
    """How a format is expressed with onnxruntime's quantizer."""

    activation_bits: int
    activation_type: str  # QuantType member name
    weight_type: str
    symmetric_activations: bool
    per_channel: bool
    power_of_two: bool
    reduce_range: bool = False
    contrib_ops: bool = False  # 16-bit Q/DQ at opset 17 live in the com.microsoft domain


FORMATS: dict[Format, FormatSpec] = {
    Format.XINT8: FormatSpec(8, "QInt8", "QInt8", True, False, True),
    Format.A8W8: FormatSpec(8, "QInt8", "QInt8", True, False, False),
    Format.A16W8: FormatSpec(16, "QInt16", "QInt8", True, False, False, contrib_ops=True),
    # CPU: asymmetric uint8 activations, per-channel int8 weights; reduce_range keeps AVX2's u8s8
    # kernels from saturating (the peers' 52.8% digits figure on this CPU).
    Format.U8S8: FormatSpec(8, "QUInt8", "QInt8", False, True, False, reduce_range=True),
}


def resolve_format(recipe: Recipe):
    """The target object and the format the recipe asks for (or the target's default)."""
    from ..targets import get_target

    target = get_target(recipe.quantization.target)
    fmt = recipe.quantization.format or target.default_format
    if fmt not in target.formats:
        accepted = ", ".join(f.value for f in target.formats)
        raise RecipeError(
            f"quantization.format: target '{target.name}' does not take '{fmt.value}' (it takes: {accepted})"
        )
    return target, fmt


def mask_path_nodes(model) -> set[str]:
    """Nodes that compute float tensors from integer inputs by casts and elementwise constant math.

    These build additive attention masks; they run once per input, not per layer, and carry -1e4 fills
    that no 8-bit range can share with real activations.
    """
    from onnx import TensorProto

    init = {i.name: i for i in model.graph.initializer}
    int_inputs = {
        i.name for i in model.graph.input
        if i.name not in init and i.type.tensor_type.elem_type != TensorProto.FLOAT
    }
    passthrough = {
        "Cast", "Sub", "Mul", "Add", "Unsqueeze", "Reshape", "Expand", "Not", "Equal", "Where", "Neg",
        "Flatten", "Gather", "And", "Or",
    }

    def is_float_weight(name: str) -> bool:
        # Scalars (the -1e4 fill, 1.0) are mask constants; a float tensor (an embedding table) is a weight.
        t = init.get(name)
        return t is not None and t.data_type == TensorProto.FLOAT and int(np.prod(t.dims)) > 1

    derived = set(int_inputs)
    nodes = set()
    for node in model.graph.node:  # graph is topologically sorted
        dynamic = [i for i in node.input if i and i not in init]
        if (
            node.op_type in passthrough
            and dynamic
            and all(i in derived for i in dynamic)
            and not any(is_float_weight(i) for i in node.input)
        ):
            derived.update(node.output)
            nodes.add(node.name)
    return nodes


def _masked_softmax_inputs(model, mask_nodes: set[str]) -> dict[str, str]:
    """Softmax inputs made by Add(scores, mask) with the mask from the mask path: {input: scores}."""
    mask_tensors = {o for n in model.graph.node if n.name in mask_nodes for o in n.output}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for node in model.graph.node:
        add = producers.get(node.input[0]) if node.op_type == "Softmax" else None
        if add is not None and add.op_type == "Add":
            a, b = add.input
            if b in mask_tensors:
                found[node.input[0]] = a
            elif a in mask_tensors:
                found[node.input[0]] = b
    return found


def _weight_pow2_overrides(model, spec: FormatSpec, quantized_ops: set[str]) -> dict:
    """Power-of-two scale for every weight initializer of a quantized Conv/Gemm/MatMul (XINT8)."""
    from onnx import numpy_helper

    weights = {i.name: i for i in model.graph.initializer}
    overrides = {}
    for node in model.graph.node:
        if node.op_type not in {"Conv", "ConvTranspose", "Gemm", "MatMul"} or node.op_type not in quantized_ops:
            continue
        for name in node.input[:2]:
            if name in weights and name not in overrides:
                values = numpy_helper.to_array(weights[name]).astype(np.float32).ravel()
                stats = S.TensorStats.from_array(values)
                scale = S.pow2_scale_mse(stats, num_bits=8)
                overrides[name] = [_pow2_override(scale)]
    return overrides


def _pow2_override(scale: float) -> dict:
    # 0-d arrays: onnxruntime (1.32 here) rejects numpy scalars (np.float32, np.int8) in TensorQuantOverrides.
    return {"scale": np.array(scale, dtype=np.float32), "zero_point": np.array(0, dtype=np.int8)}


def _promoted_constants(model, promoted: set[str]) -> list[str]:
    """Constant operands (not weights or biases) of the nodes that write a promoted tensor: a bias Add or
    a position-embedding Add computing at 16 bits reads its constant at 16 bits too (as in A16W8)."""
    from onnx import TensorProto

    init = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    found = set()
    for node in model.graph.node:
        if not promoted & set(node.output):
            continue
        for slot, name in enumerate(node.input):
            is_weight = node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and slot >= 1
            if name in init and not is_weight:
                found.add(name)
    return sorted(found)


def choose_range(stats: "S.TensorStats", method: CalibMethod, *, bits: int, symmetric: bool, percentile: float):
    """(lo, hi, method used) for one tensor."""
    if method is CalibMethod.MINMAX:
        lo, hi = S.minmax(stats, symmetric=symmetric)
    elif method is CalibMethod.PERCENTILE:
        lo, hi = S.percentile(stats, percentile, symmetric=symmetric)
    elif method is CalibMethod.ENTROPY:
        lo, hi = S.entropy(stats, num_bits=bits, symmetric=symmetric)
    elif method is CalibMethod.MSE:
        lo, hi = S.mse(stats, num_bits=bits, symmetric=symmetric)
    else:
        lo, hi, won = S.auto(stats, num_bits=bits, symmetric=symmetric)
        return float(lo), float(hi), won
    return float(lo), float(hi), method.value


class QuantizeStage(Stage):
    name = "quantize"
    sections = ("quantization", "calibration")
    after = ("prepare", "calibrate")
    revision = 2

    def extra_key(self, ctx: RunContext) -> dict:
        if not ctx.recipe.quantization.fallback.enabled:
            return {}
        # The fallback searches until the gates hold, scoring held-out data with the validation task's
        # metrics on this output: all three shape its result.
        recipe = ctx.recipe
        return {"gates": recipe.section_json("gates"), "task": recipe.validation.task, "output": recipe.validation.output}

    def run(self, ctx: RunContext, out: Path) -> dict:
        target, fmt = resolve_format(ctx.recipe)
        model = load_onnx(ctx.require("prepare", "model.onnx"), where="prepared model")
        if fmt is Format.BF16:
            return _bf16(ctx, model, out, target)
        return _qdq(ctx, model, out, target, fmt)


def _bf16(ctx: RunContext, model, out: Path, target) -> dict:
    from ..bf16 import emulate_bf16

    keep = set(ctx.recipe.quantization.exclude_nodes)
    save_onnx(model, out / "model.onnx")
    save_onnx(emulate_bf16(model, keep_float=keep), out / "emulated.onnx")
    atomic_write(out / "ranges.json", dump_json({"format": "bf16", "tensors": {}}))
    return {"format": "bf16", "target": target.name, "float_nodes": sorted(keep)}


def _qdq(ctx: RunContext, model, out: Path, target, fmt: Format) -> dict:
    """Transforms (optional) -> fallback search (optional) -> QDQ insertion, in that order.

    Writes model.onnx and ranges.json; with transforms also float.onnx (the float graph that was
    quantized) and transforms.json; with the fallback fallback.json, and emulated.onnx when nodes went
    to BF16 (validate runs that one: the QDQ model with those nodes rounded to bfloat16).
    """
    from ..fallback import FallbackConfig, RecipeFallback, npu_numerics

    recipe = ctx.recipe
    settings = recipe.quantization
    collector = S.StatsCollector.load(ctx.require("calibrate", "stats.npz"))
    common = dict(target=target, fmt=fmt, method=recipe.calibration.method, percentile=recipe.calibration.percentile)
    transformed, collector, report = _transform(ctx, model, collector, common)

    def quantize(config: FallbackConfig):
        moved = sorted(config.bf16 | config.cpu)
        return quantize_qdq(transformed, collector, **common, exclude_nodes=[*settings.exclude_nodes, *moved],
                            promote={t: 16 for t in config.promote}, promote_method=settings.fallback.promoted_method)

    config = FallbackConfig()
    fallback = None
    if settings.fallback.enabled and recipe.gates:
        fallback = RecipeFallback(recipe, transformed, model, quantize, target, fmt, progress=ctx.progress).run()
        config = fallback.config
        atomic_write(out / "fallback.json", dump_json(fallback.to_json()))
    quantized, ranges, info = quantize(config)
    save_onnx(quantized, out / "model.onnx")
    if config.bf16:
        save_onnx(npu_numerics(quantized, config), out / "emulated.onnx")
    if report is not None:
        if report.stale:  # the statistics the ranges came from (the report draws their histograms)
            collector.save(out / "stats.npz")
        save_onnx(transformed, out / "float.onnx")
        atomic_write(out / "transforms.json", dump_json({"transforms": report.report, "stale": sorted(report.stale)}))
        info["transforms"] = {name: len(part["applied"]) for name, part in report.report.items()}
    if fallback is not None:
        info["fallback"] = {"passed": fallback.passed, **config.to_json(),
                            "chosen": fallback.chosen.to_json() if fallback.chosen else None}
    atomic_write(out / "ranges.json", dump_json({"format": fmt.value, "tensors": ranges}))
    return info


def _transform(ctx: RunContext, model, collector, common: dict):
    """The recipe's accuracy transforms on the float model; statistics recollected where they went stale.

    Applied here, before Q/DQ insertion, so calibrate's statistics stay those of the prepared model and
    quantize can still be rerun without transforms. Returns (model, statistics, TransformResult or None).
    """
    settings = ctx.recipe.quantization
    if not (settings.cross_layer_equalization or settings.smoothquant is not None or settings.bias_correction):
        return model, collector, None
    from ..data import open_dataset
    from ..transforms import apply_transforms
    from .calibrate import collect_statistics

    recipe = ctx.recipe
    samples = min(settings.transform_samples, recipe.calibration.samples)
    result = apply_transforms(
        model,
        cross_layer_equalization=settings.cross_layer_equalization,
        smoothquant=settings.smoothquant,
        bias_correction=settings.bias_correction,
        batches=lambda: open_dataset(recipe, "calibration", limit=samples),
        samples=samples,
        # Bias correction reads the weights the quantizer makes; they depend on the weights only.
        quantize=lambda m: quantize_qdq(m, collector, **common, exclude_nodes=settings.exclude_nodes)[0],
    )
    if result.stale:
        collector = collect_statistics(result.model, open_dataset(recipe, "calibration"), progress=ctx.progress)
    return result.model, collector, result


def quantize_qdq(
    model,
    collector: "S.StatsCollector",
    *,
    target,
    fmt: Format,
    method: CalibMethod,
    percentile: float = 99.999,
    exclude_nodes: Iterable[str] = (),
    promote: Mapping[str, int] | None = None,
    promote_method: CalibMethod | None = None,
):
    """QDQ-quantize `model` with ranges from `collector`; returns (model, ranges by tensor, info).

    `exclude_nodes` stay float (they run on the CPU). `promote` maps activation tensors to a wider
    integer (16 bits): the accuracy-aware fallback's first step before giving a node up to the CPU;
    `promote_method` (default: `method`) chooses their ranges.
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    spec = FORMATS[fmt]
    promote = dict(promote or {})
    present_ops = {n.op_type for n in model.graph.node}
    op_types = sorted(op for op in present_ops & _COMPUTE_OPS if target.runs(op, fmt))
    known_nodes = {n.name for n in model.graph.node}
    unknown = sorted(set(exclude_nodes) - known_nodes)
    if unknown:
        raise RecipeError(f"quantization.exclude_nodes: no node named {', '.join(unknown)} in the prepared model")
    mask_nodes = mask_path_nodes(model)
    exclude = sorted(set(exclude_nodes) | mask_nodes)
    masked_scores = _masked_softmax_inputs(model, mask_nodes)
    symmetric = spec.symmetric_activations
    ranges, methods, overrides = {}, {}, {}
    for name in collector.names:
        stats = collector[name]
        bits = promote.get(name, spec.activation_bits)
        how = promote_method if promote_method is not None and bits != spec.activation_bits else method
        if name in masked_scores and masked_scores[name] in collector:
            lo, hi, used = _masked_softmax_range(collector[masked_scores[name]], how, percentile, bits)
        else:
            lo, hi, used = choose_range(stats, how, bits=bits, symmetric=symmetric, percentile=percentile)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise StageError(f"quantize: range of '{name}' is not finite ({lo}, {hi})")
        if spec.power_of_two and bits == 8:
            scale = S.pow2_scale_mse(stats, num_bits=8)
            overrides[name] = [_pow2_override(scale)]
            lo, hi = -128 * scale, 127 * scale
        elif bits != spec.activation_bits:
            overrides[name] = [{"quant_type": QuantType.QInt16}]
        ranges[name] = TensorData(lowest=np.float32(lo), highest=np.float32(hi))
        methods[name] = {"lo": lo, "hi": hi, "method": used, "bits": bits}
    if spec.power_of_two:
        overrides.update(_weight_pow2_overrides(model, spec, set(op_types)))
    for name in _promoted_constants(model, {t for t, b in promote.items() if b == 16}):
        overrides[name] = [{"quant_type": QuantType.QInt16}]
    extra = {
        "ActivationSymmetric": symmetric,
        "WeightSymmetric": True,
        "UseQDQContribOps": spec.contrib_ops or any(b == 16 for b in promote.values()),
        "TensorQuantOverrides": overrides,
        # Keep Relu/Clip as nodes: the NPU compiler fuses them; removing them needs asymmetric ranges.
        "QDQKeepRemovableActivations": True,
    }
    quantizer = QDQQuantizer(
        model,
        spec.per_channel,
        spec.reduce_range,
        getattr(QuantType, spec.weight_type),
        getattr(QuantType, spec.activation_type),
        TensorsData(CalibrationMethod.MinMax, ranges),
        None,
        exclude,
        op_types,
        extra,
    )
    quantizer.quantize_model()
    # The quantizer appends the graph-input Q/DQ pairs last; ONNX requires topological order.
    quantizer.model.topological_sort()
    quantized = quantizer.model.model
    counts: dict[str, int] = {}
    for node in quantized.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    won: dict[str, int] = {}
    for entry in methods.values():
        won[entry["method"]] = won.get(entry["method"], 0) + 1
    info = {
        "format": fmt.value,
        "target": target.name,
        "op_types_quantized": op_types,
        "excluded_nodes": exclude,
        "mask_path_nodes": sorted(mask_nodes),
        "promoted_to_16_bits": sorted(t for t, b in promote.items() if b == 16),
        "range_methods": dict(sorted(won.items())),
        "op_histogram": dict(sorted(counts.items())),
    }
    return quantized, methods, info


def _masked_softmax_range(scores, method: CalibMethod, percentile: float, bits: int):
    """Range for a Softmax input that carries an additive mask (Add(scores, mask) -> Softmax).

    The range comes from the scores before the mask was added (the Add's other input), so the -1e4
    spike of masked positions does not set the scale; it is then widened so that a masked score,
    clipped to -range, still sits 16 below the largest real score: exp(-16) ~ 1e-7 of the mass.
    """
    lo, hi, used = choose_range(scores, method, bits=bits, symmetric=True, percentile=percentile)
    bound = max(abs(lo), abs(hi), 16.0 - hi)
    return -bound, bound, f"{used}+mask"
