"""npu-pipeline: PyTorch or ONNX models to quantized, validated, deployable artifacts for AMD Ryzen AI NPUs."""

__version__ = "0.1.0"
