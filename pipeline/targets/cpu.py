"""Any x86/Arm CPU through onnxruntime's CPU EP: the generic u8s8 format, the NPU's integer formats (to check
and run an NPU model where no NPU is), and the emulated-only a16w4."""

from __future__ import annotations

from types import MappingProxyType

from ..core.formats import Format
from .registry import register_target
from .target import CPU_EP, Target

_FORMATS = (Format.U8S8, Format.A8W8, Format.A16W8, Format.A16W4)

register_target(Target(
    name="cpu",
    description="Any x86/ARM CPU through onnxruntime's CPU EP (no NPU); u8s8 per-channel by default",
    chips=("generic CPU",),
    formats=_FORMATS,
    default_format=Format.U8S8,
    op_table=MappingProxyType(dict.fromkeys(_FORMATS)),  # None: every op runs
    device="CPU",
    requires_static_shapes=False,
    batch_one=False,
    forbidden_ops=frozenset(),
    execution_provider=CPU_EP,
))
