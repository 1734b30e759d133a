"""The Ryzen AI NPUs: XDNA1 (Phoenix, Hawk Point; legacy X1 backend) and XDNA2 (Strix, Krackan; X2)."""

from __future__ import annotations

from types import MappingProxyType

from ..core.formats import Format
from .registry import register_target
from .optable import npu_op_table
from .target import Target


def _npu_tables(*formats: Format):
    return MappingProxyType({fmt: npu_op_table(fmt) for fmt in formats})


register_target(Target(
    name="xdna1",
    description="Ryzen AI XDNA1 NPU: INT8 CNNs in Quark's XINT8 format (legacy X1 backend)",
    chips=("Phoenix", "Hawk Point"),
    formats=(Format.XINT8,),
    default_format=Format.XINT8,
    op_table=_npu_tables(Format.XINT8),
    min_conv_layers=2,
    ep_target="X1",
    # AMD docs, "Compiling INT8 models": PHX/HPT xclbins live in the installed runtime's
    # voe-4.0-win_amd64/xclbins/phoenix/ (1x4 = standard, 4x4 = benchmark, all 4 columns).
    xclbin="%RYZEN_AI_INSTALLATION_PATH%/voe-4.0-win_amd64/xclbins/phoenix/4x4.xclbin",
))

register_target(Target(
    name="xdna2",
    description="Ryzen AI XDNA2 NPU: INT8 (XINT8, A8W8, A16W8) and BF16 models (X2 backend)",
    chips=("Strix", "Krackan"),
    formats=(Format.XINT8, Format.A8W8, Format.A16W8, Format.BF16),
    default_format=Format.A8W8,
    op_table=_npu_tables(Format.XINT8, Format.A8W8, Format.A16W8, Format.BF16),
    ep_target="X2",  # the X2 backend must not be given an xclbin
))
