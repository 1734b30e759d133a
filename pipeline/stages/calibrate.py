"""Calibrate: stream the calibration set through the float model and gather activation statistics.

onnxruntime's calibrators make every activation a graph output and keep them all in RAM (about 82 MB per
MiniLM sample: 16.8 GiB for 200 samples with Percentile). Here the statistics are computed *inside* the
graph: for every float activation the instrumented model returns its exact min and max (ReduceMin,
ReduceMax) and a strided subsample of about 4,096 values (a prime stride, so every channel is sampled
evenly). Those few numbers feed a fixed-size histogram per tensor (`pipeline.stats`), so memory does not
grow with the number of samples and the Python side touches kilobytes, not megabytes, per sample.

Statistics are gathered for every float activation, whatever the format: quantize can then be rerun with
another format or range method without running the model again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import open_dataset
from ..errors import DataError, StageError
from ..onnx_utils import load_onnx, make_session, model_opset
from ..runner import RunContext, Stage, atomic_write, dump_json
from ..stats import StatsCollector

__all__ = ["CalibrateStage", "activation_tensors", "collect_statistics", "instrument", "SAMPLE_SIZE"]

SAMPLE_SIZE = 4096


def _float_shapes(model) -> dict[str, list[int]]:
    """Static shapes of every float32 value the graph knows (inputs, outputs, value_info)."""
    from onnx import TensorProto

    shapes = {}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type != TensorProto.FLOAT:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
        shapes[value.name] = dims
    return shapes


# Ops whose output holds exactly the values of their input, rearranged: same statistics.
_PERMUTING = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
# Calibration samples gathered before one histogram update per tensor (bounds Python overhead).
_UPDATE_EVERY = 8


def permuted_aliases(model, tensors: dict[str, list[int]]) -> dict[str, str]:
    """{tensor: the measured tensor it rearranges}, for outputs of Reshape/Transpose/... chains."""
    aliases: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in _PERMUTING and node.input and node.output[0] in tensors:
            source = aliases.get(node.input[0], node.input[0])
            if source in tensors:
                aliases[node.output[0]] = source
    return aliases


def activation_tensors(model) -> dict[str, list[int]]:
    """Float activations worth a range: graph inputs and node outputs that are not constants."""
    init_names = {i.name for i in model.graph.initializer}
    shapes = _float_shapes(model)
    names = [i.name for i in model.graph.input if i.name not in init_names]
    for node in model.graph.node:
        if node.op_type in ("Constant", "Shape", "ConstantOfShape"):
            continue
        names.extend(o for o in node.output if o)
    result = {}
    for name in names:
        shape = shapes.get(name)
        if shape is not None and all(d > 0 for d in shape) and name not in init_names:
            result[name] = shape
    return result


def _next_prime(n: int) -> int:
    n = max(2, n)
    while any(n % p == 0 for p in range(2, int(n**0.5) + 1)):
        n += 1
    return n


def instrument(model, tensors: dict[str, list[int]]):
    """A copy of `model` whose outputs are, per tensor, its min, max and a strided subsample."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    del graph.output[:]
    flat = numpy_helper.from_array(np.array([-1], dtype=np.int64), "_calib_flat")
    graph.initializer.append(flat)
    axes_as_input = model_opset(model) >= 18
    axis_consts: set[int] = set()
    for index, (name, shape) in enumerate(tensors.items()):
        numel = int(np.prod(shape))
        tag = f"_calib{index}"
        for op, suffix in (("ReduceMin", "min"), ("ReduceMax", "max")):
            source = name
            if len(shape) >= 2 and numel > SAMPLE_SIZE:
                # onnxruntime reduces to a scalar on one thread; reducing the last axis first runs in
                # parallel over the rows, then the scalar reduce reads only one value per row (~3x faster).
                source = f"{tag}_rows_{suffix}"
                last = len(shape) - 1
                if axes_as_input:  # opset 18 moved `axes` from an attribute to an input
                    graph.node.append(helper.make_node(op, [name, f"_calib_axis{last}"], [source], keepdims=0))
                    axis_consts.add(last)
                else:
                    graph.node.append(helper.make_node(op, [name], [source], axes=[last], keepdims=0))
            graph.node.append(helper.make_node(op, [source], [f"{tag}_{suffix}"], keepdims=0))
        graph.node.append(helper.make_node("Reshape", [name, "_calib_flat"], [f"{tag}_flat"]))
        sample = f"{tag}_flat"
        if numel > SAMPLE_SIZE:
            stride = _next_prime(-(-numel // SAMPLE_SIZE))
            consts = {"starts": stride // 2, "ends": numel, "axes": 0, "steps": stride}
            for key, value in consts.items():
                graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), f"{tag}_{key}"))
            sample = f"{tag}_sample"
            graph.node.append(
                helper.make_node("Slice", [f"{tag}_flat", *(f"{tag}_{k}" for k in consts)], [sample])
            )
        for out in (f"{tag}_min", f"{tag}_max", sample):
            graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    for axis in sorted(axis_consts):
        graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), f"_calib_axis{axis}"))
    return model


def _needs_statistics(ctx: RunContext) -> bool:
    """BF16 keeps float ranges: the NPU converts the float32 model, so nothing reads the statistics."""
    from ..recipe import Format
    from .quantize import resolve_format

    return resolve_format(ctx.recipe)[1] is not Format.BF16


class CalibrateStage(Stage):
    name = "calibrate"
    sections = ("inputs", "calibration")
    after = ("prepare",)

    def extra_key(self, ctx: RunContext) -> dict:
        from ..data import dataset_fingerprint

        return {**dataset_fingerprint(ctx.recipe, "calibration"), "needed": _needs_statistics(ctx)}

    def run(self, ctx: RunContext, out: Path) -> dict:
        if not _needs_statistics(ctx):
            atomic_write(out / "tensors.json", dump_json({"samples": 0, "tensors": {}, "aliases": {}}))
            return {"samples": 0, "tensors": 0, "skipped": "bf16 needs no activation ranges"}
        model = load_onnx(ctx.require("prepare", "model.onnx"), where="prepared model")
        data = open_dataset(ctx.recipe, "calibration")
        collector = collect_statistics(model, data, progress=ctx.progress)
        collector.save(out / "stats.npz")
        tensors = activation_tensors(model)
        aliases = permuted_aliases(model, tensors)
        atomic_write(
            out / "tensors.json", dump_json({"samples": len(data), "tensors": tensors, "aliases": aliases})
        )
        return {"samples": len(data), "tensors": len(tensors), "measured": len(tensors) - len(aliases)}


def collect_statistics(model, data, *, progress: bool = True) -> StatsCollector:
    """One streaming pass of `data` through `model`, returning every float activation's statistics."""
    from tqdm import tqdm

    tensors = activation_tensors(model)
    if not tensors:
        raise StageError("calibrate: the prepared model has no float activations to calibrate")
    aliases = permuted_aliases(model, tensors)
    measured = {name: shape for name, shape in tensors.items() if name not in aliases}
    session = make_session(instrument(model, measured).SerializeToString(), optimize=True)
    names = list(measured)
    collector = StatsCollector(names)
    pending: list[list] = []
    bar = tqdm(data, total=len(data), desc="calibrate", unit="sample", disable=not progress, leave=False)
    for seen, batch in enumerate(bar):
        results = session.run(None, batch)
        extremes = np.asarray([float(r) for r in results[0::3]] + [float(r) for r in results[1::3]])
        if not np.isfinite(extremes).all():
            bad = int(np.flatnonzero(~np.isfinite(extremes))[0]) % len(names)
            raise DataError(
                f"calibration data, sample {seen}: activation '{names[bad]}' is NaN/inf; "
                "the model overflows on this input (check its preprocessing)"
            )
        pending.append(results)
        if len(pending) == _UPDATE_EVERY:
            _flush(collector, names, pending)
    _flush(collector, names, pending)
    for alias, source in aliases.items():
        collector.alias(alias, source)
    return collector


def _flush(collector: StatsCollector, names: list[str], pending: list[list]) -> None:
    """One histogram update per tensor for the samples gathered so far."""
    if not pending:
        return
    for index, name in enumerate(names):
        lo = min(float(r[3 * index]) for r in pending)
        hi = max(float(r[3 * index + 1]) for r in pending)
        sample = np.concatenate([r[3 * index + 2] for r in pending])
        collector.update(name, sample, lo, hi)
    pending.clear()
