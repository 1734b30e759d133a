"""Bias absorption: move a constant out of an activation into the next layer's bias, so that what is left
fits a symmetric int8 grid (after Nagel et al., 2019, "Data-Free Quantization", section 4.2).

Every activation format here is symmetric (zero point 0), so a ReLU6 output in [0, 6] uses only the
positive half of int8: 7 bits. With a constant c taken out, Clip(z, 0, 6) - c = Clip(z - c, -c, 6 - c)
exactly, for every input: the producing layer's bias loses c (z - c), the Clip's bounds move by c (scalars
still), and each consumer y = W x + b gets b + W c (summed over the inputs each output reads), so the
network computes the same function. With c the middle of the activation's calibrated range the tensor is
centred on 0: its symmetric range halves, and its int8 step with it (6 dB of SQNR on that tensor). A Relu
becomes Clip(z - c, -c) (one op for one op). DFQ's own variant takes out each channel's minimum, which a
scalar Clip bound cannot follow per channel; the centre does the work here.

The consumer's bias takes W_q c, with W_q the weight the quantizer will actually write (read back from
`ctx.quantize`, as bias correction does): the float function changes by (W_q - W) c, and the quantized
model computes exactly what it did before. With W c instead, each output would carry a constant error of
(W_q - W) c, summed over hundreds of inputs: MobileNetV2's logit SQNR falls to 1 dB until a bias
correction (AdaRound's) undoes it.

Where it applies (else skipped with the reason): a weight layer with a bias slot (Conv, Gemm) -> Relu or
Clip(0 <= ... ) -> pooling/reshapes that commute with adding a constant (GlobalAveragePool, MaxPool,
Flatten, Reshape, Squeeze, Unsqueeze, Identity) -> weight layers that read it without zero padding
(1x1 convolutions, Gemm; a 3x3 depthwise layer pads with 0, which after the shift would stand for c, so
its border outputs would change: skipped). Every tensor on the way must feed only the next step.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import Field

from ...core.editable import Editable
from ..statistics import ChannelStats
from .base import Transform, TransformConfig, TransformContext, downstream, register_transform
from .bias_correction import dequantized_weights
from .fold import NotFoldable, clip_bounds
from .layers import weight_layer

__all__ = ["BiasAbsorption"]

_PASS = frozenset({"GlobalAveragePool", "MaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity"})


class BiasAbsorptionConfig(TransformConfig):
    # Share of the activation's calibrated range to take out: 0.5 centres it (the default).
    fraction: float = Field(0.5, ge=0.0, le=1.0)
    # What the consumer's bias takes: "quantized" W_q c (the quantized model computes what it did before;
    # the float model moves by (W_q - W) c), or "float" W c (the float model is kept exactly; the quantized
    # one carries a constant (W_q - W) c per output, which a later bias correction removes). Before
    # AdaRound use "float": it takes the float model as its target and corrects each output's mean error,
    # so with "quantized" it would steer the quantized model towards the moved float function.
    consumer_bias: Literal["quantized", "float"] = "quantized"
    # A consumer that pads its input with zeros (a 3x3 depthwise conv): "pad" gives it an explicit Pad
    # with the shifted zero (-c) as its value and takes its own padding away (exact; one data-movement op
    # the NPU runs in every format); "skip" leaves the activation uncentred.
    padded: Literal["pad", "skip"] = "skip"


class _Site:
    def __init__(self, site, activation, path, consumers):
        self.site, self.activation, self.path, self.consumers = site, activation, path, consumers


@register_transform
class BiasAbsorption(Transform):
    name = "bias_absorption"
    Config = BiasAbsorptionConfig

    def sites(self, graph: Editable, *, record: bool = False) -> list[_Site]:
        found = []
        for node in graph.model.graph.node:
            if node.op_type not in ("Relu", "Clip"):
                continue
            try:
                found.append(_plan(graph, node, pad=self.config.padded == "pad"))
            except NotFoldable as why:
                if record:
                    self.skipped.append({"activation": node.name, "reason": str(why)})
        return found

    def requests(self, graph: Editable) -> dict[str, tuple[int, int]]:
        return {s.activation.output[0]: (len(graph.shape(s.activation.output[0])), 1) for s in self.sites(graph)}

    def apply(self, graph: Editable, stats: dict[str, ChannelStats], ctx: TransformContext) -> set[str]:
        stale: set[str] = set()
        sites = self.sites(graph, record=True)
        use_wq = self.config.consumer_bias == "quantized" and ctx.quantize is not None
        quantized = dequantized_weights(ctx.quantize(graph.model)) if sites and use_wq else {}
        for site in sites:
            out = site.activation.output[0]
            found = stats.get(out)
            if found is None or found.max is None:
                self.skipped.append({"activation": site.activation.name, "reason": "no calibration statistics"})
                continue
            lo, hi = (clip_bounds(graph, site.activation) if site.activation.op_type == "Clip" else (0.0, np.inf))
            top = float(min(np.max(found.max), hi))
            c = self.config.fraction * top
            if not c > 0:
                self.skipped.append({"activation": site.activation.name, "reason": "the activation is never positive"})
                continue
            layer = weight_layer(graph, site.site)
            bias = layer.bias(graph)
            layer.set_bias(graph, (np.zeros(layer.n_out) if bias is None else bias) - c, "absorb")
            _shift_bounds(graph, site.activation, lo, hi, c)
            padded = []
            for node in site.consumers:
                consumer = weight_layer(graph, node)
                if consumer.pads_input():
                    padded.append(_explicit_pad(graph, node, -c))
                own = consumer.bias(graph)
                wq = quantized.get(node.name)
                usable = wq is not None and wq.shape == consumer.weight.shape
                add = consumer.response(np.full(consumer.n_in, c), wq.astype(np.float64) if usable else None)
                consumer.set_bias(graph, (np.zeros(consumer.n_out) if own is None else own) + add, "absorb")
            stale.update([site.site.output[0], out, *site.path])
            if quantized:
                stale |= downstream(graph.model, [n.name for n in site.consumers])  # they moved by (W_q - W) c
            self.applied.append({
                "activation": site.activation.name,
                "producer": site.site.name,
                "consumers": [n.name for n in site.consumers],
                "shift": round(c, 6),
                "range_before": [max(lo, 0.0), round(top, 6)],
                "range_after": [round(max(lo, 0.0) - c, 6), round(top - c, 6)],
                **({"pads": padded} if padded else {}),
            })
        return stale


def _plan(graph: Editable, act: onnx.NodeProto, *, pad: bool = False) -> _Site:
    producer = graph.producer.get(act.input[0])
    layer = weight_layer(graph, producer) if producer is not None else None
    if layer is None or not layer.has_bias_slot or producer.op_type == "ConvTranspose":
        raise NotFoldable("not made by a Conv or Gemm whose bias could take the shift")
    if graph.only_consumer(act.input[0]) is None:
        raise NotFoldable(f"'{act.input[0]}' is also read elsewhere")
    if act.op_type == "Clip":
        lo, hi = clip_bounds(graph, act)
        if lo != 0 or not hi > 0:
            raise NotFoldable(f"Clip bounds ({lo:g}, {hi:g}) are not (0, positive)")
    path, current = [], act.output[0]
    while True:
        readers = graph.consumers.get(current, [])
        if not readers or current in graph.outputs:
            raise NotFoldable(f"'{current}' is a graph output or read by nothing")
        if len(readers) == 1 and readers[0].op_type in _PASS:  # MaxPool pads with -inf, not 0: it commutes
            current = readers[0].output[0]
            path.append(current)
            continue
        break
    consumers = []
    for node in readers:
        layer = weight_layer(graph, node)
        if layer is None or node.input[0] != current or node.op_type not in ("Conv", "Gemm"):
            raise NotFoldable(f"read by {node.op_type} '{node.name}', which has no bias to take the shift")
        if layer.pads_input() and not (pad and _explicit_pads(graph, node) is not None):
            raise NotFoldable(f"{node.op_type} '{node.name}' pads its input with zeros (the borders would change)")
        consumers.append(node)
    return _Site(producer, act, path, consumers)


def _shift_bounds(graph: Editable, act: onnx.NodeProto, lo: float, hi: float, c: float) -> None:
    """Clip(z, lo, hi) - c as Clip(z - c, lo - c, hi - c); a Relu becomes Clip(z - c, -c)."""
    if act.op_type == "Relu":
        act.op_type = "Clip"
        graph.set_input_const(act, 1, np.array(-c), "absorb")
        return
    graph.set_input_const(act, 1, np.array(lo - c), "absorb")
    if np.isfinite(hi):
        graph.set_input_const(act, 2, np.array(hi - c), "absorb")


def _explicit_pads(graph: Editable, conv: onnx.NodeProto) -> list[int] | None:
    """The Conv's `pads` (begins then ends, spatial axes) when written out (auto_pad NOTSET), else None."""
    auto = graph.attr(conv, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    pads = graph.attr(conv, "pads", None)
    if auto != "NOTSET" or conv.op_type != "Conv" or not pads or graph.shape(conv.input[0]) is None:
        return None
    return [int(p) for p in pads]


def _explicit_pad(graph: Editable, conv: onnx.NodeProto, value: float) -> str:
    """Put `Pad(x, value)` in front of `conv` with the Conv's own padding, and take that padding away: a
    shifted activation's zero is `value`, and the Conv's implicit zeros would stand for something else."""
    pads = _explicit_pads(graph, conv)
    source = conv.input[0]
    shape = graph.shape(source)
    spatial = len(pads) // 2
    lead = len(shape) - spatial
    full = [0] * lead + pads[:spatial] + [0] * lead + pads[spatial:]
    out = graph.names.fresh(f"{source}_padded")
    pads_name = graph.names.fresh(f"{conv.name or out}_pads")
    value_name = graph.names.fresh(f"{conv.name or out}_pad_value")
    for name, array in ((pads_name, np.array(full, np.int64)), (value_name, np.array(value, np.float32))):
        tensor = numpy_helper.from_array(array, name)
        graph.model.graph.initializer.append(tensor)
        graph.inits[name] = tensor
    node = helper.make_node("Pad", [source, pads_name, value_name], [out], name=graph.names.fresh(f"{conv.name}_pad"),
                            mode="constant")
    nodes = graph.model.graph.node
    position = next(i for i, n in enumerate(nodes) if n is conv)
    nodes.insert(position, node)
    node = nodes[position]  # the graph's copy
    conv = nodes[position + 1]
    conv.input[0] = out
    for attr in conv.attribute:
        if attr.name == "pads":
            del attr.ints[:]
            attr.ints.extend([0] * len(pads))
    # Keep the index current for the transforms after this one.
    graph.producer[out] = node
    graph.consumers[source] = [node if n is conv else n for n in graph.consumers.get(source, [])]
    graph.consumers[out] = [conv]
    graph.consumers.setdefault(pads_name, []).append(node)
    graph.consumers.setdefault(value_name, []).append(node)
    graph.shapes[out] = tuple(d + pads[i - lead] + pads[i - lead + spatial] if i >= lead else d
                              for i, d in enumerate(shape))
    return out
