"""Validate: the quantized model against the float model on held-out data, with NPU numerics.

The quantized model runs with its Q/DQ as float ops (the ideal integer arithmetic the NPU computes, at
speed: `pipeline.core.emulation`; for BF16, the bfloat16-rounding copy). The same model on the CPU EP's
fused int8 kernels is measured beside it on the first `CPU_EP_SAMPLES` samples and labelled CPU-EP: on x86
without VNNI those kernels saturate, so that figure says what a CPU deployment gets, not what the NPU gets
(`npu-pipeline parity` compares the two EPs thoroughly and finds the node where they part).

Every output is validated and reported by name (`metrics["outputs"]`), streamed sample by sample
(`pipeline.core.tasks`): generic metrics by dtype and shape (float: SQNR, relative and max error, cosine
per sample, the worst channel's SQNR and the dead channels; integer: exact agreement), and the metrics of
the task the recipe gives the output (`validation.outputs`: classification, embedding, regression,
detection, ctc, dense). The task output's metrics are also at the top level, under the names old recipes
gate on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.fileio import atomic_write, dump_json
from ..core.formats import Format
from ..core.onnx_io import load_onnx, make_session
from ..core.tasks import plan_outputs
from ..data import dataset_fingerprint, open_dataset
from ..data.labels import check_class_labels
from ..errors import DataError
from ..gates import check_outputs
from ..quant.layer_error import layer_error_report
from ..runner import RunContext, Stage

__all__ = ["ValidateStage", "flat_metrics"]

_META = ("task", "dtype", "shape", "samples", "not_measured")
# The CPU-EP column is a deployment hint, not the NPU's figure: a subset keeps validation near the cost of
# running the two models it compares.
CPU_EP_SAMPLES = 64
# Samples held at once: up to CHUNK, and no more than CHUNK_BYTES of inputs, nor of float outputs.
CHUNK, CHUNK_BYTES = 64, 64 << 20


def _nbytes(values) -> int:
    return sum(getattr(v, "nbytes", 0) for v in values)


def _chunks(items, size):
    """`items` in lists of up to CHUNK, cut where their `size(item)` adds up to CHUNK_BYTES (lazily: an item
    is drawn only when its list has room)."""
    chunk, total = [], 0
    for item in items:
        chunk.append(item)
        total += size(item)
        if len(chunk) == CHUNK or total >= CHUNK_BYTES:
            yield chunk
            chunk, total = [], 0
    if chunk:
        yield chunk


def flat_metrics(output: dict) -> dict:
    """An output's numeric metrics (what the top level and `cpu_ep` show for the task output)."""
    return {k: v for k, v in output.items()
            if k not in _META and isinstance(v, (int, float)) and not isinstance(v, bool)}


class ValidateStage(Stage):
    name = "validate"
    sections = ("inputs", "validation", "quantization")
    after = ("prepare", "quantize")
    # 2: per-layer errors (layer_errors.json); BF16 fallback nodes emulated
    # 3: every output by name, task registry, worst channel and dead channels
    # 4: per-layer errors over every value (side by side), fused activations' inputs not ranked
    revision = 4
    outputs = ("metrics.json", "layer_errors.json")

    def extra_key(self, ctx: RunContext) -> dict:
        return dataset_fingerprint(ctx.recipe, "validation")

    def run(self, ctx: RunContext, out: Path) -> dict:
        from tqdm import tqdm

        recipe = ctx.recipe
        _, fmt = recipe.target_and_format()
        float_session = make_session(ctx.require("prepare", "model.onnx"))
        # BF16, or a QDQ model whose fallback moved nodes to BF16: the copy that rounds them to bfloat16.
        bf16_nodes = fmt is not Format.BF16 and ctx.optional("quantize", "emulated.onnx") is not None
        quantized = ctx.require("quantize", "emulated.onnx" if fmt is Format.BF16 or bf16_nodes else "model.onnx")
        npu_session = make_session(quantized, npu_emulation=True)
        cpu_session = None if fmt is Format.BF16 else make_session(ctx.require("quantize", "model.onnx"))
        names = [o.name for o in float_session.get_outputs()]
        check_outputs(list(recipe.gates), recipe.validation, names)  # before the stream: a typo costs no run
        plan = plan_outputs(names, **recipe.validation.plan_arguments())
        data = open_dataset(recipe, "validation", state_model=ctx.require("prepare", "model.onnx"))
        npu = plan.evaluators()
        cpu = plan.evaluators() if cpu_session is not None else None
        runs = 0
        bar = tqdm(total=len(data), desc="validate", unit="sample", disable=not ctx.progress, leave=False)
        # Each session runs over a chunk in turn: alternating sessions sample by sample, or decoding between
        # runs, leaves the previous session's threads spinning against the next (MobileNetV2: 1.7x slower).
        # Inputs are decoded a chunk ahead; the float outputs held beside them are bounded the same way.
        for batches in _chunks(data, lambda batch: _nbytes(batch.values())):
            scored = ((batch, float_session.run(None, batch)) for batch in batches)
            for chunk in _chunks(scored, lambda item: _nbytes(item[1])):
                for offset, (_, ref) in enumerate(chunk):
                    _check_finite(names, ref, runs + offset, data.description)
                for batch, ref in chunk:
                    for name, r, g in zip(names, ref, npu_session.run(None, batch)):
                        npu[name].update(r, g)
                if cpu is not None:
                    for batch, ref in chunk[:max(0, CPU_EP_SAMPLES - runs)]:
                        for name, r, c in zip(names, ref, cpu_session.run(None, batch)):
                            cpu[name].update(r, c)
                runs += len(chunk)
                bar.update(len(chunk))
        bar.close()
        labels = data.labels
        if labels is not None and plan.task == "classification":
            labels = _checked_labels(labels, npu[plan.task_output], f"validation.data.labels ({data.description})")
        outputs = {n: e.result(labels if n == plan.task_output else None) for n, e in npu.items()}
        metrics = {
            "samples": runs,
            "task": plan.task,
            "task_output": plan.task_output,
            "numerics": "bf16-emulated" if fmt is Format.BF16 else
                        "npu-emulated (unfused QDQ, BF16 nodes rounded)" if bf16_nodes else "npu-emulated (unfused QDQ)",
            **flat_metrics(outputs[plan.task_output]),
            "outputs": outputs,
        }
        if cpu is not None:
            cpu_runs = min(runs, CPU_EP_SAMPLES)
            cpu_labels = None if labels is None else labels[:cpu_runs]
            cpu_outputs = {n: e.result(cpu_labels if n == plan.task_output else None) for n, e in cpu.items()}
            metrics["cpu_ep"] = {**flat_metrics(cpu_outputs[plan.task_output]), "samples": cpu_runs,
                                 "outputs": cpu_outputs}
        atomic_write(out / "metrics.json", dump_json(metrics))
        _write_layer_errors(ctx, out, quantized, bf16=fmt is Format.BF16)
        return metrics


def _check_finite(names: list[str], outputs: list, sample: int, description: str) -> None:
    for name, value in zip(names, outputs):
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise DataError(f"validation data ({description}), sample {sample}: the float model's output '{name}' "
                            "is NaN/inf (the input overflows float32 inside the model); fix the data")


def _checked_labels(labels, evaluator, where: str) -> np.ndarray:
    """Class labels checked against the task output: one per predicted position, each below the class count."""
    shape, axis = evaluator.shape, getattr(evaluator.task, "axis", None)
    classes = None if evaluator.integer or axis is None else shape[axis]
    positions = int(np.prod(shape[1:])) // (classes or 1)
    if positions <= 1:
        return check_class_labels(labels, where, classes=classes)
    array = np.asarray(labels)
    if array.ndim < 2 or int(np.prod(array.shape[1:])) != positions:
        raise DataError(f"{where}: labels have shape {list(array.shape)}; the task output predicts {positions} "
                        f"positions per sample: give [N, {positions}] class indices")
    return check_class_labels(array.reshape(-1), where, classes=classes)


LAYER_ERROR_SAMPLES = 16  # per-layer SQNR: a ranking, so a few samples do


def _write_layer_errors(ctx: RunContext, out: Path, quantized: Path, *, bf16: bool) -> None:
    """layer_errors.json: SQNR/cosine per quantized tensor against the float graph that was quantized."""
    transformed = ctx.optional("quantize", "float.onnx")
    reference = transformed if transformed is not None else ctx.require("prepare", "model.onnx")
    batches = list(open_dataset(ctx.recipe, "validation", limit=LAYER_ERROR_SAMPLES,
                                state_model=ctx.require("prepare", "model.onnx")))
    report = layer_error_report(load_onnx(reference), load_onnx(quantized), batches, bf16=bf16)
    report["float_model"] = "quantize/float.onnx (after transforms)" if transformed is not None else "prepare/model.onnx"
    atomic_write(out / "layer_errors.json", dump_json(report))
