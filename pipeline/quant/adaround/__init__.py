"""AdaRound on a QDQ model: learned rounding of its integer weights, layer by layer, on streamed inputs.

    qmodel, report = adaround(qdq_model, float_model, batches, AdaRoundSettings(iterations=300))

`qdq_model` is what `pipeline.quant.qdq.quantize_qdq` made from `float_model` (same node names); `batches()`
opens a fresh iterator of calibration feeds. For every Conv (grouped and depthwise included), Gemm and
MatMul with a constant quantized weight (`layers.find_layers`), in graph order:

1. moments (`gram.collect_moments`): the layer's input in the QDQ model and its output in the float model,
   streamed over `samples` calibration samples at up to `positions` output positions each, reduced to
   Gram matrices: bounded memory. By default the inputs come from the float model (one pass for every
   layer: each layer is judged on its own rounding). `quantized_inputs` takes them from the QDQ model
   instead, layer by layer in graph order, one pass per layer, each seeing the already rounded and
   bias-corrected layers before it (the paper's sequential order): the rounding and the bias correction
   then also absorb the upstream activation quantization error. It must be sequential: in one pass every
   layer would correct the same upstream error again (MobileNetV2 A8W8: -11.4 dB in one pass, 17.4 dB
   sequential against 16.7 dB from float inputs). Each layer's pass runs from the values kept at the
   previous layer (`frontier.Frontier`, up to `CACHE_LIMIT_BYTES` per model, else that layer is streamed
   from the inputs), so it costs about what the one pass on float inputs does, not a network per layer
   (MobileNetV2 XINT8, 64 samples: 131 -> 25 s, peak RSS 654 -> 1210 MiB);
2. rounding (`solve.solve_layer`): up or down per weight, on the grid the quantizer chose (its scale and
   integer range are read back, so XINT8's power-of-two scales, per-channel U8S8 scales, any bit width
   are all just grids), kept only where it beats round-to-nearest on the layer's reconstruction error;
3. bias correction (`bias_correction`, default on): each output's mean error over the rows, now that the
   weights are final (and upstream quantization included), is moved into the layer's bias: the int32 bias
   is requantized with its own scale. Layers without a bias (a MatMul) are solved uncentered.

The QDQ structure, scales and zero points are untouched: only integer weight values (and biases) change,
so every NPU rule the model met it still meets. The report gives, per layer, the output SQNR on the
streamed rows at round-to-nearest, with bias correction, and after AdaRound, and the seconds spent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice

import numpy as np
import onnx

from ...core.onnx_io import copy_model
from ...core.shapes import static_shapes
from .frontier import Frontier
from .gram import LayerMoments, add_sample, collect_moments, empty_moments
from .layers import QuantLayer, find_layers, write_bias, write_weights
from .solve import SolveSettings, quadratic, reconstruction_error, solve_layer

__all__ = ["AdaRoundSettings", "adaround", "find_layers", "QuantLayer"]


@dataclass(frozen=True)
class AdaRoundSettings:
    iterations: int = 300
    samples: int = 64
    positions: int = 64
    rows_per_fan_in: int = 16
    quantized_inputs: bool = False
    bias_correction: bool = True
    learning_rate: float = 0.01
    regularization: float = 10.0
    warmup: float = 0.2
    work_limit: float = 1e10
    ops: tuple[str, ...] = ("Conv", "Gemm", "MatMul")
    seed: int = 0

    @property
    def solve(self) -> SolveSettings:
        """The per-layer solver's share of these settings."""
        return SolveSettings(self.iterations, self.learning_rate, self.regularization, self.warmup,
                             work_limit=self.work_limit)


def _db(signal: float, noise: float) -> float | None:
    if noise <= 0 or signal <= 0:
        return None
    return round(10 * float(np.log10(signal / noise)), 2)


def adaround(
    qmodel: onnx.ModelProto, float_model: onnx.ModelProto, batches: Callable[[], Iterable[dict]],
    settings: AdaRoundSettings = AdaRoundSettings(), *, progress: bool = False,
) -> tuple[onnx.ModelProto, dict]:
    """(a copy of `qmodel` with learned rounding, the report); see the module docstring. `progress`: a
    tqdm bar over the layers (not part of the settings: the report stays the same either way)."""
    from tqdm import tqdm

    start = time.perf_counter()
    model = copy_model(qmodel)
    layers, skipped = find_layers(model, float_model, ops=settings.ops)
    shapes = {k: list(v) for k, v in static_shapes(float_model).items()}
    # Quantized inputs: one pass per layer, so that each sees its predecessors final (module docstring).
    if settings.quantized_inputs:
        chunks = [[i] for i in range(len(layers))]
    else:
        chunks = [list(range(len(layers)))] if layers else []
    frontiers = _frontiers(model, float_model, batches, settings) if settings.quantized_inputs and layers else None
    rows, stream_seconds, streamed = [], 0.0, 0
    bar = tqdm(total=len(layers), desc="adaround", unit="layer", disable=not progress, leave=False)
    for chunk in chunks:
        part = [layers[i] for i in chunk]
        t0 = time.perf_counter()
        moments = _from_frontiers(frontiers, model, float_model, part[0], settings, shapes) if frontiers else None
        if frontiers and moments is None:
            streamed += 1  # this layer's values would not fit in the limit: streamed from the inputs
        if moments is None:
            moments = collect_moments(model, float_model, part, batches(), samples=settings.samples,
                                      positions=settings.positions, output_shapes=shapes, seed=settings.seed,
                                      quantized_inputs=settings.quantized_inputs, per_fan_in=settings.rows_per_fan_in)
        stream_seconds += time.perf_counter() - t0
        for layer in part:
            rows.append(_round_layer(model, layer, moments.pop(layer.name), settings))
            if frontiers:
                frontiers[0].changed(_initializers_of(model, layer))
            bar.update(1)
    bar.close()
    report = {
        "settings": dict(settings.__dict__),
        "layers": rows,
        "skipped": skipped,
        "adarounded": sum(r["kept"] == "adaround" for r in rows),
        "seconds": round(time.perf_counter() - start, 2),
        "stream_seconds": round(stream_seconds, 2),
        # Layers whose inputs came from kept activations, and those streamed from the model's inputs.
        **({"layers_from_kept_activations": len(layers) - streamed, "layers_streamed": streamed}
           if frontiers else {}),
    }
    return model, report


def _frontiers(model: onnx.ModelProto, float_model: onnx.ModelProto, batches: Callable[[], Iterable[dict]],
               settings: AdaRoundSettings) -> tuple[Frontier, Frontier]:
    """The QDQ and float models' values kept at the current layer (`frontier`), over the first `samples`."""
    feeds = list(islice(batches(), settings.samples))
    return Frontier(model, feeds, npu_emulation=True), Frontier(float_model, feeds, optimize=False)


def _from_frontiers(frontiers: tuple[Frontier, Frontier], model: onnx.ModelProto, float_model: onnx.ModelProto,
                    layer: QuantLayer, settings: AdaRoundSettings, shapes: dict) -> dict[str, LayerMoments] | None:
    """One layer's moments from the kept values (what `collect_moments` streams from the inputs), or None
    when keeping them would pass the memory limit."""
    quantized, floats = frontiers
    xs = quantized.values(model, [layer.input])
    ys = floats.values(float_model, [layer.output]) if xs is not None else None
    if ys is None:
        return None
    moments, keep = empty_moments([layer], samples=settings.samples, positions=settings.positions,
                                  output_shapes=shapes, per_fan_in=settings.rows_per_fan_in)
    for index, (x, y) in enumerate(zip(xs, ys)):
        add_sample(moments, keep, [layer], index, x, y, settings.seed)
    moments[layer.name].finish()
    return moments


def _initializers_of(model: onnx.ModelProto, layer: QuantLayer) -> set[str]:
    """The initializers rounding `layer` may have rewritten: its weight and what its bias input reads."""
    names = {layer.weight_int}
    if len(layer.node.input) > 2 and layer.node.input[2]:
        bias = layer.node.input[2]
        names.add(bias)
        names.update(i for n in model.graph.node if bias in n.output for i in n.input)
    return names


def _round_layer(model: onnx.ModelProto, layer: QuantLayer, m: LayerMoments, settings: AdaRoundSettings) -> dict:
    t0 = time.perf_counter()
    w = layer.grouped(layer.w_float)
    scale = layer.grouped_scale()
    has_bias = layer.op != "MatMul" and len(layer.node.input) > 2 and bool(layer.node.input[2])
    centered = settings.bias_correction and has_bias  # the per-output mean error goes into the bias
    q, found = solve_layer(w, scale, layer.qmin, layer.qmax, m, centered=centered, settings=settings.solve,
                           seed=settings.seed)
    write_weights(model, layer, layer.stored(q))
    signal = m.sum_tt
    row = {"node": layer.name, "op": layer.op, "group": layer.group, "rows": m.n, "kept": found["kept"],
           "iterations": found.get("iterations", 0),
           "flipped": found.get("flipped", 0)}
    if m.n:
        # The error at round-to-nearest without any bias correction, for the report.
        gram, cross, c = quadratic(m, centered=False)
        nearest = np.clip(np.round(w / scale), layer.qmin, layer.qmax) * scale
        row["sqnr_db_nearest"] = _db(signal, reconstruction_error(nearest, gram, cross, c))
        if centered:
            row["sqnr_db_nearest_bias_corrected"] = _db(signal, found["error_nearest"])
        row["sqnr_db"] = _db(signal, found["error_adaround"])
    if centered and m.n:
        mean_x, mean_t = m.sum_x / m.n, m.sum_t / m.n
        shift = mean_t - np.einsum("gmk,gk->gm", q * scale, mean_x)  # [g, M]
        where = write_bias(model, layer, shift.reshape(-1))
        row["bias_corrected"] = where is not None
        if where is not None:
            row["max_bias_shift"] = round(float(np.abs(shift).max()), 6)
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row
