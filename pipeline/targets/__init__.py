"""Deployment targets as data, in a registry: what each NPU (or the CPU) accepts, and how to run on it.

quantize, inspect and package read a `Target` (`target.py`); none of them branches on a target's name.
Adding a target is one module that calls `register_target` (`registry.py`; see `ryzen_ai.py`, `cpu.py`),
imported here. Facts come from AMD's public Ryzen AI documentation (the project's NPU fact sheet)
and the operator table `ryzenai_npu_ops.csv` (`optable.py`). `placement` predicts which nodes of a model a
target runs (read by `pipeline.inspect`).

Decisions:
- The `cpu` target accepts u8s8 (its default: uint8 asymmetric activations, int8 per-channel weights),
  a8w8 and a16w8 (so an NPU-format model can be checked and run on a machine without the NPU: the CPU EP
  runs any QDQ graph), and the emulated-only a16w4. It does not accept bf16: that is an XDNA2 compile
  mode (the artifact is the float32 model the EP converts), and the CPU EP has no bfloat16 Conv/MatMul
  kernels, so on the CPU it would just be the float model. Nor xint8: it only adds power-of-two scale
  rules that buy nothing on the CPU.
- Opset range 13..21 for all targets: 13 is the minimum for per-axis QDQ (and Cast to/from bfloat16);
  21 is the highest opset onnxruntime 1.20 (our minimum) runs, as AMD documents no upper bound. 17 is
  AMD's recommendation: an inspection warns, not fails, on another opset inside the range
  (onnxruntime's `quantize_static` moves a model to opset 21 when it uses 16-bit types).
"""

from __future__ import annotations

from . import cpu, ryzen_ai  # noqa: F401  (register the builtin targets)
from .optable import npu_op_table
from .registry import TARGETS, get_target, register_target
from .target import CPU_EP, VITISAI_EP, Target, TargetError

__all__ = ["Target", "TargetError", "TARGETS", "register_target", "get_target", "npu_op_table", "VITISAI_EP", "CPU_EP"]
