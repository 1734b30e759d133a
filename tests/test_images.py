"""Image-folder data sets (pipeline.data.images): preprocessing, order, labels, streaming and clear errors.

Images are written by Pillow in the test; expected values are computed by hand from the pixels written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.data import images as image_module
from pipeline.data import open_dataset
from pipeline.errors import DataError
from pipeline.data.images import ImageData, image_source
from pipeline.recipe import InputSpec, load_recipe

PIL = pytest.importorskip("PIL.Image")


def _png(folder: Path, name: str, pixels: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    mode = "L" if pixels.ndim == 2 else "RGB"
    PIL.fromarray(pixels.astype(np.uint8), mode).save(folder / name)
    return folder / name


def _rgb(seed: int, h: int = 4, w: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _data(path: Path, **kw) -> ImageData:
    return ImageData(kind="images", path=path, **kw)


def _source(path: Path, shape, *, dtype="float32", limit=100, **kw):
    spec = InputSpec(name="x", shape=list(shape), dtype=dtype)
    return image_source(path, _data(path, **kw), [spec], limit, "calibration")


def _all(source) -> list[np.ndarray]:
    return [batch["x"] for batch in source]


def test_rgb_nchw_normalized_in_sorted_order(tmp_path: Path):
    pixels = {name: _rgb(i) for i, name in enumerate(["b.png", "a.png", "c.PNG"])}
    for name, p in pixels.items():
        _png(tmp_path, name, p)
    (tmp_path / "notes.txt").write_text("not an image")
    mean, std = [0.5, 0.25, 0.125], [0.5, 2.0, 4.0]
    source = _source(tmp_path, [1, 3, 4, 5], mean=mean, std=std)
    got = _all(source)
    assert len(source) == 3 and len(got) == 3
    for name, batch in zip(["a.png", "b.png", "c.PNG"], got):  # sorted by name, .txt skipped
        want = (pixels[name].astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
        assert batch.dtype == np.float32 and batch.shape == (1, 3, 4, 5)
        np.testing.assert_allclose(batch[0], want.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)
    # Deterministic: a second pass gives the same arrays.
    for first, second in zip(got, _all(source)):
        np.testing.assert_array_equal(first, second)


def test_bgr_nhwc_and_scale(tmp_path: Path):
    p = _rgb(1)
    _png(tmp_path, "one.png", p)
    (batch,) = _all(_source(tmp_path, [1, 4, 5, 3], layout="nhwc", channels="bgr", scale=1.0))
    np.testing.assert_array_equal(batch[0], p[:, :, ::-1].astype(np.float32))


def test_gray_from_rgb_and_resize(tmp_path: Path):
    p = _rgb(2, 16, 20)
    _png(tmp_path, "big.png", p)
    (batch,) = _all(_source(tmp_path, [1, 1, 8, 10], channels="gray", size=(8, 10)))
    want = np.asarray(PIL.fromarray(p).convert("L").resize((10, 8), PIL.Resampling.BILINEAR), np.float32) / 255
    assert batch.shape == (1, 1, 8, 10)
    np.testing.assert_allclose(batch[0, 0], want, atol=1e-6)


def test_wrong_size_without_resize_names_the_file(tmp_path: Path):
    _png(tmp_path, "small.png", _rgb(0, 4, 4))
    with pytest.raises(DataError, match=r"small\.png is 4x4.*set data\.size: \[8, 8\]"):
        _all(_source(tmp_path, [1, 3, 8, 8]))


def test_jpeg_and_gray_png_and_palette_png(tmp_path: Path):
    flat = np.full((6, 6, 3), 200, np.uint8)
    PIL.fromarray(flat).save(tmp_path / "a.jpg", quality=95)
    PIL.fromarray(flat[:, :, 0], "L").save(tmp_path / "b.png")  # a gray file feeding an rgb input
    PIL.fromarray(flat).quantize(colors=4, dither=PIL.Dither.NONE).save(tmp_path / "c.png")  # palette PNG
    batches = _all(_source(tmp_path, [1, 3, 6, 6], scale=1.0))
    for batch in batches:
        assert batch.shape == (1, 3, 6, 6)
        assert np.abs(batch - 200).max() <= 3  # JPEG and palette quantization: a few levels at most


def test_batches_of_n_consecutive_images_and_limit(tmp_path: Path):
    for i in range(5):
        _png(tmp_path, f"{i}.png", np.full((2, 2), i * 10, np.uint8))
    source = _source(tmp_path, [2, 1, 2, 2], channels="gray", scale=1.0)
    got = _all(source)
    assert len(source) == 2  # 5 images, batches of 2: the fifth is left out
    assert [b[:, 0, 0, 0].tolist() for b in got] == [[0, 10], [20, 30]]
    assert len(_all(_source(tmp_path, [1, 1, 2, 2], channels="gray", limit=3))) == 3


def test_uint8_input_takes_raw_pixels(tmp_path: Path):
    p = _rgb(3)
    _png(tmp_path, "x.png", p)
    (batch,) = _all(_source(tmp_path, [1, 4, 5, 3], dtype="uint8", layout="nhwc", scale=1.0))
    assert batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], p)
    with pytest.raises(DataError, match="takes raw pixels; set scale: 1"):
        _source(tmp_path, [1, 4, 5, 3], dtype="uint8", layout="nhwc")


def test_images_are_decoded_one_at_a_time(tmp_path: Path, monkeypatch):
    for i in range(4):
        _png(tmp_path, f"{i}.png", _rgb(i))
    opened = []
    real = image_module.load_image
    monkeypatch.setattr(image_module, "load_image", lambda path, *a, **k: opened.append(path.name) or real(path, *a, **k))
    source = _source(tmp_path, [1, 3, 4, 5])
    assert opened == []  # building the source decodes nothing
    iterator = iter(source)
    next(iterator)
    assert opened == ["0.png"]
    next(iterator)
    assert opened == ["0.png", "1.png"]


def test_labels_csv_follows_the_sorted_files(tmp_path: Path):
    folder = tmp_path / "imgs"
    for name in ["b.png", "a.png", "c.png"]:
        _png(folder, name, _rgb(0))
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("filename,label\nc.png,2\na.png, 0\nb.png,1\nunused.png,7\n")
    source = _source(folder, [1, 3, 4, 5], labels=csv_path)
    assert source.labels.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "text, message",
    [
        ("a.png,0\n", r"no label for b\.png"),
        ("a.png,0\nb.png,cat\n", r"line 2: label 'cat' is not an integer"),
        ("a.png,0\na.png,1\nb.png,1\n", r"line 2: 'a\.png' is listed twice"),
        ("a.png;0\n", r"line 1: 1 fields"),
        ("filename,label\n", "holds no 'filename,label' rows"),
    ],
    ids=["missing", "not-integer", "duplicate", "wrong-separator", "header-only"],
)
def test_bad_labels_csv(tmp_path: Path, text: str, message: str):
    folder = tmp_path / "imgs"
    for name in ["a.png", "b.png"]:
        _png(folder, name, _rgb(0))
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(DataError, match=message) as err:
        _source(folder, [1, 3, 4, 5], labels=tmp_path / "labels.csv")
    assert "calibration.data.labels" in str(err.value)


def test_missing_labels_file(tmp_path: Path):
    _png(tmp_path, "a.png", _rgb(0))
    with pytest.raises(DataError, match="labels.*does not exist"):
        _source(tmp_path, [1, 3, 4, 5], labels=tmp_path / "nope.csv")


@pytest.mark.parametrize(
    "setup, kwargs, message",
    [
        ("empty", {}, "holds no .png/.jpg/.jpeg images"),
        ("file", {}, "is not a folder"),
        ("one", {"mean": [0.1, 0.2]}, r"data\.mean: 2 values for 3-channel 'rgb' images"),
        ("one", {"std": [1.0, 1.0, 1.0, 1.0]}, r"data\.std: 4 values"),
        ("one", {"std": [0.0]}, "holds a zero"),
        ("one", {"channels": "gray"}, r"'gray' gives 1 channel\(s\)"),
        ("one", {"size": (8, 8)}, r"data\.size: \[8, 8\].*does not match"),
        ("one", {"layout": "nhwc"}, "takes 5 in layout nhwc"),
    ],
    ids=["empty-folder", "not-a-folder", "mean-length", "std-length", "zero-std", "channels", "size", "layout"],
)
def test_bad_declarations_fail_before_decoding(tmp_path: Path, setup: str, kwargs: dict, message: str):
    folder = tmp_path / "imgs"
    folder.mkdir()
    if setup == "one":
        _png(folder, "a.png", _rgb(0))
    elif setup == "file":
        folder.rmdir()
        folder.write_text("x")
    with pytest.raises(DataError, match=message):
        _source(folder, [1, 3, 4, 5], **kwargs)


@pytest.mark.parametrize(
    "content",
    [b"this is not a png", None],
    ids=["garbage", "truncated"],
)
def test_unreadable_image_names_the_file(tmp_path: Path, content: bytes | None):
    _png(tmp_path, "a.png", _rgb(0))
    bad = _png(tmp_path, "b.png", _rgb(1, 40, 40))
    bad.write_bytes(content if content is not None else bad.read_bytes()[:60])
    source = _source(tmp_path, [1, 3, 4, 5], size=(4, 5))
    iterator = iter(source)
    next(iterator)  # a.png is fine
    with pytest.raises(DataError, match=r"b\.png is not a readable image"):
        next(iterator)


def test_too_few_images_for_one_batch(tmp_path: Path):
    _png(tmp_path, "a.png", _rgb(0))
    with pytest.raises(DataError, match="holds 1 image.*needs 2"):
        _source(tmp_path, [2, 3, 4, 5])


def test_input_selection_with_several_inputs(tmp_path: Path):
    _png(tmp_path, "a.png", _rgb(0))
    specs = [InputSpec(name="x", shape=[1, 3, 4, 5]), InputSpec(name="y", shape=[1, 2])]
    with pytest.raises(DataError, match="has 2 inputs .*name the one the images feed"):
        image_source(tmp_path, _data(tmp_path), specs, 10, "calibration")
    with pytest.raises(DataError, match=r"other inputs \(y\) would get no data"):
        image_source(tmp_path, _data(tmp_path, input="x"), specs, 10, "calibration")
    with pytest.raises(DataError, match="'z' is not a model input"):
        image_source(tmp_path, _data(tmp_path, input="z"), specs[:1], 10, "calibration")


def _image_folder(folder: Path, count: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    labels = []
    for i in range(count):
        _png(folder, f"img_{i:03d}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
        labels.append(int(rng.integers(0, 3)))
    (folder.parent / f"{folder.name}.csv").write_text(
        "filename,label\n" + "".join(f"img_{i:03d}.png,{y}\n" for i, y in enumerate(labels))
    )
    return labels


def test_recipe_paths_resolve_against_the_recipe_folder(tmp_path: Path, tiny_cnn_recipe):
    labels = _image_folder(tmp_path / "val_imgs", 6, 1)
    data = {"kind": "images", "path": "val_imgs", "channels": "gray", "labels": "val_imgs.csv"}
    recipe = load_recipe(tiny_cnn_recipe(validation={"data": data, "samples": 6}))
    source = open_dataset(recipe, "validation")
    assert source.labels.tolist() == labels
    assert len(list(source)) == 6


def test_end_to_end_with_image_folders(tmp_path: Path, tiny_cnn_recipe):
    """A recipe whose calibration and validation data are image folders, through the real CLI."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    _image_folder(tmp_path / "calib_imgs", 12, 0)
    _image_folder(tmp_path / "val_imgs", 8, 1)
    image = {"kind": "images", "channels": "gray", "mean": [0.5], "std": [0.25]}
    recipe = tiny_cnn_recipe(
        calibration={"data": {**image, "path": "calib_imgs"}, "samples": 12},
        validation={"data": {**image, "path": "val_imgs", "labels": "val_imgs.csv"}, "samples": 8},
    )
    result = CliRunner().invoke(app, ["run", str(recipe), "--quiet"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    metrics = yaml.safe_load((out / "validate" / "metrics.json").read_text())
    assert metrics["samples"] == 8 and "accuracy" in metrics
    assert yaml.safe_load((out / "calibrate" / "stage.json").read_text())["metrics"]["samples"] == 12


def test_dataset_fingerprint_follows_image_content_and_labels(tmp_path: Path, tiny_cnn_recipe):
    from pipeline.data import dataset_fingerprint

    _image_folder(tmp_path / "val_imgs", 4, 1)
    data = {"kind": "images", "path": "val_imgs", "channels": "gray", "labels": "val_imgs.csv"}
    recipe = load_recipe(tiny_cnn_recipe(validation={"data": data, "samples": 4}))
    first = dataset_fingerprint(recipe, "validation")
    assert first == dataset_fingerprint(recipe, "validation")
    _png(tmp_path / "val_imgs", "img_000.png", np.zeros((8, 8), np.uint8))  # same name, new pixels
    second = dataset_fingerprint(recipe, "validation")
    assert second["data"] != first["data"] and second["labels"] == first["labels"]
    (tmp_path / "val_imgs.csv").write_text("img_000.png,1\nimg_001.png,1\nimg_002.png,1\nimg_003.png,1\n")
    assert dataset_fingerprint(recipe, "validation")["labels"] != second["labels"]
    # npz data keeps the key the stages have always used: its sha256.
    from pipeline.core.fileio import sha256_file

    assert dataset_fingerprint(recipe, "calibration") == {"data": sha256_file(tmp_path / "calib.npz")}


def test_changed_images_rerun_calibration(tmp_path: Path, tiny_cnn_recipe):
    from pipeline.api import run_stage

    _image_folder(tmp_path / "calib_imgs", 6, 0)
    data = {"kind": "images", "path": "calib_imgs", "channels": "gray"}
    recipe = load_recipe(tiny_cnn_recipe(calibration={"data": data, "samples": 6}))
    for stage in ("export", "prepare", "calibrate"):
        run_stage(recipe, stage, progress=False, force=False)
    _image_folder(tmp_path / "calib_imgs", 6, 5)  # new pixels under the same names
    assert not run_stage(recipe, "calibrate", progress=False, force=False).cached
