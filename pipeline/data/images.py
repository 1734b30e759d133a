"""Calibration and validation data from a folder of PNG/JPEG images, with the preprocessing the recipe declares.

    calibration:
      data: {kind: images, path: ../images, size: [224, 224], resize: center_crop, layout: nchw,
             channels: rgb, scale: 0.00392156862745098, mean: [0.485, 0.456, 0.406],
             std: [0.229, 0.224, 0.225], labels: ../images/labels.csv, split: {seed: 0, validation: 0.3}}

Per image, in this order:
1. decode with Pillow (EXIF orientation is not applied: torchvision's PIL loader does not either);
2. convert to `channels`: `rgb`, `bgr` (OpenCV-trained models) or `gray` (alpha dropped; a gray image is
   replicated to three channels for rgb/bgr);
3. resize to the input's height x width (`size` is [height, width] and must match the input):
   `stretch` (both sides scaled, aspect ratio not kept), `letterbox` (scaled to fit inside, aspect kept,
   centred, the border filled with `pad_value`, e.g. 114 for YOLO models), `center_crop` (the shorter side
   scaled to `shorter_side`, default size / 0.875 = 256 for 224 as in ImageNet evaluation, then the centre
   cut out), or `none` (the image must already have the input's size). Default: `stretch` when `size` is
   given, else `none`. Bilinear filtering (`interpolation`: bilinear, bicubic, nearest);
4. `value = (pixel * scale - mean[c]) / std[c]` in float32, mean and std in the order of `channels` (an
   integer input, e.g. uint8, takes the raw pixels and no normalization);
5. lay out as `layout`: `nchw` or `nhwc` for a rank-4 input [batch, ...]; for a rank-3 input (no batch
   axis) the same letters without n; a rank-2 input [height, width] takes one gray channel.

Files are the folder's `*.png`, `*.jpg`, `*.jpeg` (any case), not recursive, in sorted name order, so two
runs see the same samples; a model batch of N takes N consecutive images. `split` (pipeline.data.base)
splits the files. Images are decoded one at a time while the source is iterated: memory does not grow
with the folder. `labels` is a CSV of `filename,label` rows (an optional header row is skipped); every
image used needs an integer label.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..core.fileio import sha256_file
from ..core.schema import StrictModel
from ..errors import DataError
from .base import Batch, DataKind, DataSource, OpenContext, SplitSettings, register_data_kind, split_part
from .limits import open_image

__all__ = ["ImageData", "image_source", "list_images", "load_image", "read_labels", "folder_fingerprint", "IMAGE_SUFFIXES"]

class ImageData(StrictModel):
    """A folder of PNG/JPEG images with the preprocessing the model expects (see the module docstring)."""

    kind: Literal["images"]
    path: Path
    input: str | None = None
    size: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = None  # (height, width)
    resize: Literal["none", "stretch", "letterbox", "center_crop"] | None = None
    shorter_side: Annotated[int, Field(ge=1)] | None = None  # center_crop only
    pad_value: Annotated[int, Field(ge=0, le=255)] = 0  # letterbox only
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    layout: Literal["nchw", "nhwc"] = "nchw"
    channels: Literal["rgb", "bgr", "gray"] = "rgb"
    scale: float = 1.0 / 255.0
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    labels: Path | None = None  # optional CSV "filename,label"
    split: SplitSettings | None = None

    @model_validator(mode="after")
    def _resize_options(self) -> "ImageData":
        if self.shorter_side is not None and self.mode != "center_crop":
            raise ValueError("shorter_side only applies with resize: center_crop")
        if "pad_value" in self.model_fields_set and self.mode != "letterbox":
            raise ValueError("pad_value only applies with resize: letterbox")
        return self

    @property
    def mode(self) -> str:
        """The resize mode in effect: `resize`, else stretch when `size` is given, else none."""
        return self.resize or ("stretch" if self.size is not None else "none")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CHANNELS = {"rgb": 3, "bgr": 3, "gray": 1}


def _image_files(folder: Path) -> list[Path]:
    found = (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    return sorted((p for p in found if p.is_file()), key=lambda p: p.name)


def list_images(folder: Path, section: str) -> list[Path]:
    """The folder's PNG/JPEG files in sorted name order; DataError if it is not a folder or holds none."""
    if not folder.is_dir():
        raise DataError(f"{section}.data.path: {folder} is not a folder (kind 'images' reads a folder of PNG/JPEG files)")
    files = _image_files(folder)
    if not files:
        raise DataError(f"{section}.data.path: {folder} holds no .png/.jpg/.jpeg images")
    return files


def folder_fingerprint(folder: Path) -> str:
    """sha256 over the names and content of the folder's images (what a data stage's cache key needs)."""
    import hashlib

    digest = hashlib.sha256()
    for path in _image_files(folder):
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _target_input(data: ImageData, inputs: list[object], section: str) -> object:
    """The input the images feed: `data.input`, or the only input fed by data."""
    by_name = {s.name: s for s in inputs}
    if data.input is not None and data.input not in by_name:
        raise DataError(f"{section}.data.input: '{data.input}' is not a model input fed by data ({', '.join(by_name)})")
    others = [s.name for s in inputs if s.name != data.input]
    if len(inputs) > 1 and data.input is None:
        raise DataError(
            f"{section}.data.input: the model has {len(inputs)} inputs fed by data ({', '.join(by_name)}); name the "
            "one the images feed, and give the others a value: (a constant) or from_output: (a recurrent state)"
        )
    if len(inputs) > 1:
        raise DataError(
            f"{section}.data: images feed only '{data.input}'; the model's other inputs ({', '.join(others)}) "
            "would get no data (give them a value: or from_output:, or use npz or builder data)"
        )
    return by_name[data.input] if data.input is not None else inputs[0]


def _geometry(spec: object, data: ImageData, section: str) -> tuple[int | None, int, int, int]:
    """(batch or None without a batch axis, channels, height, width) the input takes, checked against
    the declared preprocessing."""
    shape, nchw = list(spec.shape), data.layout == "nchw"
    if len(shape) == 4 and spec.batch is not False:
        batch, *rest = shape
    elif len(shape) == 3 and not spec.batch:
        batch, rest = None, shape
    elif len(shape) == 2 and not spec.batch:
        batch, rest = None, ([1, *shape] if nchw else [*shape, 1])
    else:
        raise DataError(
            f"{section}.data: input '{spec.name}' has shape {shape}; images need [N, C, H, W] / [N, H, W, C] "
            "(layout nchw / nhwc), or without a batch axis [C, H, W] / [H, W, C] or [H, W]"
        )
    channels, height, width = rest if nchw else (rest[2], rest[0], rest[1])
    if channels != _CHANNELS[data.channels]:
        raise DataError(
            f"{section}.data.channels: '{data.channels}' gives {_CHANNELS[data.channels]} channel(s), input "
            f"'{spec.name}' {shape} takes {channels} in layout {data.layout} (check layout and channels)"
        )
    if data.size is not None and tuple(data.size) != (height, width):
        raise DataError(
            f"{section}.data.size: {list(data.size)} (height, width) does not match input '{spec.name}' "
            f"{shape}, which takes {height}x{width} in layout {data.layout}"
        )
    return batch, channels, height, width


def _normalization(data: ImageData, spec: object, channels: int, section: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (mean, std) as float32 arrays; None for an integer input (raw pixels)."""
    for key in ("mean", "std"):
        values = getattr(data, key)
        if len(values) not in (1, channels):
            raise DataError(
                f"{section}.data.{key}: {len(values)} values for {channels}-channel '{data.channels}' images "
                f"(give 1 value, or {channels}: one per channel, in {data.channels} order)"
            )
    if any(s == 0 for s in data.std):
        raise DataError(f"{section}.data.std: {data.std} holds a zero (the pixels are divided by std)")
    if np.dtype(spec.dtype).kind != "f":
        if data.scale != 1.0 or any(data.mean) or any(s != 1.0 for s in data.std):
            raise DataError(
                f"{section}.data: input '{spec.name}' is {spec.dtype} and takes raw pixels; set scale: 1, "
                "mean: [0], std: [1] (or declare the input float32)"
            )
        if spec.dtype not in ("uint8", "int32", "int64"):
            raise DataError(f"{section}.data: images cannot feed a {spec.dtype} input '{spec.name}'")
        return None
    mean = np.broadcast_to(np.asarray(data.mean, np.float32), (channels,)).copy()
    std = np.broadcast_to(np.asarray(data.std, np.float32), (channels,)).copy()
    return mean, std


def _resize(image, data: ImageData, height: int, width: int):
    """A Pillow image brought to width x height by the recipe's resize mode."""
    from PIL import Image

    mode = data.mode
    if mode == "none" or image.size == (width, height) and mode != "center_crop":
        return image
    method = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "nearest": Image.Resampling.NEAREST}[data.interpolation]
    w, h = image.size
    if mode == "stretch":
        return image.resize((width, height), method)
    if mode == "letterbox":
        ratio = min(width / w, height / h)
        inner = (max(1, round(w * ratio)), max(1, round(h * ratio)))
        fill = data.pad_value if image.mode == "L" else (data.pad_value,) * 3
        canvas = Image.new(image.mode, (width, height), fill)
        canvas.paste(image.resize(inner, method), ((width - inner[0]) // 2, (height - inner[1]) // 2))
        return canvas
    # center_crop: the shorter side to `shorter_side` (aspect kept), then the centre height x width.
    shorter = data.shorter_side or round(min(height, width) / 0.875)
    ratio = max(shorter / min(w, h), height / h, width / w)  # never smaller than the crop
    scaled = image.resize((max(width, round(w * ratio)), max(height, round(h * ratio))), method)
    left, top = (scaled.size[0] - width) // 2, (scaled.size[1] - height) // 2
    return scaled.crop((left, top, left + width, top + height))


def load_image(path: Path, data: ImageData, height: int, width: int, *, section: str) -> np.ndarray:
    """One image as an HxWxC uint8 array in the declared channels and size."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError(f"{section}.data: image data needs Pillow (pip install pillow)") from None
    try:
        with open_image(path, f"{section}.data") as image:
            image.load()
            mode = "L" if data.channels == "gray" else "RGB"
            # Palette, 16-bit and alpha images convert via RGBA/I first where Pillow needs it.
            if image.mode == "P":
                image = image.convert("RGBA")
            pixels = np.asarray(_resize(image.convert(mode), data, height, width), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        # Pillow raises OSError for truncated files and SyntaxError for some broken PNG chunks.
        raise DataError(f"{section}.data: {path} is not a readable image ({type(err).__name__}: {err})") from None
    if pixels.shape[:2] != (height, width):
        raise DataError(
            f"{section}.data: {path} is {pixels.shape[1]}x{pixels.shape[0]} (width x height), the input takes "
            f"{width}x{height}; set data.size: [{height}, {width}] and a resize mode (stretch, letterbox, center_crop)"
        )
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if data.channels == "bgr":
        pixels = pixels[:, :, ::-1]
    return pixels


def read_labels(path: Path, section: str) -> dict[str, int]:
    """`filename,label` rows of a CSV (an optional header row is skipped) as {filename: label}."""
    if not path.is_file():
        raise DataError(f"{section}.data.labels: {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{section}.data.labels: {path} is not readable UTF-8 text ({err})") from None
    labels: dict[str, int] = {}
    for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise DataError(
                f"{section}.data.labels: {path}, line {line_no}: {len(row)} fields; each row is 'filename,label'"
            )
        name, value = row[0].strip(), row[1].strip()
        try:
            label = int(value)
        except ValueError:
            if line_no == 1 and not labels:
                continue  # a header row such as "filename,label"
            raise DataError(
                f"{section}.data.labels: {path}, line {line_no}: label {value!r} is not an integer class index"
            ) from None
        if name in labels:
            raise DataError(f"{section}.data.labels: {path}, line {line_no}: '{name}' is listed twice")
        labels[name] = label
    if not labels:
        raise DataError(f"{section}.data.labels: {path} holds no 'filename,label' rows")
    return labels


def image_source(path: Path, data: ImageData, inputs: list[object], limit: int, section: str) -> DataSource:
    """The images of folder `path` as a DataSource of at most `limit` batches (see the module docstring).

    `data.labels`, when set, must already be resolved (pipeline.data resolves it against the recipe).
    """
    spec = _target_input(data, inputs, section)
    batch, channels, height, width = _geometry(spec, data, section)
    norm = _normalization(data, spec, channels, section)
    files = list_images(path, section)
    files = [files[i] for i in split_part(len(files), data.split, section, unit="image")]
    per_sample = batch or 1
    count = min(limit, len(files) // per_sample)
    if count == 0:
        raise DataError(f"{section}.data.path: {path} holds {len(files)} image(s); a batch of input '{spec.name}' needs {per_sample}")
    files = files[: count * per_sample]
    labels = None
    if data.labels is not None:
        table = read_labels(Path(data.labels), section)
        missing = [f.name for f in files if f.name not in table]
        if missing:
            shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            raise DataError(f"{section}.data.labels: {data.labels} has no label for {shown}")
        labels = np.asarray([table[f.name] for f in files], dtype=np.int64)
    dtype = np.dtype(spec.dtype)

    def batches() -> Iterator[Batch]:
        for start in range(0, len(files), per_sample):
            images = []
            for file in files[start : start + per_sample]:
                pixels = load_image(file, data, height, width, section=section)
                if norm is None:
                    values = pixels.astype(dtype)
                else:
                    mean, std = norm
                    values = ((pixels.astype(np.float32) * np.float32(data.scale) - mean) / std).astype(dtype)
                images.append(values if data.layout == "nhwc" else values.transpose(2, 0, 1))
            stacked = np.stack(images) if batch is not None else images[0]
            yield {spec.name: np.ascontiguousarray(stacked.reshape(spec.shape))}

    return DataSource(f"{path.name}/ ({len(files)} images)", inputs, count, batches, labels)


def _open(data: ImageData, ctx: OpenContext) -> DataSource:
    if data.labels is not None:  # relative to the recipe's folder, like every recipe path
        data = data.model_copy(update={"labels": ctx.resolve(data.labels)})
    return image_source(ctx.resolve(data.path), data, ctx.inputs, ctx.limit, ctx.section)


def _fingerprint(data: ImageData, ctx: OpenContext) -> dict:
    """The names and content of the folder's images, plus the labels CSV."""
    path = ctx.resolve(data.path)
    key = {"data": folder_fingerprint(path) if path.is_dir() else str(path)}
    if data.labels is not None:
        labels = ctx.resolve(data.labels)
        key["labels"] = sha256_file(labels) if labels.is_file() else str(labels)
    return key


register_data_kind(DataKind("images", ImageData, _open, _fingerprint))
