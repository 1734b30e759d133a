"""Tools that judge an artifact before anyone commits to it: speed, numerics on a real EP, formats side by side.

- `latency` (`npu-pipeline bench`): latency percentiles, throughput, session creation time and peak RSS
  of the quantized and the float model on every execution provider onnxruntime offers here;
- `parity` (`npu-pipeline parity`): an EP's outputs against the emulated NPU numerics, and the first
  node whose output diverges when they disagree;
- `compare` (`npu-pipeline compare`): one recipe in several formats through the pipeline (shared cache),
  accuracy against cost in one table and one plot.

`common` holds what they share (artifact loading, execution providers, inputs); `plots` the inline SVG.
"""

from __future__ import annotations

__all__ = ["common", "latency", "parity", "compare", "plots"]
