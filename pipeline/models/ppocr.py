"""PP-OCR models with their trained weights, from the `rapidocr-onnxruntime` wheel (a dev dependency,
installed without its dependencies: only its ONNX files are read; `make test` installs it).

PaddleOCR's mobile OCR system as people ship it, and the kind of model issue 8 names: a DBNet text
detector and an SVTR-neck CTC recognizer (both PP-OCRv4, PP-LCNetV3 backbones with learnable affine
blocks and hardswish spelled as four ops by paddle2onnx), and a MobileNetV3 direction classifier
(PP-OCR mobile v2.0). Inputs are dynamic (`x [N, 3, H, W]`); recipes give the static shape.

    model_path("rec") -> Path to ch_PP-OCRv4_rec_infer.onnx (input x [N, 3, 48, W], output [N, W/8, 6625])
    characters()      -> the recognizer's alphabet (index 0 is the CTC blank; the last is a space)
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .packages import installed_package_dir

__all__ = ["MODELS", "model_path", "characters"]

PACKAGE = "rapidocr_onnxruntime"
MODELS = {
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}
_HINT = "pip install --no-deps rapidocr-onnxruntime==1.4.4 (make test installs it)"


def model_path(kind: str) -> Path:
    """The installed ONNX file of `kind` (det, rec, cls)."""
    if kind not in MODELS:
        raise DataError(f"PP-OCR model '{kind}' is not one of: {', '.join(MODELS)}")
    folder = installed_package_dir(PACKAGE)
    if folder is None:
        raise DataError(f"PP-OCR models: package {PACKAGE} is not installed; {_HINT}")
    path = folder / "models" / MODELS[kind]
    if not path.is_file():
        raise DataError(f"PP-OCR models: {path} is missing; reinstall: {_HINT}")
    return path


def characters() -> list[str]:
    """The recognizer's output classes in order: the blank, its dictionary (in the model's metadata), a
    space."""
    import onnx

    model = onnx.load(str(model_path("rec")), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return ["<blank>", *meta["character"].splitlines(), " "]
