"""Deterministic text images for OCR models: lines for recognizers and direction classifiers, pages for
text detectors, preprocessed as PaddleOCR (and RapidOCR) feed PP-OCR models.

No OCR data set can be downloaded here, so the text is rendered: real English sentences (the MiniLM
sentence files in `calibration_data/minilm`, calibration lines from `calibration.txt`, validation lines
from `validation.txt`) in Pillow's bundled font (FreeType, sizes 24-34 px), dark on lightened crops of the
bundled photos (`pipeline.models.photo_crops`, the split's own photos), or light on dark ones. PP-OCRv4's
float recognizer reads them as written (`tests/test_ocr_models.py`).

- `text_lines(split, height=48, width=320, count=64)`: one line per sample; PaddleOCR's
  `resize_norm_img`: resized to `height` keeping its aspect (at most `width` wide), BGR, `(x / 255 - 0.5) /
  0.5`, the rest of the width zero (after normalisation, as PaddleOCR pads); `{input: [1, 3, height,
  width]}`.
- `rotated_text_lines(...)`: the same with every second line turned 180 degrees, and the labels (0
  upright, 1 turned): a direction classifier's data, `(samples, labels)`.
- `text_pages(split, size=480, count=24)`: lines of text at random places on a `size` x `size` photo
  crop, the same normalisation (PP-OCR's detector: mean and std 0.5).

Everything is drawn from a seeded generator per split: the same samples on every run.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import DataError
from .photo_crops import SPLITS, load_photo

__all__ = ["text_lines", "line_texts", "rotated_text_lines", "text_pages"]

_SENTENCES = Path(__file__).resolve().parents[2] / "calibration_data" / "minilm"
_SEEDS = {"calibration": 11, "validation": 23}


@lru_cache(maxsize=None)
def _sentences(split: str) -> tuple[str, ...]:
    name = "calibration.txt" if split == "calibration" else "validation.txt"
    try:
        lines = (_SENTENCES / name).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"text lines: cannot read {_SENTENCES / name} ({err})") from None
    return tuple(line.strip() for line in lines if line.strip())


def _check_split(split: str) -> None:
    if split not in _SEEDS:
        raise DataError(f"text lines: split '{split}' is not one of: {', '.join(_SEEDS)}")


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _phrase(rng: np.random.Generator, sentences: tuple[str, ...], max_chars: int) -> str:
    words = sentences[int(rng.integers(len(sentences)))].split()
    start = int(rng.integers(0, max(1, len(words) - 2)))
    phrase = ""
    for word in words[start:]:
        if len(phrase) + len(word) + 1 > max_chars:
            break
        phrase = f"{phrase} {word}".strip()
    return phrase or words[0][:max_chars]


def _background(rng: np.random.Generator, photos: list, width: int, height: int, light: bool):
    """A crop of one of the photos, `width` x `height`, lightened (dark text on it) or darkened."""
    from PIL import Image

    photo = photos[int(rng.integers(len(photos)))]
    scale = rng.uniform(0.3, 1.0)
    cw = min(photo.width, max(8, int(photo.width * scale)))
    ch = min(photo.height, max(8, int(cw * height / width)))
    x, y = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
    pixels = np.asarray(photo.crop((x, y, x + cw, y + ch)).resize((width, height)), np.float32)
    fade = rng.uniform(0.1, 0.4)
    pixels = 255 - (255 - pixels) * fade if light else pixels * fade
    return Image.fromarray(pixels.astype(np.uint8))


def _ink(rng: np.random.Generator, light_background: bool) -> tuple[int, int, int]:
    low, high = (0, 90) if light_background else (180, 256)
    return tuple(int(c) for c in rng.integers(low, high, 3))


def _normalise(image, width: int | None = None) -> np.ndarray:
    """PaddleOCR's normalisation: BGR, (x / 255 - 0.5) / 0.5, CHW; padded with zeros to `width`."""
    pixels = np.asarray(image.convert("RGB"), np.float32)[:, :, ::-1]
    chw = ((pixels / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    if width is None or chw.shape[2] == width:
        return np.ascontiguousarray(chw[None], dtype=np.float32)
    padded = np.zeros((3, chw.shape[1], width), np.float32)
    padded[:, :, : chw.shape[2]] = chw
    return padded[None]


@lru_cache(maxsize=8)
def _line_images(split: str, height: int, width: int, count: int) -> tuple[tuple, tuple[str, ...]]:
    """(images, their texts): the split's rendered lines, drawn once per process."""
    from PIL import Image, ImageDraw

    _check_split(split)
    rng = np.random.default_rng(_SEEDS[split])
    sentences = _sentences(split)
    photos = [load_photo(name) for name in SPLITS[split]]
    images, texts = [], []
    for _ in range(count):
        font = _font(int(rng.integers(24, 35)))
        light = bool(rng.random() < 0.7)
        canvas = _background(rng, photos, width * 2, height, light)
        draw = ImageDraw.Draw(canvas)
        text = _phrase(rng, sentences, max_chars=int(width / 11))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        draw.text((6 - left, (height - (bottom - top)) // 2 - top), text, font=font, fill=_ink(rng, light))
        line = canvas.crop((0, 0, min(width * 2, right - left + 12), height))
        resized_width = min(width, int(np.ceil(height * line.width / line.height)))
        images.append(line.resize((resized_width, height), Image.Resampling.BILINEAR))
        texts.append(text)
    return tuple(images), tuple(texts)


def text_lines(split: str = "calibration", height: int = 48, width: int = 320, count: int = 64,
               input: str = "x") -> list[dict[str, np.ndarray]]:
    """Rendered text lines for a recognizer (module docstring)."""
    return [{input: _normalise(image, width)} for image in _line_images(split, height, width, count)[0]]


def line_texts(split: str = "calibration", height: int = 48, width: int = 320, count: int = 64) -> list[str]:
    """The text written on each of `text_lines(...)`'s lines (the same arguments)."""
    return list(_line_images(split, height, width, count)[1])


def rotated_text_lines(split: str = "calibration", height: int = 48, width: int = 192, count: int = 64,
                       input: str = "x") -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """Rendered lines, every second one turned 180 degrees (label 1), for a direction classifier."""
    samples, labels = [], []
    for index, image in enumerate(_line_images(split, height, width, count)[0]):
        turned = index % 2 == 1  # turned before the resize and padding, as a crop upside down would be
        samples.append({input: _normalise(image.rotate(180) if turned else image, width)})
        labels.append(int(turned))
    return samples, np.asarray(labels, np.int64)


def text_pages(split: str = "calibration", size: int = 480, count: int = 24, input: str = "x") -> list[dict[str, np.ndarray]]:
    """Pages of rendered text on photo crops, for a text detector (module docstring)."""
    from PIL import ImageDraw

    _check_split(split)
    rng = np.random.default_rng(_SEEDS[split] + 1)
    sentences = _sentences(split)
    photos = [load_photo(name) for name in SPLITS[split]]
    samples = []
    for _ in range(count):
        light = bool(rng.random() < 0.5)
        page = _background(rng, photos, size, size, light)
        draw = ImageDraw.Draw(page)
        y = int(rng.integers(5, 40))
        while y < size - 30:
            if rng.random() < 0.7:
                font = _font(int(rng.integers(14, 30)))
                draw.text((int(rng.integers(5, size // 3)), y), _phrase(rng, sentences, 40), font=font,
                          fill=_ink(rng, light))
            y += int(rng.integers(24, 60))
        samples.append({input: _normalise(page)})
    return samples
