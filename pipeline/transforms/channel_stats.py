"""Per-channel activation statistics, streamed: max |x| and mean of x per channel of chosen tensors.

The calibrate stage keeps per-tensor histograms; SmoothQuant needs each input channel's max |x| and bias
correction each input channel's mean. Both are reduced *inside* the graph (Abs + ReduceMax and
ReduceMean over every axis but the channel axis), so a sample returns one vector per tensor and memory
is flat in the number of samples (onnxruntime's SmoothQuant keeps every activation of every sample).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["ChannelStats", "collect_channel_stats"]


@dataclass
class ChannelStats:
    """Per-channel max |x| and mean of one tensor, over `samples` samples."""

    absmax: np.ndarray
    mean: np.ndarray
    samples: int

    def rescaled(self, s: np.ndarray) -> "ChannelStats":
        """The statistics of x / s (per channel), as after a fold: no second pass over the data."""
        return ChannelStats(self.absmax / s, self.mean / s, self.samples)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _reduce(graph, op: str, source: str, out: str, axes: list[int], opset: int, tag: str) -> None:
    # ReduceMax takes axes as an input from opset 18 on, ReduceMean too; before, as an attribute.
    if opset >= 18:
        name = f"{tag}_axes"
        graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), name))
        graph.node.append(helper.make_node(op, [source, name], [out], keepdims=0))
    else:
        graph.node.append(helper.make_node(op, [source], [out], axes=axes, keepdims=0))


def instrument_channels(model: onnx.ModelProto, tensors: Mapping[str, tuple[int, int]]) -> onnx.ModelProto:
    """A copy of `model` whose outputs are, per tensor (name -> (rank, channel axis)), absmax and mean."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    del graph.output[:]
    opset = _opset(model)
    for index, (name, (rank, axis)) in enumerate(tensors.items()):
        axes = [a for a in range(rank) if a != axis % rank]
        tag = f"_chan{index}"
        graph.node.append(helper.make_node("Abs", [name], [f"{tag}_abs"]))
        _reduce(graph, "ReduceMax", f"{tag}_abs", f"{tag}_absmax", axes, opset, f"{tag}_max")
        _reduce(graph, "ReduceMean", name, f"{tag}_mean", axes, opset, f"{tag}_mean")
        for out in (f"{tag}_absmax", f"{tag}_mean"):
            graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    return model


def collect_channel_stats(
    model: onnx.ModelProto,
    tensors: Mapping[str, tuple[int, int]],
    batches: Iterable[dict],
    *,
    limit: int,
) -> dict[str, ChannelStats]:
    """One streaming pass over at most `limit` batches; {tensor: ChannelStats}."""
    from ..onnx_utils import make_session

    if not tensors:
        return {}
    # Unoptimized: onnxruntime 1.32's MatMulAddFusion can hand a rewritten graph an initializer name the
    # prepare stage's own fusion already used ("Attempt to replace the existing tensor").
    session = make_session(instrument_channels(model, tensors).SerializeToString(), optimize=False)
    names = list(tensors)
    absmax: dict[str, np.ndarray] = {}
    total: dict[str, np.ndarray] = {}
    seen = 0
    for batch in batches:
        if seen >= limit:
            break
        results = session.run(None, batch)
        for i, name in enumerate(names):
            a, m = results[2 * i].astype(np.float64), results[2 * i + 1].astype(np.float64)
            absmax[name] = np.maximum(absmax[name], a) if name in absmax else a
            total[name] = total[name] + m if name in total else m
        seen += 1
    if seen == 0:
        return {}
    return {n: ChannelStats(absmax[n], total[n] / seen, seen) for n in names}
