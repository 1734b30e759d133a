"""The shared core: what every layer above needs and nothing above it provides.

Files and hashes (`fileio`), ONNX loading, saving and sessions (`onnx_io`), the graph index and its
editable view (`graph`, `editable`), fresh names (`names`), shape inference (`shapes`), op-type sets
(`ops`), attention-mask detection (`masks`), error metrics (`metrics`) and the format table (`formats`).
Modules here import only the standard library, numpy, onnx, onnxruntime and `pipeline.errors`.
"""
