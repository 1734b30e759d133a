"""Quantization algorithms above the shared core: streamed statistics (`statistics`, `histogram`), range
methods (`ranges`), QDQ insertion through onnxruntime (`qdq`), float-graph transforms (`transforms`),
per-layer error (`layer_error`), BF16 emulation (`bf16`), the accuracy-aware fallback (`fallback`) and the
flow that chains them (`flow`). Nothing here reads a recipe or a file: stages do that and call in.
"""
