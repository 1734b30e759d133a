"""Accuracy transforms of the float graph: the protocol and registry (`base.py`) and the builtin transforms
(cross-layer equalization, bias absorption, power-of-two alignment, SmoothQuant, bias correction, outlier
channel split; AdaRound and end-to-end fine-tuning after quantization), registered on import."""

from . import (  # noqa: F401  (register the builtin transforms)
    absorb, adaround, align, bias_correction, equalize, finetune, outlier_split, smoothquant, stream,
)
from .base import (
    QuantizedTransform, Transform, TransformContext, TransformResult, apply_transforms, downstream, make_transforms,
    register_transform, transform_registry,
)

__all__ = [
    "Transform", "QuantizedTransform", "TransformContext", "TransformResult", "register_transform",
    "transform_registry", "apply_transforms", "downstream", "make_transforms",
]
