"""Where a QDQ artifact's error comes from, measured by taking quantization away (issue 8's analysis).

    PYTHONPATH=. python scripts/activation_noise.py RUN_DIR RECIPE [--samples N] [--per-tensor]

RUN_DIR is a finished run of RECIPE (`npu-pipeline run RECIPE --out RUN_DIR`). Prints the logit SQNR of
the run's quantized model (emulated NPU numerics) against the float model on the first N validation
samples, then the same with:
- every activation Q/DQ pair bypassed (weights alone quantized);
- `--per-tensor`: each activation pair bypassed alone (slow: one pass per pair), the top 15;
- residual-stream oracle: the int8 pairs of the tensors residual Adds join given one scale per channel
  (their calibration maximum per channel, never wider than the chosen range): what equalizing the stream
  perfectly could buy, an upper bound no per-tensor format reaches.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.core.metrics import ErrorSums
from pipeline.core.onnx_io import copy_model, make_session
from pipeline.data import open_dataset
from pipeline.recipe import load_recipe


def _sqnr(model: onnx.ModelProto, data: list[dict], ref: np.ndarray) -> float:
    session = make_session(model.SerializeToString(), npu_emulation=True)
    out = np.concatenate([session.run(None, b)[0] for b in data])
    sums = ErrorSums()
    sums.update(ref, out)
    return sums.sqnr_db


def _bypassed(model: onnx.ModelProto, pairs: list[onnx.NodeProto]) -> onnx.ModelProto:
    """`model` with the given activation Q nodes and their DQs replaced by Identity (float passes through)."""
    qs = {q.output[0]: q.input[0] for q in pairs}
    m = copy_model(model)
    nodes = []
    for node in m.graph.node:
        if node.op_type == "QuantizeLinear" and node.output[0] in qs:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in qs:
            node = helper.make_node("Identity", [qs[node.input[0]]], [node.output[0]])
        nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def _stream_tensors(model: onnx.ModelProto) -> set[str]:
    inits = {t.name for t in model.graph.initializer}
    return {name for n in model.graph.node if n.op_type == "Add" and not set(n.input) & inits
            for name in (*n.input, n.output[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--per-tensor", action="store_true")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    data = list(open_dataset(recipe, "validation", limit=args.samples))
    float_session = make_session(args.run / "prepare" / "model.onnx")
    ref = np.concatenate([float_session.run(None, b)[0] for b in data])
    q = onnx.load(str(args.run / "quantize" / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    activation_qs = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    print(f"quantized model: {_sqnr(q, data, ref):.2f} dB on {len(data)} validation samples")
    print(f"every activation pair bypassed: {_sqnr(_bypassed(q, activation_qs), data, ref):.2f} dB")
    if args.per_tensor:
        gains = sorted(((_sqnr(_bypassed(q, [n]), data, ref), n.input[0]) for n in activation_qs), reverse=True)
        for value, name in gains[:15]:
            print(f"  {value:6.2f} dB  without the pair of {name}")

    # Residual-stream oracle: per-channel scales on the int8 pairs of the stream tensors (or of their
    # int8 copies, `..._convert_...`), from the float model's per-channel extremes on calibration samples.
    float_model = onnx.load(str(args.run / "quantize" / "float.onnx")) if (args.run / "quantize" / "float.onnx").exists() \
        else onnx.load(str(args.run / "prepare" / "model.onnx"))
    stream = _stream_tensors(float_model)
    producer = {o: n for n in q.graph.node for o in n.output}
    targets = {}
    for node in activation_qs:
        source = node.input[0]
        while source not in stream and source in producer and producer[source].op_type in ("DequantizeLinear", "QuantizeLinear"):
            source = producer[source].input[0]
        if source in stream and inits[node.input[2]].dtype == np.int8:
            targets[node.output[0]] = (node, source)
    exposed = copy_model(float_model)
    names = sorted({s for _, s in targets.values()})
    exposed.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    session = make_session(exposed.SerializeToString())
    outputs = [o.name for o in session.get_outputs()]
    peak = {}
    for batch in open_dataset(recipe, "calibration", limit=32):
        values = dict(zip(outputs, session.run(None, batch)))
        for n in names:
            per_channel = np.abs(values[n]).max(axis=tuple(a for a in range(values[n].ndim) if a != 1))
            peak[n] = np.maximum(peak.get(n, 0), per_channel)
    oracle = copy_model(q)
    readers = {}
    for node in oracle.graph.node:
        if node.op_type == "DequantizeLinear":
            readers.setdefault(node.input[0], []).append(node)
    by_output = {n.output[0]: n for n in oracle.graph.node if n.op_type == "QuantizeLinear"}
    for out, (node, source) in targets.items():
        chosen = float(inits[node.input[1]]) * 127
        scale = np.maximum(np.minimum(peak[source], chosen) / 127, 1e-8).astype(np.float32)
        oracle.graph.initializer.extend([numpy_helper.from_array(scale, out + "_oracle_scale"),
                                         numpy_helper.from_array(np.zeros(scale.shape, np.int8), out + "_oracle_zero")])
        for member in [by_output[out], *readers.get(out, [])]:
            member.input[1], member.input[2] = out + "_oracle_scale", out + "_oracle_zero"
            del member.attribute[:]
            member.attribute.append(helper.make_attribute("axis", 1))
    print(f"residual stream ({len(targets)} int8 pairs) with per-channel scales: {_sqnr(oracle, data, ref):.2f} dB")


if __name__ == "__main__":
    main()
