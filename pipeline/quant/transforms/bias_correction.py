"""Bias correction (Nagel et al., 2019): remove the systematic output shift that weight rounding causes.

With quantized weights W_q = W + E, a layer's output moves by E x; its expectation over the data,
E[x] E per output channel, is a bias the float model never had. It is subtracted from the layer's bias:
b' = b - sum_k E[x_k] E[k, :] (for a Conv, summed over the kernel window too, which ignores the zero
padding at the borders; grouped and depthwise Convs sum over the inputs each output reads,
`layers.WeightLayer.response`). E[x] is the per-channel mean of the layer's float input over the calibration
samples (`channel_stats`); W_q is what the quantizer actually produces for this model and format (read
back from a QDQ model), so its rounding and scale rules are never re-implemented here.

Where the bias lives: a Conv's or Gemm's bias input (a Conv without one gets one), or the constant of
the Add that follows a MatMul (the exporter's MatMul + Add). A MatMul with no bias Add is skipped.
This changes the float function on purpose, so every statistic downstream of a corrected layer is stale.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from ...core.editable import Editable
from ..statistics import ChannelStats
from .base import Transform, TransformContext, downstream, register_transform
from .layers import weight_inputs, weight_layer

__all__ = ["BiasCorrection", "dequantized_weights"]


def dequantized_weights(qmodel: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{node name: the float value of its quantized weight} for every MatMul/Gemm/Conv of a QDQ model."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    found = {}
    for node in qmodel.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv", "ConvTranspose") or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        q = inits[dq.input[0]].astype(np.float64)
        scale = inits[dq.input[1]].astype(np.float64)
        zero = inits[dq.input[2]].astype(np.float64) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
        if scale.ndim == 1 and scale.size > 1:  # per-axis
            axis = Editable.attr(dq, "axis", 1)
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        found[node.name] = ((q - zero) * scale).astype(np.float32)
    return found


@register_transform
class BiasCorrection(Transform):
    name = "bias_correction"
    ops = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})

    def inputs(self, graph: Editable) -> dict[str, list[onnx.NodeProto]]:
        return weight_inputs(graph, self.ops)

    def requests(self, graph: Editable) -> dict[str, tuple[int, int]]:
        return {t: (len(graph.shape(t)), weight_layer(graph, c[0]).activation_axis) for t, c in self.inputs(graph).items()}

    def apply(self, graph: Editable, stats: dict[str, ChannelStats], ctx: TransformContext) -> set[str]:
        """Correct every layer; everything downstream of a corrected layer changes."""
        if ctx.quantize is None:
            raise ValueError("bias correction needs the quantizer (to read the weights it makes)")
        corrected = self.correct(graph, stats, dequantized_weights(ctx.quantize(graph.model)))
        self.samples = max((s.samples for s in stats.values()), default=0)
        return downstream(graph.model, corrected)

    def report(self) -> dict:
        return {"samples": getattr(self, "samples", 0), **super().report()}

    def correct(self, graph: Editable, stats: Mapping[str, ChannelStats], quantized: Mapping[str, np.ndarray]) -> list[str]:
        """Correct every layer with input statistics and a quantized weight; returns the corrected nodes."""
        corrected = []
        for tensor, consumers in self.inputs(graph).items():
            for node in consumers:
                if tensor not in stats or node.name not in quantized:
                    self.skipped.append({"node": node.name, "reason": "no input statistics or not quantized"})
                    continue
                layer = weight_layer(graph, node)
                wq = quantized[node.name].astype(np.float64)
                if wq.shape != layer.weight.shape:
                    self.skipped.append({"node": node.name, "reason": "quantized weight has another shape"})
                    continue
                # shift[o] = sum over the inputs output o reads (and the kernel window) of E[o, i, ...] * mean[i]
                shift = layer.response(stats[tensor].mean, wq - layer.weight)
                where = self._correct(graph, layer, shift)
                if where is None:
                    self.skipped.append({"node": node.name, "reason": "no bias to correct (MatMul without an Add)"})
                    continue
                corrected.append(node.name)
                self.applied.append({
                    "node": node.name,
                    "bias": where,
                    "max_shift": float(np.abs(shift).max()),
                    "mean_shift": float(np.abs(shift).mean()),
                })
        return corrected

    @staticmethod
    def _correct(graph: Editable, layer, shift: np.ndarray) -> str | None:
        node = layer.node
        if layer.has_bias_slot:
            if len(node.input) > 2 and node.input[2]:
                bias = layer.bias(graph)
                if bias is None:
                    return None
                layer.set_bias(graph, bias - shift, "biascorr")
                return f"{node.op_type} '{node.name}' bias"
            layer.set_bias(graph, -shift, "biascorr")
            return f"{node.op_type} '{node.name}' new bias"
        add = graph.only_consumer(node.output[0])
        if add is None or add.op_type != "Add":
            return None
        slot = 0 if graph.const(add.input[0]) is not None else 1
        bias = graph.const(add.input[slot])
        if bias is None or bias.size != shift.size:
            return None
        graph.set_input_const(add, slot, bias - shift.reshape(bias.shape), "biascorr")
        return f"Add '{add.name}' constant"
