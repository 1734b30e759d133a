"""Calibrate: stream the calibration set through the float model and gather activation statistics.

Statistics are computed inside the graph by the statistics service (`pipeline.quant.statistics`): per
float activation the exact min and max and a strided subsample feeding a fixed-size histogram, so memory
does not grow with the number of samples. They are gathered for every float activation, whatever the
format: quantize can then be rerun with another format or range method without running the model again.
The exception, also format-independent: a value only a Relu/Clip reads takes that activation's range.
"""

from __future__ import annotations

from pathlib import Path

from ..core.fileio import atomic_write, dump_json
from ..core.onnx_io import load_onnx
from ..data import dataset_fingerprint, open_dataset
from ..quant.statistics import activation_tensors, collect_histograms, permuted_aliases
from ..runner import RunContext, Stage

__all__ = ["CalibrateStage"]


def _needs_statistics(ctx: RunContext) -> bool:
    """BF16 keeps float ranges: the NPU converts the float32 model, so nothing reads the statistics."""
    return ctx.recipe.target_and_format()[1].spec.quantized


class CalibrateStage(Stage):
    name = "calibrate"
    sections = ("inputs", "calibration")
    after = ("prepare",)
    outputs = ("tensors.json",)
    optional_outputs = ("stats.npz",)  # absent when the format needs no statistics (BF16)
    revision = 2  # 2: the inputs of fused activations (Conv -> Relu/Clip) are not measured

    def extra_key(self, ctx: RunContext) -> dict:
        return {**dataset_fingerprint(ctx.recipe, "calibration"), "needed": _needs_statistics(ctx)}

    def run(self, ctx: RunContext, out: Path) -> dict:
        if not _needs_statistics(ctx):
            atomic_write(out / "tensors.json", dump_json({"samples": 0, "tensors": {}, "aliases": {}}))
            return {"samples": 0, "tensors": 0, "skipped": "bf16 needs no activation ranges"}
        model = load_onnx(ctx.require("prepare", "model.onnx"), where="prepared model")
        data = open_dataset(ctx.recipe, "calibration", state_model=ctx.require("prepare", "model.onnx"))
        collector = collect_histograms(model, data, progress=ctx.progress)
        collector.save(out / "stats.npz")
        tensors = activation_tensors(model)
        aliases = {a: t for a, t in permuted_aliases(model, tensors).items() if a in collector}
        fused = sorted(t for t in tensors if t not in collector)  # only a Relu/Clip reads them (see above)
        atomic_write(out / "tensors.json", dump_json({"samples": len(data), "tensors": tensors, "aliases": aliases,
                                                      "fused_activation_inputs": fused}))
        return {"samples": len(data), "tensors": len(tensors), "measured": len(collector.names) - len(aliases),
                "fused_inputs": len(fused)}
