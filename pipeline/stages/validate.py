"""Validate: the quantized model against the float model on held-out data, with NPU numerics.

The quantized model runs with graph optimizations disabled (Q/DQ as float ops: the ideal integer
arithmetic the NPU computes; for BF16, the bfloat16-rounding copy). The same model on the CPU EP's fused
int8 kernels is measured beside it and labelled CPU-EP: on x86 without VNNI those kernels saturate, so
that figure says what a CPU deployment gets, not what the NPU gets.

Metrics per output: cosine similarity (per sample), SQNR in dB, max abs error. Task metrics on the task
output: classification accuracy (with labels) and top-1 agreement; embedding cosine mean/min and
nearest-neighbour agreement (does each sample's nearest neighbour among the validation set stay the same).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.fileio import atomic_write, dump_json
from ..core.formats import Format
from ..core.metrics import OutputAccumulator
from ..core.onnx_io import load_onnx, make_session
from ..core.tasks import task_metrics
from ..data import dataset_fingerprint, open_dataset
from ..data.labels import check_class_labels
from ..errors import DataError, StageError
from ..quant.layer_error import layer_error_report
from ..runner import RunContext, Stage

__all__ = ["ValidateStage"]


class ValidateStage(Stage):
    name = "validate"
    sections = ("inputs", "validation", "quantization")
    after = ("prepare", "quantize")
    revision = 2  # 2: per-layer errors (layer_errors.json); BF16 fallback nodes emulated
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
        task_output = recipe.validation.output or names[0]
        if task_output not in names:
            raise StageError(f"validation.output: the model has no output '{task_output}' (it has {names})")
        task_index = names.index(task_output)
        data = open_dataset(recipe, "validation", state_model=ctx.require("prepare", "model.onnx"))
        npu_acc = {n: OutputAccumulator() for n in names}
        cpu_acc = OutputAccumulator()
        refs, npus, cpus = [], [], []
        bar = tqdm(data, total=len(data), desc="validate", unit="sample", disable=not ctx.progress, leave=False)
        for batch in bar:
            ref = float_session.run(None, batch)
            got = npu_session.run(None, batch)
            for name, r, g in zip(names, ref, got):
                npu_acc[name].update(r, g)
            # Only the task output is kept across samples (for accuracy and nearest neighbours).
            refs.append(ref[task_index])
            npus.append(got[task_index])
            if cpu_session is not None:
                cpu = cpu_session.run(None, batch)[task_index]
                cpu_acc.update(ref[task_index], cpu)
                cpus.append(cpu)
        ref_all, npu_all = np.concatenate(refs), np.concatenate(npus)
        if ref_all.dtype.kind == "f" and not np.isfinite(ref_all).all():
            sample = int(np.flatnonzero(~np.isfinite(ref_all.reshape(len(ref_all), -1)).any(axis=1))[0])
            raise DataError(f"validation data ({data.description}), sample {sample}: the float model's output "
                            f"'{task_output}' is NaN/inf (the input overflows float32 inside the model); fix the data")
        labels = data.labels
        if labels is not None and recipe.validation.task == "classification":
            classes = ref_all.reshape(len(ref_all), -1).shape[1]
            labels = check_class_labels(labels, f"validation.data.labels ({data.description})", classes=classes)
        metrics = {
            "samples": len(refs),
            "task": recipe.validation.task,
            "task_output": task_output,
            "numerics": "bf16-emulated" if fmt is Format.BF16 else
                        "npu-emulated (unfused QDQ, BF16 nodes rounded)" if bf16_nodes else "npu-emulated (unfused QDQ)",
            **task_metrics(recipe.validation.task, ref_all, npu_all, labels),
            **npu_acc[task_output].result(),
            "outputs": {n: acc.result() for n, acc in npu_acc.items()},
        }
        if cpu_session is not None:
            metrics["cpu_ep"] = {
                **task_metrics(recipe.validation.task, ref_all, np.concatenate(cpus), labels),
                **cpu_acc.result(),
            }
        atomic_write(out / "metrics.json", dump_json(metrics))
        _write_layer_errors(ctx, out, quantized, bf16=fmt is Format.BF16)
        return metrics


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
