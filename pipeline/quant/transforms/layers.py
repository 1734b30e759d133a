"""Weight layers as channel maps: which input and output channel each weight element belongs to.

Equalization, bias absorption, bias correction and AdaRound all ask the same questions of a layer with a
constant weight: the range of each input or output channel, how to scale one, and which output a weight
element feeds from which input. For a dense layer that is an axis; for a grouped or depthwise Conv
(MobileNet's 3x3 depthwise layers, weight [C, 1, k, k]: input channel c feeds output c only) and a
ConvTranspose (weight [Cin, Cout/group, k, k]) it is not. `WeightLayer` answers with reshapes over the
groups (ranges, scaling: vectorised, cheap enough for equalization's sweeps) and with index arrays
`inputs[i, j]` / `outputs[i, j]` (the channel of element [i, j, ...]) for the rest.

Covered: MatMul with a 2-D constant weight (input channel = row), Gemm (transB either way, no transA),
Conv and ConvTranspose of any group count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ...core.editable import Editable

__all__ = ["WeightLayer", "weight_layer", "weight_inputs", "LAYER_OPS"]

LAYER_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})


@dataclass
class WeightLayer:
    """A layer's constant weight seen as channels. The weight's axis 0 indexes channels of one side
    directly; axis 1 indexes channels of the other side within a group: element [i, j] belongs to channel
    (i // (n0 / group)) * n1 + j of that side (a dense layer is one group). `input_first` says which side
    axis 0 is: the input for MatMul, Gemm without transB and ConvTranspose, the output otherwise."""

    node: onnx.NodeProto
    weight: np.ndarray  # float64 copy of the constant weight
    input_first: bool
    group: int = 1

    @property
    def n_in(self) -> int:
        return self._side_size(0 if self.input_first else 1)

    @property
    def n_out(self) -> int:
        return self._side_size(1 if self.input_first else 0)

    def _side_size(self, side: int) -> int:
        return self.weight.shape[0] if side == 0 else self.weight.shape[1] * self.group

    @property
    def inputs(self) -> np.ndarray:
        """Input channel of each element of weight[:2] (a dense layer: the input axis index)."""
        return self._index(0 if self.input_first else 1)

    @property
    def outputs(self) -> np.ndarray:
        return self._index(1 if self.input_first else 0)

    def _index(self, side: int) -> np.ndarray:
        a, b = np.indices(self.weight.shape[:2])
        return a if side == 0 else (a // (self.weight.shape[0] // self.group)) * self.weight.shape[1] + b

    @property
    def activation_axis(self) -> int:
        """Channel axis of the activation input (and output): 1 for convolutions, the last for MatMul/Gemm."""
        return 1 if self.node.op_type in ("Conv", "ConvTranspose") else -1

    @property
    def has_bias_slot(self) -> bool:
        return self.node.op_type in ("Gemm", "Conv", "ConvTranspose")

    def _side_max(self, w: np.ndarray, side: int) -> np.ndarray:
        a = np.abs(w)
        a = a.reshape(a.shape[:2] + (-1,)).max(axis=2) if a.ndim > 2 else a
        if side == 0:
            return a.max(axis=1)
        return a.reshape(self.group, -1, a.shape[1]).max(axis=1).reshape(-1)

    def _side_scaled(self, s: np.ndarray, side: int) -> np.ndarray:
        w, s = self.weight, np.asarray(s, np.float64)
        kernel = (1,) * (w.ndim - 2)
        if side == 0:
            return w * s.reshape((-1, 1) + kernel)
        grouped = w.reshape((self.group, -1) + w.shape[1:])
        return (grouped * s.reshape((self.group, 1, w.shape[1]) + kernel)).reshape(w.shape)

    def input_ranges(self, w: np.ndarray | None = None) -> np.ndarray:
        """max |W| per input channel."""
        return self._side_max(self.weight if w is None else w, 0 if self.input_first else 1)

    def output_ranges(self, w: np.ndarray | None = None) -> np.ndarray:
        """max |W| per output channel."""
        return self._side_max(self.weight if w is None else w, 1 if self.input_first else 0)

    def scaled_inputs(self, s: np.ndarray) -> np.ndarray:
        """The weight with input channel c multiplied by s[c]."""
        return self._side_scaled(s, 0 if self.input_first else 1)

    def scaled_outputs(self, s: np.ndarray) -> np.ndarray:
        """The weight with output channel o multiplied by s[o]."""
        return self._side_scaled(s, 1 if self.input_first else 0)

    def response(self, per_input: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        """sum over the weight elements feeding output o of w * per_input[their input channel]: the output
        of the layer for an input constant per channel (no padding), e.g. a bias shift or a mean error."""
        w = self.weight if w is None else w
        summed = w.reshape(w.shape[:2] + (-1,)).sum(axis=2) if w.ndim > 2 else w
        out = np.zeros(self.n_out)
        np.add.at(out, self.outputs.ravel(), (summed * np.asarray(per_input, np.float64)[self.inputs]).ravel())
        return out

    def pads_input(self) -> bool:
        """True when the layer reads zero padding (a constant added to its input would not reach the border)."""
        if self.node.op_type not in ("Conv", "ConvTranspose"):
            return False
        pads = Editable.attr(self.node, "pads", None) or []
        auto = Editable.attr(self.node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        kernel_one = all(k == 1 for k in self.weight.shape[2:])
        return any(p != 0 for p in pads) or (auto not in ("NOTSET", "VALID") and not kernel_one)

    def bias(self, graph: Editable) -> np.ndarray | None:
        """The layer's own bias (Conv/ConvTranspose/Gemm input 2) as n_out values, or None."""
        if not self.has_bias_slot or len(self.node.input) < 3 or not self.node.input[2]:
            return None
        b = graph.const(self.node.input[2])
        if b is None or b.size not in (1, self.n_out):
            return None
        return np.broadcast_to(b.reshape(-1).astype(np.float64), (self.n_out,)).copy()

    def set_weight(self, graph: Editable, w: np.ndarray, tag: str) -> None:
        graph.set_input_const(self.node, 1, w, tag)
        self.weight = np.asarray(w, np.float64)

    def set_bias(self, graph: Editable, b: np.ndarray, tag: str) -> None:
        """Write a bias of n_out values (a Conv/Gemm without one gets one)."""
        graph.set_input_const(self.node, 2, np.asarray(b, np.float64).reshape(-1), tag)


def weight_layer(graph: Editable, node: onnx.NodeProto) -> WeightLayer | None:
    """The `WeightLayer` of `node`, or None when it is not a layer with a constant float weight."""
    op = node.op_type
    if op not in LAYER_OPS or len(node.input) < 2 or node.input[0] in graph.inits:
        return None
    w = graph.const(node.input[1])
    if w is None:
        return None
    w = w.astype(np.float64)
    if op == "MatMul":
        return WeightLayer(node, w, True) if w.ndim == 2 else None
    if op == "Gemm":
        if Editable.attr(node, "transA", 0) or w.ndim != 2:
            return None
        return WeightLayer(node, w, not Editable.attr(node, "transB", 0))
    group = int(Editable.attr(node, "group", 1))
    if w.ndim < 3 or group < 1 or w.shape[0] % group:
        return None
    # Conv: W [Cout, Cin/group, k...]; ConvTranspose: W [Cin, Cout/group, k...].
    return WeightLayer(node, w, op == "ConvTranspose", group)


def weight_inputs(graph: Editable, ops: frozenset[str]) -> dict[str, list[onnx.NodeProto]]:
    """{activation tensor: the weight layers (of `ops`) that read it as input 0}, in graph order."""
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.model.graph.node:
        if node.op_type in ops and node.input and node.input[0] not in graph.inits and weight_layer(graph, node):
            found.setdefault(node.input[0], []).append(node)
    return found
