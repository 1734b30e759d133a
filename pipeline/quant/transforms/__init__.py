"""Accuracy transforms of the float graph: the protocol and registry (`base.py`) and the builtin transforms
(cross-layer equalization, SmoothQuant, bias correction, outlier channel split), registered on import."""

from . import bias_correction, equalize, outlier_split, smoothquant  # noqa: F401  (register the builtin transforms)
from .base import (
    Transform, TransformContext, TransformResult, apply_transforms, downstream, make_transforms, register_transform,
    transform_registry,
)

__all__ = [
    "Transform", "TransformContext", "TransformResult", "register_transform", "transform_registry",
    "apply_transforms", "downstream", "make_transforms",
]
