"""The formats the Ryzen AI NPU compilers take (the project's fact sheet), and the generic CPU one.

XINT8: int8 symmetric, power-of-two scales per tensor (Quark's legacy form, uint8 with zero point 128, is
accepted on input). A8W8 / A16W8: int8 / int16 symmetric activations, int8 symmetric weights per tensor
(per-channel acceptance by the X2 compiler is not documented). BF16: no Q/DQ; the XDNA2 compiler converts
the float32 model. U8S8: onnxruntime's CPU format, asymmetric uint8 activations, per-channel int8
weights; reduce_range keeps AVX2's u8s8 kernels from saturating (the peers' 52.8% digits figure).
"""

from __future__ import annotations

from .table import Format, FormatSpec, register_format

_I8, _U8, _I16 = frozenset({"int8"}), frozenset({"uint8"}), frozenset({"int16"})

Format.XINT8 = register_format(FormatSpec(
    "xint8", "int8 symmetric, power-of-two scales, per tensor", 8, 8,
    activation_dtypes=_I8 | _U8, weight_dtypes=_I8, activation_type="QInt8", weight_type="QInt8",
    power_of_two=True,
))
Format.A8W8 = register_format(FormatSpec(
    "a8w8", "int8 symmetric activations and weights, per tensor", 8, 8,
    activation_dtypes=_I8, weight_dtypes=_I8, activation_type="QInt8", weight_type="QInt8",
))
Format.A16W8 = register_format(FormatSpec(
    "a16w8", "int16 symmetric activations, int8 symmetric weights, per tensor", 16, 8,
    activation_dtypes=_I16, weight_dtypes=_I8, activation_type="QInt16", weight_type="QInt8", contrib_ops=True,
))
Format.BF16 = register_format(FormatSpec(
    "bf16", "bfloat16 (the float32 model, converted by the XDNA2 compiler)", None, None,
))
Format.U8S8 = register_format(FormatSpec(
    "u8s8", "uint8 asymmetric activations, int8 per-channel weights (CPU EP)", 8, 8,
    activation_dtypes=_U8, weight_dtypes=_I8, activation_type="QUInt8", weight_type="QInt8",
    symmetric_activations=False, per_channel_weights=True, per_channel_accepted=True, reduce_range=True,
))
