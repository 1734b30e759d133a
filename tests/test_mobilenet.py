"""MobileNetV2 with its real ImageNet checkpoint, and the deterministic photo crops it is validated on.

The float model is checked on real photos (a cat must be a cat); the crops for counts, shapes, order,
determinism and the split by photo. The end-to-end run of one recipe is marked slow (~25 s).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import DataError, ModelError

from .conftest import RECIPES

# ImageNet-1k class indices (torchvision's order) of what the two test photos show.
CATS = {281: "tabby", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat", 285: "Egyptian cat"}
CUPS = {504: "coffee mug", 967: "espresso", 968: "cup"}


@pytest.fixture(scope="module")
def mobilenet():
    from pipeline.models import mobilenet_v2

    return mobilenet_v2.build()


def _probabilities(module, image: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(module(torch.from_numpy(image)), dim=1)[0]


# --- the model ------------------------------------------------------------------------------------


def test_architecture_is_torchvisions_and_checkpoint_loads_strictly(mobilenet):
    from pipeline.models.mobilenet_v2 import InvertedResidual, MobileNetV2, checkpoint_path

    module, (example,) = mobilenet
    assert not module.training
    checkpoint = torch.load(checkpoint_path(), weights_only=True, map_location="cpu")
    state = module.state_dict()
    assert list(state) == list(checkpoint)  # same keys, same order: torchvision's layout
    for name, tensor in checkpoint.items():
        assert torch.equal(state[name], tensor), name
    MobileNetV2().load_state_dict(checkpoint, strict=True)

    assert len(module.features) == 19
    blocks = [m for m in module.features if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17
    assert sum(b.use_res_connect for b in blocks) == 10  # residuals where stride 1 and channels match
    assert [type(m).__name__ for m in module.classifier] == ["Dropout", "Linear"]
    assert (module.classifier[1].in_features, module.classifier[1].out_features) == (1280, 1000)
    assert sum(p.numel() for p in module.parameters()) == 3_504_872  # torchvision's MobileNet_V2 count
    assert example.shape == (1, 3, 224, 224) and example.dtype == torch.float32
    with torch.no_grad():
        assert module(example).shape == (1, 1000)


def test_float_model_recognises_the_cat_and_the_coffee(mobilenet):
    from pipeline.models.photo_crops import example_input

    module, _ = mobilenet
    cat = _probabilities(module, example_input("chelsea"))
    coffee = _probabilities(module, example_input("coffee"))
    assert int(cat.argmax()) in CATS and float(cat[list(CATS)].sum()) > 0.9
    assert int(coffee.argmax()) in CUPS and float(coffee[list(CUPS)].sum()) > 0.9


def test_missing_or_foreign_weights_raise_model_error(tmp_path):
    from pipeline.models import mobilenet_v2

    with pytest.raises(ModelError, match="not found"):
        mobilenet_v2.build(str(tmp_path / "absent.pth"))
    foreign = tmp_path / "foreign.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), foreign)
    with pytest.raises(ModelError, match="does not fit MobileNetV2"):
        mobilenet_v2.build(str(foreign))
    foreign.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read"):
        mobilenet_v2.build(str(foreign))


# --- the crops ------------------------------------------------------------------------------------


def test_crops_split_by_photo_with_the_documented_counts():
    from pipeline.models import photo_crops as pc

    calibration, validation = pc.crops("calibration"), pc.crops("validation")
    assert (len(calibration), len(validation)) == (432, 360)  # 6 and 5 photos x 72 crops
    assert len(pc.VARIANTS) == len(pc.SCALES) * len(pc.POSITIONS) * 2 == 72
    cal_photos, val_photos = {c.photo for c in calibration}, {c.photo for c in validation}
    assert not cal_photos & val_photos
    assert cal_photos | val_photos == set(pc.PHOTOS)
    assert {"motorcycle_left", "motorcycle_right"} <= cal_photos  # the stereo pair stays together
    for split in (calibration, validation):
        assert len(set(split)) == len(split)  # every (photo, scale, position, flip) once
        # Any prefix covers every photo: the first 200 calibration samples see all 6.
        assert {c.photo for c in split[:200]} == {c.photo for c in split}


def test_crop_boxes_are_squares_inside_their_photo():
    from pipeline.models import photo_crops as pc

    for crop in pc.crops("calibration") + pc.crops("validation"):
        width, height = pc.photo_size(crop.photo)
        left, top, right, bottom = crop.box
        assert right - left == bottom - top == round(pc.SCALES[crop.scale] * min(width, height))
        assert 0 <= left and 0 <= top and right <= width and bottom <= height


def test_the_normalisation_lookup_is_the_pixel_arithmetic_bit_for_bit():
    from pipeline.models import photo_crops as pc

    # Every byte in every channel, in a non-contiguous view, against the formula computed per pixel.
    image = np.zeros((256, 3, 3), np.uint8)
    for c in range(3):
        image[:, :, c] = np.roll(np.arange(256), 85 * c)[:, None]
    view = image[:, ::-1]
    want = ((view.astype(np.float32) / np.float32(255.0) - pc.MEAN) / pc.STD).transpose(2, 0, 1)[None]
    got = pc.normalise(view)
    assert got.dtype == np.float32 and got.shape == (1, 3, 256, 3) and got.flags["C_CONTIGUOUS"]
    assert np.array_equal(got.view(np.uint32), np.ascontiguousarray(want).view(np.uint32))
    # Other dtypes are not cast to bytes on the way (0.5 stays 0.5, not 0): the same arithmetic, no table.
    halves = view.astype(np.float32) + np.float32(0.5)
    want = ((halves / np.float32(255.0) - pc.MEAN) / pc.STD).transpose(2, 0, 1)[None]
    assert np.array_equal(pc.normalise(halves).view(np.uint32), np.ascontiguousarray(want).view(np.uint32))


def test_samples_are_normalised_deterministic_and_streamed():
    from pipeline.models import photo_crops as pc

    samples = pc.imagenet_crops("validation")
    assert len(samples) == 360

    def digests(n: int) -> list[str]:
        out = []
        for i, sample in enumerate(samples):
            if i == n:
                break
            assert set(sample) == {"image"}
            x = sample["image"]
            assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
            # Undoing the normalisation gives back 8-bit pixel values.
            pixels = (x[0].transpose(1, 2, 0) * pc.STD + pc.MEAN) * 255
            assert np.abs(pixels - np.round(pixels)).max() < 1e-3 and pixels.min() > -0.5 and pixels.max() < 255.5
            out.append(hashlib.sha256(x.tobytes()).hexdigest())
        return out

    first = digests(12)
    assert first == digests(12)  # re-iterable, same bytes each pass
    assert len(set(first)) == 12
    # A mirrored crop is the unmirrored one flipped (bilinear resize is symmetric).
    plain, *_, mirrored = (sample["image"] for sample in itertools.islice(samples, 6))
    assert samples.crops[5].flip and samples.crops[5].photo == samples.crops[0].photo
    assert np.abs(mirrored - plain[..., ::-1]).max() < 0.05
    assert pc.imagenet_crops("calibration", input="x").__iter__().__next__().keys() == {"x"}


def test_unknown_split_or_photo_is_a_data_error():
    from pipeline.models import photo_crops as pc

    with pytest.raises(DataError, match="split is 'test'"):
        pc.imagenet_crops("test")
    with pytest.raises(DataError, match="not one of the bundled photos"):
        pc.example_input("lena")


# --- end to end -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_mobilenet_a8w8_end_to_end(tmp_path: Path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "mbv2"
    result = CliRunner().invoke(app, ["run", str(RECIPES / "mobilenet_v2_a8w8.yaml"), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "artifact" / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["samples"] == 360
    assert 0.0 < metrics["top1_agreement_confident"] <= 100.0 and metrics["confident_share"] > 0.0
    assert manifest["gates_passed"] is True
    assert json.loads((out / "export" / "stage.json").read_text())["metrics"]["max_abs_diff"]["output"] < 1e-4
    # The statistics came from the first 200 calibration crops.
    assert json.loads((out / "calibrate" / "stage.json").read_text())["metrics"]["samples"] == 200


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["mobilenet_v2_xint8", "mobilenet_v2_a16w8", "mobilenet_v2_bf16",
                                    "mobilenet_v2_xdna1"])
def test_every_mobilenet_recipe_converts_and_keeps_its_format_rules(recipe: str, tmp_path: Path):
    """The other shipped MobileNetV2 recipes, on 8 calibration and 16 validation samples (their gates
    are sized for the full sets, so they are left out here; the full runs' figures are in the README):
    the run exits 0, `verify` finds no broken NPU rule (XINT8: power-of-two scales, zero points 0), and
    the int8 formats keep every Conv/Gemm MAC int8 x int8 as an audit counts it."""
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    data = yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())
    data["calibration"]["samples"], data["validation"]["samples"] = 8, 16
    data.pop("gates", None)
    path = tmp_path / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "artifact" / "manifest.json").read_text())
    assert manifest["format"] == data["quantization"]["format"]
    assert manifest["metrics"]["samples"] == 16
    verified = CliRunner().invoke(app, ["verify", str(out / "artifact")])
    assert verified.exit_code == 0, verified.output
    if manifest["format"] in ("xint8", "a8w8"):
        assert manifest["quantization"]["mac_shares"]["mac_share_int8"] == 1.0
