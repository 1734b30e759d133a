"""Deterministic ImageNet-style crops of the colour photos shipped in scikit-image and scikit-learn.

No ImageNet images can be downloaded here, so MobileNetV2 is calibrated and validated on square crops of
real photos that ship inside two installed wheels. There are no labels: the quantized model is judged by
its agreement with the float model.

Photos (all colour, natural, >= 300 px on the short side; the sha256 of each file is checked, so a
package upgrade that changed a photo cannot silently change the data under the same cache key):

- calibration (6): astronaut, motorcycle_left, motorcycle_right, rocket, hubble_deep_field
  (scikit-image), flower (scikit-learn)
- validation (5): chelsea, coffee, ihc (a stained-tissue micrograph), retina (scikit-image), china
  (scikit-learn)

Each side mixes photos with objects ImageNet knows (scooter, space shuttle / cat, espresso, palace)
and out-of-domain ones (deep sky / micrograph, fundus photo), so both see similar activation ranges.
hubble_deep_field sits in calibration because the float model calls all 72 of its crops "bubble" with
high confidence: in validation it would be a fifth of the crops and a third of the confident ones.
The two motorcycle photos are a stereo pair, nearly the same picture: they stay on one side.
Left out: the grey-level photos (camera, coins, moon, brick, grass, gravel, cell, clock_motion, page,
text), the synthetic or drawn ones (color, phantom, chessboard_*, logo, horse), and the tiny ones
(microaneurysms 102 px, no_time_for_that_tiny, multipage*, lfw_subset 25 px).

Crops per photo: 4 scales x 9 positions x 2 flips = 72 (measured.md's 3 x 5 x 2 = 30 gives only 180 /
150 crops with 11 photos). A crop is a square of `scale` x the photo's short side (0.9, 0.7, 0.55,
0.4), placed at the centre, the 4 corners, then the 4 edge midpoints (a 3x3 grid over the free room;
the first 5 are measured.md's positions), mirrored or not, then resized to 224 x 224 with Pillow's
bilinear filter (antialiased when shrinking, like torchvision's Resize for these weights). Totals:
calibration 6 x 72 = 432 crops, validation 5 x 72 = 360 crops.

Order: variant-major, photo-minor (variant 0 of every photo, then variant 1, ...), with variants in
position, scale, flip order, so any prefix covers every photo of the split: the first 200 calibration
samples (the recipes' statistics) are the centre, top-left, top-right and bottom-left crops of all 6
photos at every scale, both flips (192), and 8 bottom-right ones; the fallback's held-out split, when
enabled, starts at sample 200.

Normalisation: RGB / 255, minus ImageNet mean (0.485, 0.456, 0.406), divided by std (0.229, 0.224,
0.225), float32 NCHW [1, 3, 224, 224].

`imagenet_crops` is the recipe's data builder (`data: {kind: builder, builder:
"pipeline.models.photo_crops:imagenet_crops", args: {split: validation}}`): a sized, re-iterable set
that decodes the split's photos once and makes each crop only when it is asked for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import DataError
from .packages import installed_package_dir

__all__ = [
    "PHOTOS",
    "SPLITS",
    "SCALES",
    "POSITIONS",
    "SIZE",
    "Crop",
    "CropSet",
    "imagenet_crops",
    "crops",
    "example_input",
    "load_photo",
    "photo_size",
    "normalise",
]

SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# name -> (package, path inside the package, sha256 of the file)
PHOTOS: dict[str, tuple[str, str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png", "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"),
    "chelsea": ("skimage", "data/chelsea.png", "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"),
    "coffee": ("skimage", "data/coffee.png", "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"),
    "hubble_deep_field": (
        "skimage", "data/hubble_deep_field.jpg", "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4"),
    "ihc": ("skimage", "data/ihc.png", "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef"),
    "motorcycle_left": (
        "skimage", "data/motorcycle_left.png", "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179"),
    "motorcycle_right": (
        "skimage", "data/motorcycle_right.png", "5fc913ae870e42a4b662314bc904d1786bcad8e2f0b9b67dba5a229406357797"),
    "retina": ("skimage", "data/retina.jpg", "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6"),
    "rocket": ("skimage", "data/rocket.jpg", "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c"),
    "china": ("sklearn", "datasets/images/china.jpg", "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29"),
    "flower": ("sklearn", "datasets/images/flower.jpg", "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638"),
}

SPLITS: dict[str, tuple[str, ...]] = {
    "calibration": ("astronaut", "motorcycle_left", "motorcycle_right", "rocket", "hubble_deep_field", "flower"),
    "validation": ("chelsea", "coffee", "ihc", "retina", "china"),
}

SCALES = (0.9, 0.7, 0.55, 0.4)
# (fy, fx): where the square sits in the free room, 0 = top/left, 1 = bottom/right.
POSITIONS = ((0.5, 0.5), (0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0), (0.0, 0.5), (0.5, 0.0), (0.5, 1.0), (1.0, 0.5))
FLIPS = (False, True)
VARIANTS = tuple((p, s, f) for p in range(len(POSITIONS)) for s in range(len(SCALES)) for f in FLIPS)

_INSTALL_HINT = "install the `models` extra (pip install -e .[models]: scikit-image and scikit-learn)"


@dataclass(frozen=True)
class Crop:
    """Where one sample comes from: photo, scale index, position index, mirrored; `box` in pixels."""

    photo: str
    scale: int
    position: int
    flip: bool
    box: tuple[int, int, int, int]  # left, top, right, bottom


@lru_cache(maxsize=None)
def _photo_bytes(name: str) -> bytes:
    if name not in PHOTOS:
        raise DataError(f"photo '{name}' is not one of the bundled photos ({', '.join(PHOTOS)})")
    package, inner, digest = PHOTOS[name]
    folder = installed_package_dir(package)
    if folder is None:
        raise DataError(f"photo '{name}': package {package} is not installed; {_INSTALL_HINT}")
    try:
        data = (folder / inner).read_bytes()
    except OSError as err:
        raise DataError(f"photo '{name}': cannot read {package}/{inner} ({err}); reinstall {package}") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise DataError(
            f"photo '{name}' ({package}/{inner}) is not the file this data set was defined on (sha256 differs); "
            f"install the {package} version pinned in pyproject.toml"
        )
    return data


def load_photo(name: str):
    """The photo as a Pillow RGB image (decoded from the installed package, hash checked)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(_photo_bytes(name))) as image:
        return image.convert("RGB")


@lru_cache(maxsize=None)
def photo_size(name: str) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(_photo_bytes(name))) as image:
        return image.size


def _box(width: int, height: int, scale: float, position: tuple[float, float]) -> tuple[int, int, int, int]:
    side = int(round(scale * min(width, height)))
    fy, fx = position
    left, top = int(round(fx * (width - side))), int(round(fy * (height - side)))
    return left, top, left + side, top + side


# normalise's arithmetic for every (channel, byte): ((v / 255) - mean) / std in float32, the same IEEE
# operations per value as computing it pixel by pixel, so a lookup is bit-identical and ~2x faster.
_NORMALISED = ((np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0) - MEAN[:, None]) / STD[:, None])


def normalise(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> float32 [1, 3, H, W], ImageNet mean/std (other dtypes: the same arithmetic)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:  # no table for them: computed value by value, as the table was
        x = (rgb.astype(np.float32) / np.float32(255.0) - MEAN) / STD
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])
    planes = np.ascontiguousarray(rgb.transpose(2, 0, 1)).astype(np.intp)
    planes += (np.arange(3) * 256)[:, None, None]  # row c of the table
    return _NORMALISED.reshape(-1)[planes][None]


def _render(image, crop: Crop) -> np.ndarray:
    from PIL import Image

    square = image.crop(crop.box)
    if crop.flip:
        square = square.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(square.resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)


def _split_photos(split: str) -> tuple[str, ...]:
    if split not in SPLITS:
        raise DataError(f"photo crops: split is {split!r}; use one of {', '.join(map(repr, SPLITS))}")
    return SPLITS[split]


def crops(split: str) -> list[Crop]:
    """Every crop of the split, in sample order (variant-major, photo-minor)."""
    photos = _split_photos(split)
    return [
        Crop(name, s, p, f, _box(*photo_size(name), SCALES[s], POSITIONS[p]))
        for p, s, f in VARIANTS
        for name in photos
    ]


class CropSet:
    """The split's crops as samples `{input: float32 [1,3,224,224]}`: sized, re-iterable, made on demand."""

    def __init__(self, split: str, input: str = "image") -> None:
        self.split, self.input = split, input
        self.crops = crops(split)
        # Decoded photos, each on first use and kept (~20 MB at most): the quantizer's layer-by-layer
        # steps iterate the set once per layer, and decoding every photo each time cost more than the crops.
        self._images: dict = {}

    def __len__(self) -> int:
        return len(self.crops)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for crop in self.crops:
            if crop.photo not in self._images:
                self._images[crop.photo] = load_photo(crop.photo)
            yield {self.input: normalise(_render(self._images[crop.photo], crop))}


def imagenet_crops(split: str = "calibration", *, input: str = "image") -> CropSet:
    """Recipe data builder: the `split` ('calibration' or 'validation') crops feeding model input `input`."""
    return CropSet(split, input)


def example_input(photo: str = "chelsea") -> np.ndarray:
    """One normalised sample: the photo's first variant (centre, scale 0.9, not mirrored)."""
    image = load_photo(photo)
    p, s, f = VARIANTS[0]
    crop = Crop(photo, s, p, f, _box(*image.size, SCALES[s], POSITIONS[p]))
    return normalise(_render(image, crop))
