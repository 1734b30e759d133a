"""A16W4: int16 symmetric activations, int4 symmetric weights per output channel.

No Ryzen AI compiler documents it: it is emulated (QDQ with onnxruntime's com.microsoft int4 Q/DQ, run
unfused on the CPU EP) so a user can see what 4-bit weights cost before a device takes them. Per channel,
because one int4 scale per tensor leaves most channels with a handful of levels.
"""

from __future__ import annotations

from .table import Format, FormatSpec, register_format

Format.A16W4 = register_format(FormatSpec(
    "a16w4", "int16 symmetric activations, int4 symmetric per-channel weights (emulated only)", 16, 4,
    activation_dtypes=frozenset({"int16"}), weight_dtypes=frozenset({"int4"}),
    activation_type="QInt16", weight_type="QInt4", per_channel_weights=True, per_channel_accepted=True,
    contrib_ops=True, emulated_only=True,
))
