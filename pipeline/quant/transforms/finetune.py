"""`finetune` in `quantization.transforms`: end-to-end fine-tuning of the QDQ model's integer weights and
biases against the float model's outputs (`pipeline.quant.finetune`), run by the quantize flow after Q/DQ
insertion, after AdaRound when both are listed.

    quantization:
      transforms: [cross_layer_equalization, bias_absorption, adaround, {finetune: {epochs: 8}}]

Settings (all optional): `epochs`, `samples` calibration samples streamed per epoch (at most the flow's
`transform_samples`), `batch` samples per optimizer step, `learning_rate` (grid steps per step at the
schedule's peak), `check_samples` (held out of the training, at most a quarter of the samples: the before/after check
that keeps the better model), `blend` (each training sample blended with another of its batch, keeping a
weight in [blend, 1] of itself; 1: no blending; float inputs only).
It costs `epochs` forward and backward passes over the samples in torch: minutes on a CNN of MobileNetV2's
size, so no preset turns it on.
"""

from __future__ import annotations

import onnx
from pydantic import Field

from ..finetune import FinetuneSettings, finetune
from .base import QuantizedTransform, TransformConfig, TransformContext, register_transform

__all__ = ["Finetune"]


class FinetuneConfig(TransformConfig):
    epochs: int = Field(8, ge=1)
    samples: int = Field(200, ge=1)
    batch: int = Field(8, ge=1)
    learning_rate: float = Field(0.02, gt=0)
    check_samples: int = Field(64, ge=1)
    blend: float = Field(0.3, ge=0, le=1)


@register_transform
class Finetune(QuantizedTransform):
    name = "finetune"
    Config = FinetuneConfig

    def apply_quantized(self, qmodel: onnx.ModelProto, float_model: onnx.ModelProto,
                        ctx: TransformContext) -> onnx.ModelProto:
        if ctx.batches is None:
            raise ValueError("finetune needs calibration batches (TransformContext.batches)")
        c = self.config
        settings = FinetuneSettings(epochs=c.epochs, samples=min(c.samples, ctx.samples), batch=c.batch,
                                    learning_rate=c.learning_rate, check_samples=c.check_samples, blend=c.blend)
        model, self._report = finetune(qmodel, float_model, ctx.batches, settings, progress=ctx.progress)
        if self._report["kept"] == "finetuned":
            self.applied = [{k: self._report[k] for k in ("check_sqnr_db_before", "check_sqnr_db_after", "tensors")}]
        else:
            self.skipped = [{"reason": self._report.get("skipped") or "no gain on the check samples ("
                             f"{self._report['check_sqnr_db_before']} -> {self._report['check_sqnr_db_after']} dB)"}]
        return model

    def report(self) -> dict:
        return {**getattr(self, "_report", {}), "applied": self.applied, "skipped": self.skipped}
