"""Accuracy-aware fallback: give the fewest, most sensitive layers more precision until the gates hold.

The ladder, cheapest first: int8 activations -> 16-bit values (`a16`: their MatMul/Gemm/Conv readers still
read int8 copies, so no int8 MAC is lost) -> MAC nodes reading 16 bits (`a16w8`) -> BF16 (XDNA2 only;
emulated with `pipeline.quant.bf16` for those nodes) -> float on the CPU. At each rung the candidates are
ranked by sensitivity and taken greedily while the share budget allows (a unit that would break it is
skipped); all of them are scored, and if that passes, the shortest passing prefix is found by bisection
(about log2(n) + 1 quantize-and-score rounds per rung, not n); if it fails, the rung keeps them and the
next rung starts from there:

- a16 rung: units are *values*, a quantized activation together with the reshapes/transposes of it
  (one Q/DQ range each, but one set of numbers), that some non-MAC op reads (residual Adds, LayerNorm,
  Softmax...: a value only MAC nodes read gains nothing); worst first by the value's own int8
  quantization SQNR, measured by fake-quantizing the float model's activations with quantize's ranges;
- a16w8, BF16 and CPU rungs: units are compute nodes (MAC nodes for a16w8). Rank: how much SQNR a node
  loses from its inputs to its output in the current mixed model (`pipeline.quant.layer_error`), i.e.
  the error it adds itself.

Shares are counted as an independent audit of the QDQ model counts them (`pipeline.quant.mac_share`):
a MAC is int8 when its activation and its weight both come from 8-bit DequantizeLinear.

Softmax inputs that carry an additive attention mask are scored on unmasked positions only: the -1e4
at masked positions clips harmlessly, and would otherwise read as ~0 dB.

The gates are evaluated on a *held-out split of the calibration data* (samples after the ones the
statistics came from), never on the validation set, so the validation figures stay an honest test. A
gate whose metric the held-out split cannot give (accuracy without labels) is left out of the search
and reported. The recipe bounds the search, as shares given up against the all-int8 model:
`max_mac_share_off_int8` (MACs that may leave int8 for 16-bit activations, BF16 or the CPU),
`max_mac_share_off_npu` and `max_node_share_off_npu` (MACs and nodes that may go to the CPU; both 0
by default, which leaves the CPU rung nothing to move), and as an absolute floor, `min_mac_share_int8`
(the int8 x int8 share of all MACs the result keeps). Every evaluated point is kept: held-out metrics
against the int8/NPU shares of MACs and nodes (from `pipeline.inspect`'s placement of the all-int8 model,
with the moved nodes re-labelled), which the report draws as the accuracy-vs-share curves. A rung that
fails even in full also scores `curve_points` shorter prefixes, only so that the curve has a middle.

What a chosen configuration means on the device is not all documented: a QDQ model mixing int8 and
int16 activations (XDNA2 takes both formats) and float "BF16 island" nodes in a QDQ model (XDNA2 compiles
float models to BF16) are emulated here op by op; `inspect` flags int16 Q/DQ under a8w8 and places the
float nodes on the CPU, and the report says so rather than hiding it.
"""

from .heldout import HeldOutFallback, npu_numerics
from .search import RUNGS, FallbackConfig, FallbackPoint, FallbackResult, SearchSpace, Shares, search
from .shares import compute_shares, value_groups

__all__ = [
    "FallbackConfig", "Shares", "FallbackPoint", "FallbackResult", "SearchSpace", "RUNGS", "search",
    "value_groups", "compute_shares", "HeldOutFallback", "npu_numerics",
]
