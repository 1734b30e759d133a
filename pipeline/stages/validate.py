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

from ..data import open_dataset
from ..errors import StageError
from ..onnx_utils import make_session
from ..recipe import Format
from ..runner import RunContext, Stage, atomic_write, dump_json
from .quantize import resolve_format

__all__ = ["ValidateStage", "compare_outputs", "task_metrics"]


class _OutputAccumulator:
    """Streaming per-output error statistics: memory flat in the number of samples."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.max_abs = 0.0
        self.cosines: list[float] = []

    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        ref64, got64 = ref.astype(np.float64).reshape(len(ref), -1), got.astype(np.float64).reshape(len(got), -1)
        err = got64 - ref64
        self.signal += float((ref64**2).sum())
        self.noise += float((err**2).sum())
        self.max_abs = max(self.max_abs, float(np.abs(err).max(initial=0.0)))
        norms = np.linalg.norm(ref64, axis=1) * np.linalg.norm(got64, axis=1)
        dots = (ref64 * got64).sum(axis=1)
        # Two all-zero vectors agree perfectly; one zero vector against a non-zero one does not.
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(dots == 0, 1.0, 0.0))
        self.cosines.extend(float(c) for c in cos)

    def result(self) -> dict:
        sqnr = 10 * np.log10(self.signal / self.noise) if self.noise > 0 else float("inf")
        cos = np.asarray(self.cosines)
        return {
            "sqnr_db": round(float(min(sqnr, 200.0)), 3),
            "max_abs_error": float(self.max_abs),
            "cosine_mean": float(cos.mean()) if cos.size else 1.0,
            "cosine_min": float(cos.min()) if cos.size else 1.0,
        }


def compare_outputs(refs: list[np.ndarray], gots: list[np.ndarray]) -> dict:
    acc = _OutputAccumulator()
    for ref, got in zip(refs, gots):
        acc.update(ref, got)
    return acc.result()


def _nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(axis=1)


def task_metrics(task: str, ref: np.ndarray, got: np.ndarray, labels: np.ndarray | None) -> dict:
    """Task metrics on the task output, stacked over samples (first axis)."""
    ref2, got2 = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
    metrics: dict[str, float] = {}
    if task == "classification":
        ref_top, got_top = ref2.argmax(axis=1), got2.argmax(axis=1)
        metrics["top1_agreement"] = 100.0 * float((ref_top == got_top).mean())
        if labels is not None:
            labels = labels.reshape(-1)[: len(ref_top)]
            metrics["accuracy_float"] = 100.0 * float((ref_top == labels).mean())
            metrics["accuracy"] = 100.0 * float((got_top == labels).mean())
            metrics["accuracy_drop"] = metrics["accuracy_float"] - metrics["accuracy"]
    elif task == "embedding" and len(ref2) > 1:
        metrics["nn_agreement"] = 100.0 * float((_nearest_neighbours(ref2) == _nearest_neighbours(got2)).mean())
    return metrics


class ValidateStage(Stage):
    name = "validate"
    sections = ("inputs", "validation", "quantization")
    after = ("prepare", "quantize")
    revision = 2  # 2: per-layer errors (layer_errors.json); BF16 fallback nodes emulated

    def extra_key(self, ctx: RunContext) -> dict:
        from ..data import dataset_fingerprint

        return dataset_fingerprint(ctx.recipe, "validation")

    def run(self, ctx: RunContext, out: Path) -> dict:
        from tqdm import tqdm

        recipe = ctx.recipe
        _, fmt = resolve_format(recipe)
        float_session = make_session(ctx.require("prepare", "model.onnx"))
        # BF16, or a QDQ model whose fallback moved nodes to BF16: the copy that rounds them to bfloat16.
        bf16_nodes = fmt is not Format.BF16 and (ctx.stage_dir("quantize") / "emulated.onnx").is_file()
        quantized = ctx.require("quantize", "emulated.onnx" if fmt is Format.BF16 or bf16_nodes else "model.onnx")
        npu_session = make_session(quantized, npu_emulation=True)
        cpu_session = None if fmt is Format.BF16 else make_session(ctx.require("quantize", "model.onnx"))
        names = [o.name for o in float_session.get_outputs()]
        task_output = recipe.validation.output or names[0]
        if task_output not in names:
            raise StageError(f"validation.output: the model has no output '{task_output}' (it has {names})")
        task_index = names.index(task_output)
        data = open_dataset(recipe, "validation")
        npu_acc = {n: _OutputAccumulator() for n in names}
        cpu_acc = _OutputAccumulator()
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
        labels = data.labels
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
    from ..fallback import layer_error_report
    from ..onnx_utils import load_onnx

    transformed = ctx.stage_dir("quantize") / "float.onnx"
    reference = transformed if transformed.is_file() else ctx.require("prepare", "model.onnx")
    batches = list(open_dataset(ctx.recipe, "validation", limit=LAYER_ERROR_SAMPLES))
    report = layer_error_report(load_onnx(reference), load_onnx(quantized), batches, bf16=bf16)
    report["float_model"] = "quantize/float.onnx (after transforms)" if transformed.is_file() else "prepare/model.onnx"
    atomic_write(out / "layer_errors.json", dump_json(report))
