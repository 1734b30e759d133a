"""QDQ insertion through onnxruntime's `QDQQuantizer`, fed with *our* ranges (its calibrators never run).

What is decided here is what to quantize and with which range:
- operators: those the target runs on its device in this format (its operator table) that onnxruntime can
  quantize; the rest stay float and the placement report says they fall back to the CPU;
- the attention-mask path (float tensors computed from integer inputs) stays float (`pipeline.core.masks`);
- ranges: the recipe's range method per tensor; Softmax inputs that carry an additive mask get a mask-aware
  range (the masked spike is ignored, and the range is wide enough that clipped masked scores still vanish);
- power-of-two formats (XINT8): an activation gets the smallest power of two that clips no more than its
  range method does (`pow2_covering`; measured on MobileNetV2, rounding the scale down instead, as a
  power-of-two MSE does, clips the residual stream's outliers and costs the confident crops' top-1: 81% vs
  97%); `transforms.align` moves foldable tensors onto the grid beforehand. Weights (MSE over powers of
  two unless `weight_method` says otherwise) and every other constant the quantizer turns into Q/DQ (a Mul/Div/Add operand, a LayerNormalization
  scale: `_constant_pow2_overrides`) too, zero point 0; the int32 biases onnxruntime derives (Conv,
  ConvTranspose, Gemm, LayerNormalization's beta: scale = input scale x weight scale) are then powers of
  two as well, being products of powers of two;
- fused activations: a tensor read only by a Relu or Clip (Conv -> Relu) gets the activation's output
  range and scale (`fused_activation_inputs`). The NPU runs Conv+Relu as one kernel that requantizes
  once, to the output's scale. onnxruntime shares the two by itself, except where a tensor override
  (XINT8's power-of-two scales, 16-bit promotions) is given: there each got its own, and the
  pre-activation pair spent int8 levels on values the activation discards (MobileNetV2 XINT8: a 0.125
  step before each ReLU6 whose output has 0.0625);
- weights: `weight_method` (`pipeline.quant.weight_ranges`: minmax, mse) chooses each weight's scale from
  its exact values; None keeps onnxruntime's max|w| (and XINT8's power-of-two MSE);
- the format row (`pipeline.core.formats`) gives bit widths, storage types, symmetry and granularity;
  `promote` lifts chosen activations to 16 bits (the accuracy-aware fallback).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping

import numpy as np
import onnx

from ..core.formats import Format
from ..core.masks import mask_path_nodes, masked_softmax_inputs
from ..core.ops import LAYOUT_OPS, MAC_OPS, QUANTIZABLE_OPS
from ..errors import RecipeError, StageError
from .histogram import StatsCollector, TensorStats
from .ranges import choose_range
from .ranges.methods import pow2_scale_mse
from .requant import plan_bits
from .shared_grid import clip_floors, fused_activation_inputs, pad_values_on_their_grid, padded_outputs
from .weight_ranges import weight_scale

__all__ = ["quantize_qdq", "pow2_override", "pow2_covering"]


_POW2_TOLERANCE = 1.035  # a range this much above a power of two still takes that power (a 0.3 dB clip)


def pow2_covering(scale: float) -> float:
    """The smallest power of two >= scale / `_POW2_TOLERANCE` (scale > 0)."""
    k = math.ceil(math.log2(scale / _POW2_TOLERANCE))
    return math.ldexp(1.0, k)


def pow2_override(scale: float) -> dict:
    # 0-d arrays: onnxruntime (1.32 here) rejects numpy scalars (np.float32, np.int8) in TensorQuantOverrides.
    return {"scale": np.array(scale, dtype=np.float32), "zero_point": np.array(0, dtype=np.int8)}


def _weight_overrides(model: onnx.ModelProto, quantized_ops: set[str], bits: int, pow2: bool,
                      method: str | None) -> dict:
    """A scale for every weight initializer of a quantized Conv/ConvTranspose/Gemm/MatMul: by `method`
    (`weight_ranges`), or for XINT8 without one, the power-of-two scale of lowest MSE on its histogram."""
    from onnx import numpy_helper

    weights = {i.name: i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    overrides = {}
    for node in model.graph.node:
        if node.op_type not in MAC_OPS or node.op_type not in quantized_ops:
            continue
        for name in node.input[:2]:
            if name in weights and name not in overrides:
                values = numpy_helper.to_array(weights[name]).astype(np.float32).ravel()
                if method is not None:
                    scale = weight_scale(values, method, bits=bits, power_of_two=pow2)
                else:
                    scale = pow2_scale_mse(TensorStats.from_array(values), num_bits=bits)
                overrides[name] = [pow2_override(scale)]
    return overrides


# Inputs onnxruntime quantizes as an int32 bias with scale = input scale x weight scale (not overridden).
_BIAS_SLOTS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2, "LayerNormalization": 2, "InstanceNormalization": 2}


def _constant_pow2_overrides(model: onnx.ModelProto, quantized_ops: set[str], bits: int, method: str | None,
                             exclude: set[str], taken: set[str]) -> dict:
    """XINT8: a power-of-two scale (zero point 0) for every float constant input of a quantized node that is
    not a MAC weight (those have theirs) or a derived bias, by `method` (default mse) on its exact values."""
    from onnx import numpy_helper

    consts = {i.name: i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    overrides = {}
    for node in model.graph.node:
        if node.op_type not in quantized_ops or node.name in exclude:
            continue
        for slot, name in enumerate(node.input):
            if name not in consts or name in taken or name in overrides or slot == _BIAS_SLOTS.get(node.op_type):
                continue
            if node.op_type in MAC_OPS and slot == 1:
                continue
            values = numpy_helper.to_array(consts[name]).astype(np.float32).ravel()
            overrides[name] = [pow2_override(weight_scale(values, method or "mse", bits=bits, power_of_two=True))]
    return overrides


def _promoted_constants(model: onnx.ModelProto, promoted: set[str]) -> list[str]:
    """Constant operands (not weights or biases) of the nodes that write a promoted tensor: a bias Add or
    a position-embedding Add computing at 16 bits reads its constant at 16 bits too (as in A16W8)."""
    from onnx import TensorProto

    init = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    found = set()
    for node in model.graph.node:
        if not promoted & set(node.output):
            continue
        for slot, name in enumerate(node.input):
            is_weight = node.op_type in MAC_OPS and slot >= 1
            if name in init and not is_weight:
                found.add(name)
    return sorted(found)


def _requant_plan(model, promote: Mapping[str, int], wide_nodes, spec):
    """The requantizing plan (`pipeline.quant.requant`) when the format's activations are 8-bit and the
    caller asked for it (`wide_nodes` given); None keeps the plain rule (readers of 16 bits read 16 bits)."""
    if wide_nodes is None or spec.activation_bits >= 16:
        return None
    return plan_bits(model, {t for t, b in promote.items() if b == 16}, wide_nodes)


def _read_by_macs_only(model: onnx.ModelProto, tensors) -> set[str]:
    """The `tensors` every reader of which, through layout ops, is a MAC node (and no graph output)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}

    def only_macs(tensor: str) -> bool:
        todo, seen = [tensor], {tensor}
        while todo:
            name = todo.pop()
            if name in outputs or not readers.get(name):
                return False
            for node in readers[name]:
                if node.op_type in LAYOUT_OPS:
                    if node.output[0] not in seen:
                        seen.add(node.output[0])
                        todo.append(node.output[0])
                elif node.op_type not in MAC_OPS:
                    return False
        return True

    return {t for t in tensors if only_macs(t)}


def _int8_copy(stats: TensorStats, readers, lo_hi, spec, method: str, percentile: float) -> dict:
    """The "convert" override of a 16-bit tensor: the int8 copy its MAC readers get, with its own range
    (`lo_hi`, else the recipe's method at 8 bits). "lo"/"hi"/"method" are for the report (popped after)."""
    from onnxruntime.quantization import QuantType

    if lo_hi is not None:
        (lo, hi), used = lo_hi, "output-error"
    else:
        lo, hi, used = choose_range(stats, method, bits=8, symmetric=spec.symmetric_activations, percentile=percentile)
    conv = {"quant_type": getattr(QuantType, spec.activation_type), "recv_nodes": set(readers),
            "lo": float(lo), "hi": float(hi), "method": used}
    if spec.power_of_two:
        conv.update(pow2_override(pow2_scale_mse(stats, num_bits=8)))
    else:
        conv.update(rmin=np.float32(lo), rmax=np.float32(hi))
    return conv


def _floor_on_grid(lo: float, hi: float, floor: float, bits: int) -> tuple[float, float]:
    """A symmetric range whose grid holds `floor` (< 0) exactly: the step widened to |floor| / k, k the
    number of whole steps the chosen range gives it (at most the grid's half), so nothing clips more."""
    top = (1 << (bits - 1)) - 1
    step = max(abs(lo), abs(hi)) / top
    if not step > 0:
        return lo, hi
    k = min(top, max(1, math.floor(abs(floor) / step + 1e-9)))
    a = abs(floor) / k * top
    return -a, a


def _masked_softmax_range(scores: TensorStats, method: str, percentile: float, bits: int):
    """Range for a Softmax input that carries an additive mask (Add(scores, mask) -> Softmax).

    The range comes from the scores before the mask was added (the Add's other input), so the -1e4
    spike of masked positions does not set the scale; it is then widened so that a masked score,
    clipped to -range, still sits 16 below the largest real score: exp(-16) ~ 1e-7 of the mass.
    """
    lo, hi, used = choose_range(scores, method, bits=bits, symmetric=True, percentile=percentile)
    bound = max(abs(lo), abs(hi), 16.0 - hi)
    return -bound, bound, f"{used}+mask"


def quantize_qdq(
    model: onnx.ModelProto,
    collector: StatsCollector,
    *,
    target,
    fmt: Format,
    method: str,
    percentile: float = 99.999,
    exclude_nodes: Iterable[str] = (),
    promote: Mapping[str, int] | None = None,
    promote_method: str | None = None,
    wide_nodes: Collection[str] | None = None,
    int8_ranges: Mapping[str, tuple[float, float]] | None = None,
    weight_method: str | None = None,
    output_method: str | None = None,
):
    """QDQ-quantize `model` with ranges from `collector`; returns (model, ranges by tensor, info).

    `exclude_nodes` stay float (they run on the CPU). `promote` maps activation tensors to a wider
    integer (16 bits): the accuracy-aware fallback's first step before giving a node up to the CPU;
    `promote_method` (default: `method`) chooses their ranges.

    `wide_nodes` (None: every MAC node reading a promoted value reads it at 16 bits, as A16W8) names the
    MAC nodes that may read 16 bits; every other MAC reader of a 16-bit value gets an int8 copy through a
    requantizing pair (`pipeline.quant.requant`), so 16-bit residuals and LayerNorms cost no int8 MACs.
    `int8_ranges` overrides the (lo, hi) of a tensor's int8 quantization (its int8 copy's, or its own when
    only MAC nodes read it: a clip chosen for them must not clip a residual Add reading the same int8
    value), e.g. ranges chosen by the reading layer's output error (`pipeline.quant.output_ranges`).
    `weight_method`: how weight scales are chosen (module docstring). `output_method` (default: `method`)
    chooses the ranges of the graph outputs: a method that clips for the sake of the bulk of a tensor
    (`mse`) can clip an output's largest values, which are the answer (the top logit, a far box), or
    saturate a whole channel of it to a constant.
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    fmt = Format(fmt)
    spec = fmt.spec
    if not spec.quantized:
        raise StageError(f"quantize: format {fmt.value} has no Q/DQ (it is a float format)")
    method = str(getattr(method, "value", method))
    promote_method = None if promote_method is None else str(getattr(promote_method, "value", promote_method))
    promote = dict(promote or {})
    plan = _requant_plan(model, promote, wide_nodes, spec)
    if plan is not None:
        promote = {t: 16 for t in plan.wide16}
    int8_ranges = dict(int8_ranges or {})
    if int8_ranges:
        copies = set(plan.int8_readers) if plan is not None else set()
        keep = copies | _read_by_macs_only(model, set(int8_ranges) - copies)
        int8_ranges = {t: r for t, r in int8_ranges.items() if t in keep}
    present_ops = {n.op_type for n in model.graph.node}
    op_types = sorted(op for op in present_ops & QUANTIZABLE_OPS if target.runs(op, fmt))
    known_nodes = {n.name for n in model.graph.node}
    unknown = sorted(set(exclude_nodes) - known_nodes)
    if unknown:
        raise RecipeError(f"quantization.exclude_nodes: no node named {', '.join(unknown)} in the prepared model")
    mask_nodes = mask_path_nodes(model)
    exclude = sorted(set(exclude_nodes) | mask_nodes)
    masked_scores = masked_softmax_inputs(model, mask_nodes)
    symmetric = spec.symmetric_activations
    floors = clip_floors(model)
    graph_outputs = {o.name for o in model.graph.output}
    ranges, methods, overrides = {}, {}, {}
    for name in collector.names:
        stats = collector[name]
        bits = promote.get(name, spec.activation_bits)
        how = promote_method if promote_method is not None and bits != spec.activation_bits else method
        if output_method is not None and name in graph_outputs and bits == spec.activation_bits:
            how = output_method
        if name in masked_scores and masked_scores[name] in collector:
            lo, hi, used = _masked_softmax_range(collector[masked_scores[name]], how, percentile, bits)
        elif bits == spec.activation_bits and name in int8_ranges:
            (lo, hi), used = int8_ranges[name], "output-error"
            if not spec.power_of_two:  # as overrides: onnxruntime resets Softmax outputs' ranges to [0, 1]
                overrides[name] = [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
        else:
            lo, hi, used = choose_range(stats, how, bits=bits, symmetric=symmetric, percentile=percentile)
            if name in floors and symmetric and not spec.power_of_two:
                lo, hi = _floor_on_grid(lo, hi, floors[name], bits)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise StageError(f"quantize: range of '{name}' is not finite ({lo}, {hi})")
        if spec.power_of_two and bits in (8, 16):  # promoted 16-bit values shift-requantize too
            top = (1 << (bits - 1)) - 1
            scale = pow2_covering(max(abs(lo), abs(hi), 1e-8) / top)
            override = pow2_override(scale)
            if bits == 16:
                override.update(zero_point=np.array(0, dtype=np.int16), quant_type=QuantType.QInt16)
            overrides[name] = [override]
            lo, hi = -(top + 1) * scale, top * scale
        elif bits != spec.activation_bits:
            overrides[name] = [{"quant_type": QuantType.QInt16}]
        ranges[name] = TensorData(lowest=np.float32(lo), highest=np.float32(hi))
        methods[name] = {"lo": lo, "hi": hi, "method": used, "bits": bits}
        if plan is not None and name in plan.int8_readers:
            conv = _int8_copy(stats, plan.int8_readers[name], int8_ranges.get(name), spec, method, percentile)
            overrides.setdefault(name, [{}])[0]["convert"] = conv
            methods[name]["int8_copy"] = {k: v for k, v in conv.items() if k in ("lo", "hi", "method")}
            for key in ("lo", "hi", "method"):
                conv.pop(key)
    def share(target: str, source: str, how: str) -> None:
        """`target` quantized exactly as `source` (range, method, overrides; not its int8 copy)."""
        ranges[target] = ranges[source]
        methods[target] = {k: v for k, v in methods[source].items() if k != "int8_copy"}
        methods[target]["method"] = f"{how}:{methods[source]['method']}"
        shared = [{k: v for k, v in o.items() if k != "convert"} for o in overrides.get(source, [])]
        if any(shared):
            overrides[target] = shared
        else:
            overrides.pop(target, None)

    for out, source in padded_outputs(model).items():
        # A Pad's output holds its input's values and the pad value (bias absorption's shifted zero, which
        # lies inside the input's range): one grid for both, as for a zero pad, so no requantization.
        if source in methods:
            share(out, source, "pad")
    fused = fused_activation_inputs(model)
    for source, out in fused.items():
        # The activation's quantization whole, bits included: the NPU's Conv+activation kernel requantizes
        # once, to the output's type and scale (a 16-bit pre-activation that free_16bit or a fallback chose
        # would exist only in the graph, and an int8 one on its own range would round twice). Calibration
        # does not measure these inputs (`collect_histograms`). Conv -> Relu -> Clip: the last one's.
        while out in fused:
            out = fused[out]
        if out in methods and "int8_copy" not in methods.get(source, {}):
            share(source, out, "fused")
    if weight_method is not None and (spec.per_channel_weights or spec.weight_bits != 8):
        weight_method = None  # per-channel (U8S8) and 4-bit weights keep onnxruntime's own scales
    if spec.power_of_two or weight_method is not None:
        overrides.update(_weight_overrides(model, set(op_types), spec.weight_bits, spec.power_of_two, weight_method))
    if spec.power_of_two:
        overrides.update(_constant_pow2_overrides(model, set(op_types), spec.weight_bits, weight_method, set(exclude),
                                                  set(overrides)))
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
        spec.per_channel_weights,
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
    pad_values_on_their_grid(quantized)
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
        "requantized_to_int8": {t: sorted(r) for t, r in sorted(plan.int8_readers.items())} if plan is not None else {},
        "range_methods": dict(sorted(won.items())),
        "op_histogram": dict(sorted(counts.items())),
    }
    return quantized, methods, info
