"""Per-layer error: SQNR between the float model's activations and the quantized model's, tensor by tensor.

In a QDQ graph every float activation `T` keeps its name (its producer still writes `T`), and the value
the next op actually reads is the DequantizeLinear output of `T`'s Q/DQ pair. Comparing that value with
the float model's `T`, on the same inputs, gives the accumulated error at that point of the network: the
ranking says where the error comes from. Sums are streamed, so memory is one sample's activations.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["LayerError", "layer_errors", "quantized_view"]


@dataclass(frozen=True)
class LayerError:
    tensor: str
    producer: str  # the node that writes the tensor in the float model
    op_type: str
    sqnr_db: float
    cosine: float


def quantized_view(qmodel) -> dict[str, str]:
    """{float tensor: the name of the value consumers read in the QDQ model (its DQ output)}."""
    graph_inputs = {i.name for i in qmodel.graph.input}
    producers = {o for n in qmodel.graph.node for o in n.output} | graph_inputs
    dq_of = {n.input[0]: n.output[0] for n in qmodel.graph.node if n.op_type == "DequantizeLinear"}
    view = {}
    for node in qmodel.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in producers and node.output[0] in dq_of:
            view[node.input[0]] = dq_of[node.output[0]]
    return view


def _expose(model, names: list[str]):
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return model


def layer_errors(float_model, qmodel, batches: Iterable[dict], *, bf16: bool = False) -> list[LayerError]:
    """SQNR (dB) and cosine of every quantized activation, worst first, over `batches`."""
    from .onnx_utils import make_session

    view = quantized_view(qmodel)
    if bf16:  # bf16 emulation rounds node outputs in place: compare the same names
        float_names = {o for n in float_model.graph.node for o in n.output}
        view = {o: o for n in qmodel.graph.node for o in n.output if o in float_names}
    producers = {o: n for n in float_model.graph.node for o in n.output}
    names = sorted(t for t in view if t in producers)
    f_session = make_session(_expose(float_model, names).SerializeToString(), optimize=False)
    q_session = make_session(_expose(qmodel, [view[t] for t in names]).SerializeToString(), npu_emulation=True)
    f_index = {o.name: i for i, o in enumerate(f_session.get_outputs())}
    q_index = {o.name: i for i, o in enumerate(q_session.get_outputs())}
    signal = np.zeros(len(names))
    noise = np.zeros(len(names))
    dots = np.zeros(len(names))
    q_energy = np.zeros(len(names))
    for batch in batches:
        f_out = f_session.run(None, batch)
        q_out = q_session.run(None, batch)
        for i, name in enumerate(names):
            ref = f_out[f_index[name]].astype(np.float64).ravel()
            got = q_out[q_index[view[name]]].astype(np.float64).ravel()
            signal[i] += ref @ ref
            noise[i] += (got - ref) @ (got - ref)
            dots[i] += ref @ got
            q_energy[i] += got @ got
    results = []
    for i, name in enumerate(names):
        sqnr = 10 * np.log10(signal[i] / noise[i]) if noise[i] > 0 else 200.0
        denom = np.sqrt(signal[i] * q_energy[i])
        cosine = dots[i] / denom if denom > 0 else 1.0
        node = producers[name]
        results.append(LayerError(name, node.name, node.op_type, float(min(sqnr, 200.0)), float(cosine)))
    return sorted(results, key=lambda e: e.sqnr_db)
