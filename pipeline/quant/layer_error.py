"""Per-layer error: SQNR between the float model's activations and the quantized model's, tensor by tensor.

In a QDQ graph every float activation `T` keeps its name (its producer still writes `T`), and the value
the next op actually reads is the DequantizeLinear output of `T`'s Q/DQ pair. Comparing that value with
the float model's `T`, on the same inputs, gives the accumulated error at that point of the network: the
ranking says where the error comes from. Sums are reduced inside one graph holding both models and streamed
(`pipeline.core.metrics.ErrorSums`), so memory is one sample's activations.

Softmax inputs that carry an additive attention mask are scored on unmasked positions only: the -1e4 at
masked positions clips harmlessly, and would otherwise read as ~0 dB.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..core.masks import MASKED_BELOW, masked_softmax_inputs
from ..core.metrics import ErrorSums, sqnr_db
from ..core.onnx_io import expose_outputs, make_session
from ..core.sampling import strided
from ..core.shapes import float_values
from ..core.side_by_side import SideBySideError, side_by_side
from .shared_grid import fused_activation_inputs

# Where the two models cannot share a graph (`_compare_exposed`), a strided subsample of this many values per
# tensor and sample estimates the sums (a 112x112x96 MobileNet activation has 1.2M values to copy out).
LAYER_SAMPLE = 1 << 16

__all__ = [
    "LAYER_SAMPLE",
    "LayerError", "layer_errors", "quantized_view", "compare_values", "layer_error_report", "node_sqnr_drop",
    "local_sqnr",
]


@dataclass(frozen=True)
class LayerError:
    tensor: str
    producer: str  # the node that writes the tensor in the float model
    op_type: str
    sqnr_db: float
    cosine: float


def quantized_view(qmodel: onnx.ModelProto) -> dict[str, str]:
    """{float tensor: the name of the value consumers read in the QDQ model (its DQ output)}."""
    graph_inputs = {i.name for i in qmodel.graph.input}
    producers = {o for n in qmodel.graph.node for o in n.output} | graph_inputs
    dq_of = {n.input[0]: n.output[0] for n in qmodel.graph.node if n.op_type == "DequantizeLinear"}
    view = {}
    for node in qmodel.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in producers and node.output[0] in dq_of:
            view[node.input[0]] = dq_of[node.output[0]]
    return view


def compare_values(float_model, qmodel, batches: Iterable[dict], pairs: dict[str, str], *,
                   masked: Collection[str] = ()) -> tuple[dict[str, ErrorSums], dict[str, ErrorSums]]:
    """({float tensor: ErrorSums} of `pairs` (float tensor -> the qmodel value to compare), and the same for
    the tensors in `masked` scored only where the float value is above MASKED_BELOW), in one streamed pass.

    Both models run in one session (`pipeline.core.side_by_side`) whose outputs are the sums themselves,
    reduced inside the graph: a sample returns five scalars per tensor instead of two copies of every
    activation (MiniLM: 1.4 s instead of 3.3 s for 16 samples). Models that cannot share a graph are
    compared the slower way, each exposing its values."""
    masked = [t for t in masked if t in pairs]
    try:
        merged, f_name, q_name = side_by_side(float_model, qmodel, ("_float/", "_quant/"))
    except SideBySideError:
        return _compare_exposed(float_model, qmodel, batches, pairs, masked)
    graph = merged.graph
    graph.initializer.extend([numpy_helper.from_array(np.array(MASKED_BELOW, np.float32), "_masked_below"),
                              numpy_helper.from_array(np.array(0.0, np.float32), "_zero")])
    keys = []
    for index, (tensor, value) in enumerate(pairs.items()):
        jobs = [(tensor, False)] + ([(tensor, True)] if tensor in masked else [])
        for job, (name, only_unmasked) in enumerate(jobs):
            ref, got, tag = f_name(name), q_name(value), f"_cmp{index}_{job}_"
            if only_unmasked:  # masked positions contribute zero to every sum
                graph.node.extend([
                    helper.make_node("Greater", [ref, "_masked_below"], [tag + "keep"]),
                    helper.make_node("Where", [tag + "keep", ref, "_zero"], [tag + "ref"]),
                    helper.make_node("Where", [tag + "keep", got, "_zero"], [tag + "got"]),
                ])
                ref, got = tag + "ref", tag + "got"
            graph.node.extend([
                helper.make_node("Sub", [got, ref], [tag + "err"]),
                helper.make_node("Mul", [ref, got], [tag + "prod"]),
                helper.make_node("Abs", [tag + "err"], [tag + "abs"]),
                helper.make_node("ReduceSumSquare", [ref], [tag + "signal"], keepdims=0),
                helper.make_node("ReduceSumSquare", [tag + "err"], [tag + "noise"], keepdims=0),
                helper.make_node("ReduceSum", [tag + "prod"], [tag + "dot"], keepdims=0),
                helper.make_node("ReduceSumSquare", [got], [tag + "energy"], keepdims=0),
                helper.make_node("ReduceMax", [tag + "abs"], [tag + "max_abs"], keepdims=0),
            ])
            graph.output.extend(helper.make_tensor_value_info(tag + k, onnx.TensorProto.FLOAT, [])
                                for k in _SUMS)
            keys.append((name, only_unmasked))
    # The float half unoptimized would cost more than both; MatMulAddFusion stays off (onnxruntime 1.32
    # fails on some rewritten float graphs: "Attempt to replace the existing tensor", MiniLM after SmoothQuant).
    session = make_session(merged, npu_emulation=True, disabled_optimizers=("MatMulAddFusion",), may_edit=True)
    sums = {t: ErrorSums() for t in pairs}
    masked_sums = {t: ErrorSums() for t in masked}
    for batch in batches:
        values = session.run(None, batch)
        for i, (name, only_unmasked) in enumerate(keys):
            target = (masked_sums if only_unmasked else sums)[name]
            signal, noise, dot, energy, max_abs = (float(v) for v in values[len(_SUMS) * i: len(_SUMS) * (i + 1)])
            target.signal += signal
            target.noise += noise
            target.dot += dot
            target.energy += energy
            target.max_abs = max(target.max_abs, max_abs)
    return sums, masked_sums


_SUMS = ("signal", "noise", "dot", "energy", "max_abs")


def _compare_exposed(float_model, qmodel, batches: Iterable[dict], pairs: dict[str, str],
                     masked: Collection[str]) -> tuple[dict[str, ErrorSums], dict[str, ErrorSums]]:
    """compare_values for models that cannot share a graph: both expose the values, strided subsamples."""
    names = list(pairs)
    # Unoptimized: see compare_values (MatMulAddFusion).
    f_session = make_session(expose_outputs(float_model, names), optimize=False)
    q_session = make_session(expose_outputs(qmodel, [pairs[t] for t in names]), npu_emulation=True,
                             may_edit=True)
    f_index = {o.name: i for i, o in enumerate(f_session.get_outputs())}
    q_index = {o.name: i for i, o in enumerate(q_session.get_outputs())}
    sums = {t: ErrorSums() for t in names}
    masked_sums = {t: ErrorSums() for t in masked}
    for batch in batches:
        f_out, q_out = f_session.run(None, batch), q_session.run(None, batch)
        for t in names:
            ref, got = strided(f_out[f_index[t]], LAYER_SAMPLE), strided(q_out[q_index[pairs[t]]], LAYER_SAMPLE)
            sums[t].update(ref, got)
            if t in masked_sums:
                keep = ref > MASKED_BELOW
                masked_sums[t].update(ref[keep], got[keep])
    return sums, masked_sums


def layer_errors(float_model, qmodel, batches: Iterable[dict], *, masked: Collection[str] = ()) -> list[LayerError]:
    """SQNR (dB) and cosine of every quantized activation, worst first, over `batches`; the tensors in
    `masked` scored on their unmasked positions."""
    view = quantized_view(qmodel)
    producers = {o: n for n in float_model.graph.node for o in n.output}
    # A fused activation's input is quantized on the activation's range (negatives clipped: the Relu drops
    # them anyway); scored against the float pre-activation it would read as a collapse that is not one.
    fused = fused_activation_inputs(float_model)
    names = sorted(t for t in view if t in producers and t not in fused)
    sums, masked_sums = compare_values(float_model, qmodel, batches, {t: view[t] for t in names}, masked=masked)
    sums.update(masked_sums)
    results = [LayerError(t, producers[t].name, producers[t].op_type, sums[t].sqnr_db, sums[t].cosine) for t in names]
    return sorted(results, key=lambda e: e.sqnr_db)


def layer_error_report(float_model, qmodel, batches: Sequence[dict], *, bf16: bool = False) -> dict:
    """Per-layer SQNR/cosine, worst first, mask-aware, as JSON-ready data.

    A Softmax input that carries an additive attention mask is rescored on its unmasked positions
    (a masked score clipped to the range's bottom changes nothing, but counts as a huge error).
    `bf16`: `qmodel` is a bfloat16-rounding copy; every float node output is compared by name.
    """
    producers = {o: n for n in float_model.graph.node for o in n.output}
    if bf16:  # the bf16 copy rounds node outputs in place: compare the float values both have, by name
        pairs = {t: t for t in float_values(float_model) & float_values(qmodel)}
        sums, _ = compare_values(float_model, qmodel, batches, pairs)
        errors = [LayerError(t, producers[t].name, producers[t].op_type, sums[t].sqnr_db, sums[t].cosine)
                  for t in sorted(pairs)]
        rescored = set()
    else:
        rescored = set(masked_softmax_inputs(float_model)) & set(quantized_view(qmodel))
        errors = layer_errors(float_model, qmodel, batches, masked=rescored)
    order = {o: i for i, n in enumerate(float_model.graph.node) for o in n.output}
    layers = []
    for e in errors:
        entry = {"tensor": e.tensor, "producer": e.producer, "op_type": e.op_type, "order": order.get(e.tensor, -1),
                 "sqnr_db": round(e.sqnr_db, 4), "cosine": round(e.cosine, 6)}
        if e.tensor in rescored:
            entry["note"] = f"additive attention mask: positions below {MASKED_BELOW:g} (masked) excluded"
        layers.append(entry)
    layers.sort(key=lambda x: (x["sqnr_db"], x["tensor"]))
    return {"samples": len(batches), "layers": layers}


def node_sqnr_drop(float_model, qmodel, batches: Iterable[dict], candidates: Iterable[str]) -> dict[str, float]:
    """dB of SQNR each candidate node loses between its worst input and its output in `qmodel`."""
    errors = {e.tensor: e.sqnr_db for e in layer_errors(float_model, qmodel, batches)}
    wanted = set(candidates)
    drops = {}
    for node in float_model.graph.node:
        if node.name not in wanted:
            continue
        outs = [errors[o] for o in node.output if o in errors]
        ins = [errors[i] for i in node.input if i in errors]
        if not outs:
            continue
        drops[node.name] = (min(ins) if ins else 200.0) - min(outs)
    return drops


def local_sqnr(model, ranges: dict[str, dict], batches: Iterable[dict], *, masked: Iterable[str] = ()) -> dict[str, float]:
    """Each tensor's own quantization SQNR (dB): its float values against their fake-quantized copy.

    `ranges[t]` holds "lo", "hi" (symmetric or not) and "bits", as quantize chose them. Tensors named in
    `masked` (Softmax inputs with an additive mask) are scored where the value is above MASKED_BELOW.
    """
    names = list(ranges)
    masked = set(masked)
    session = make_session(expose_outputs(model, names), optimize=False)
    index = {o.name: i for i, o in enumerate(session.get_outputs())}
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    for batch in batches:
        outputs = session.run(None, batch)
        for t in names:
            x = outputs[index[t]].astype(np.float64).ravel()
            if t in masked:
                x = x[x > MASKED_BELOW]
            r = ranges[t]
            levels = 2.0 ** r["bits"] - 1
            scale = max((r["hi"] - r["lo"]) / levels, 1e-30)
            zero = np.round(-r["lo"] / scale)
            q = np.clip(np.round(x / scale) + zero, 0, levels)
            err = (q - zero) * scale - x
            signal[t] += float(x @ x)
            noise[t] += float(err @ err)
    return {t: sqnr_db(signal[t], noise[t]) for t in names}
