"""Data options of issue 10: image resize modes and channel order on real photos, the seeded split of one
source into disjoint calibration and validation parts, and the `audio` kind (WAV reading against the
standard library's `wave` on CPython's own recordings, windows, resampling, mono, peak normalisation)."""

from __future__ import annotations

import struct
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.data import open_dataset
from pipeline.data.audio import read_wav
from pipeline.data.images import ImageData, load_image
from pipeline.errors import DataError, RecipeError
from pipeline.recipe import load_recipe, recipe_from_dict

from .test_intake import write_wav

skimage_data = pytest.importorskip("skimage.data")
AUDIODATA = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "test" / "audiodata"


@pytest.fixture(scope="module")
def chelsea(tmp_path_factory) -> Path:
    """scikit-image's cat photo (451 x 300), as a user's PNG."""
    from PIL import Image

    path = tmp_path_factory.mktemp("photo") / "chelsea.png"
    Image.fromarray(skimage_data.chelsea()).save(path)
    return path


def _image(**settings) -> ImageData:
    return ImageData(kind="images", path=Path("."), **settings)


def test_resize_modes_on_a_photo(chelsea: Path):
    from PIL import Image

    original = np.asarray(Image.open(chelsea).convert("RGB"))  # 300 x 451
    stretch = load_image(chelsea, _image(size=(64, 64)), 64, 64, section="calibration")
    expected = np.asarray(Image.open(chelsea).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    assert np.array_equal(stretch, expected)

    box = load_image(chelsea, _image(size=(64, 64), resize="letterbox", pad_value=114), 64, 64, section="calibration")
    inner = round(300 * 64 / 451)  # 43 rows of picture, centred; the rest is padding
    top = (64 - inner) // 2
    assert (box[:top] == 114).all() and (box[top + inner :] == 114).all()
    assert not (box[top + 2 : top + inner - 2] == 114).all()

    crop = load_image(chelsea, _image(size=(64, 64), resize="center_crop"), 64, 64, section="calibration")
    scaled = Image.open(chelsea).convert("RGB").resize((round(451 * 73 / 300), 73), Image.Resampling.BILINEAR)
    left, upper = (scaled.size[0] - 64) // 2, (73 - 64) // 2  # shorter side 64 / 0.875 = 73, centre 64 x 64
    assert np.array_equal(crop, np.asarray(scaled.crop((left, upper, left + 64, upper + 64))))

    bgr = load_image(chelsea, _image(size=(64, 64), channels="bgr"), 64, 64, section="calibration")
    assert np.array_equal(bgr, stretch[:, :, ::-1])
    with pytest.raises(DataError, match=r"set data.size: \[64, 64\] and a resize mode"):
        load_image(chelsea, _image(), 64, 64, section="calibration")
    assert original.shape == (300, 451, 3)


def test_images_feed_an_input_without_a_batch_axis(tmp_path: Path, chelsea: Path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(chelsea.read_bytes())
    data = {"kind": "images", "path": "imgs", "size": [32, 48], "layout": "nhwc", "resize": "letterbox"}
    spec = recipe_from_dict({"name": "t", "model": {"onnx": "m.onnx"},
                             "inputs": [{"name": "img", "shape": [32, 48, 3], "batch": False}],
                             "calibration": {"data": data}, "validation": {"data": data}}, base_dir=tmp_path)
    (sample,) = list(open_dataset(spec, "calibration"))
    assert sample["img"].shape == (32, 48, 3) and sample["img"].dtype == np.float32


def _split_recipe(tmp_path: Path, n: int, split: dict, val_split: dict | None = None) -> Path:
    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1)
    np.savez(tmp_path / "all.npz", x=x, label=np.arange(n))
    data = {"kind": "npz", "path": "all.npz", "split": split}
    recipe = {"name": "s", "model": {"onnx": "m.onnx"}, "inputs": [{"name": "x", "shape": [1, 1]}],
              "calibration": {"data": data, "samples": 1000},
              "validation": {"data": {**data, "labels": "label", "split": val_split or split}, "samples": 1000}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_split_is_seeded_disjoint_and_complete(tmp_path: Path):
    recipe = load_recipe(_split_recipe(tmp_path, 50, {"seed": 7, "validation": 0.3}))
    cal = [int(b["x"][0, 0]) for b in open_dataset(recipe, "calibration")]
    val_source = open_dataset(recipe, "validation")
    val = [int(b["x"][0, 0]) for b in val_source]
    assert len(val) == 15 and len(cal) == 35
    assert not set(cal) & set(val) and sorted(cal + val) == list(range(50))
    assert cal == sorted(cal) and val == sorted(val)  # each part keeps the source's order
    assert val_source.labels.tolist() == val  # labels follow their samples
    again = [int(b["x"][0, 0]) for b in open_dataset(load_recipe(_split_recipe(tmp_path, 50, {"seed": 7, "validation": 0.3})), "validation")]
    other = [int(b["x"][0, 0]) for b in open_dataset(load_recipe(_split_recipe(tmp_path, 50, {"seed": 8, "validation": 0.3})), "validation")]
    assert again == val and other != val


def test_split_of_an_image_folder_is_by_file(tmp_path: Path, chelsea: Path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(10):
        (folder / f"img{i}.png").write_bytes(chelsea.read_bytes())
    data = {"kind": "images", "path": "imgs", "size": [16, 16], "split": {"seed": 0, "validation": 0.3}}
    spec = recipe_from_dict({"name": "t", "model": {"onnx": "m.onnx"}, "inputs": [{"name": "x", "shape": [1, 3, 16, 16]}],
                             "calibration": {"data": data}, "validation": {"data": data}}, base_dir=tmp_path)
    assert "(7 images)" in open_dataset(spec, "calibration").description
    assert "(3 images)" in open_dataset(spec, "validation").description


def test_split_mismatch_and_empty_part_are_refused(tmp_path: Path):
    with pytest.raises(RecipeError, match="same source with different 'split' settings"):
        load_recipe(_split_recipe(tmp_path, 50, {"seed": 0, "validation": 0.3}, {"seed": 1, "validation": 0.3}))
    recipe = load_recipe(_split_recipe(tmp_path, 2, {"seed": 0, "validation": 0.1}))
    with pytest.raises(DataError, match="2 sample.s. cannot be split 90%/10%: one part would be empty"):
        open_dataset(recipe, "calibration")


# --- audio ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (AUDIODATA / "pluck-pcm16.wav").is_file(), reason="CPython's test recordings are not installed")
def test_wav_reader_against_the_standard_library():
    """CPython's plucked-string recording (stereo, 11025 Hz) in 8/16/24/32-bit PCM decodes to the same signal."""
    with wave.open(str(AUDIODATA / "pluck-pcm16.wav")) as w:
        reference = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2) / 32768.0
    decoded = {bits: read_wav(AUDIODATA / f"pluck-pcm{bits}.wav", where="test") for bits in (8, 16, 24, 32)}
    assert all(rate == 11025 and samples.shape == reference.shape for samples, rate in decoded.values())
    assert np.array_equal(decoded[16][0], reference.astype(np.float32))
    # The 24- and 32-bit files hold the same finer signal; the 16- and 8-bit ones its rounding.
    assert np.abs(decoded[24][0] - decoded[32][0]).max() < 1e-6
    assert np.abs(decoded[24][0] - decoded[16][0]).max() < 2.0**-12
    assert np.abs(decoded[8][0] - decoded[16][0]).max() < 2.0**-7 + 2.0**-12


def _float_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """A 32-bit IEEE-float WAV (format 3), which the standard library's `wave` cannot read."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def _audio_recipe(tmp_path: Path, shape: list[int], **settings) -> object:
    data = {"kind": "audio", "path": "clips", **settings}
    return recipe_from_dict({"name": "a", "model": {"onnx": "m.onnx"}, "inputs": [{"name": "x", "shape": shape}],
                             "calibration": {"data": data, "samples": 1000}, "validation": {"data": data}},
                            base_dir=tmp_path)


def test_audio_windows_resampling_mono_and_normalisation(tmp_path: Path):
    clips = tmp_path / "clips"
    clips.mkdir()
    t = np.arange(8000) / 8000
    write_wav(clips / "a_8k.wav", 0.25 * np.sin(2 * np.pi * 440 * t), 8000)  # 1 s at 8 kHz
    _float_wav(clips / "b_float.wav", 0.5 * np.sin(2 * np.pi * 220 * np.arange(4000) / 16000), 16000)  # 0.25 s

    windows = list(open_dataset(_audio_recipe(tmp_path, [1, 1000], sample_rate=16000, hop=500), "calibration"))
    # a: 16000 samples after resampling -> (16000 - 1000) / 500 + 1 = 31 windows; b: (4000 - 1000) / 500 + 1 = 7
    assert len(windows) == 38 and windows[0]["x"].shape == (1, 1000)
    assert 0.2 < np.abs(windows[3]["x"]).max() <= 0.26  # the level is kept (normalize: none)
    peak = list(open_dataset(_audio_recipe(tmp_path, [1, 1000], sample_rate=16000, normalize="peak"), "calibration"))
    assert len(peak) == 16 + 4 and np.isclose(max(np.abs(w["x"]).max() for w in peak[:16]), 1.0, atol=1e-3)
    padded = list(open_dataset(_audio_recipe(tmp_path, [1, 1, 3000], sample_rate=16000, pad_last=True), "calibration"))
    assert len(padded) == 6 + 2 and padded[-1]["x"].shape == (1, 1, 3000) and not padded[-1]["x"][0, 0, 1000:].any()
    with pytest.raises(DataError, match="different rates"):
        open_dataset(_audio_recipe(tmp_path, [1, 1000]), "calibration")
    with pytest.raises(DataError, match="window: 512 samples, input 'x' \\[1, 1000\\] takes 1000"):
        open_dataset(_audio_recipe(tmp_path, [1, 1000], window=512, sample_rate=16000), "calibration")
    (clips / "c.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(DataError, match="c.wav is a damaged WAV file"):
        open_dataset(_audio_recipe(tmp_path, [1, 1000], sample_rate=16000), "calibration")
