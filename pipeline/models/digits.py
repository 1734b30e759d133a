"""DigitsCNN: a small, accurate image classifier on scikit-learn's bundled 8x8 digits.

It is the pipeline's reference CNN: Conv/BatchNorm/ReLU/MaxPool/Gemm only, so every op has an NPU
kernel, and it trains in well under a minute on two CPU cores with no download (the data ships inside
scikit-learn). The 8x8 images are scaled to [0, 1] (pixels/16) and upsampled to 32x32 so the convolutions
see a realistic spatial size.

    python -m pipeline.models.digits --weights models/digits_cnn.pt --data calibration_data/digits

writes the weights and two plain-array npz files (keys `image` float32 [N,1,32,32], `label` int64 [N]):
`calibration.npz` (256 training images) and `validation.npz` (the whole 360-image test split).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, ModelError

__all__ = ["DigitsCNN", "build", "train", "load_split", "load_npz", "main"]

IMAGE_SIZE = 32
N_CLASSES = 10
N_CALIBRATION = 256
DEFAULT_WEIGHTS = "models/digits_cnn.pt"
DEFAULT_DATA_DIR = "calibration_data/digits"


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    # No conv bias: the BatchNorm that follows has its own shift, and export folds BN into the conv.
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
    ]


class DigitsCNN(nn.Module):
    """3 x (Conv3x3 + BatchNorm + ReLU + MaxPool2) then Flatten + Linear: [1,1,32,32] -> [1,10] logits."""

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(*_block(1, c1), *_block(c1, c2), *_block(c2, c3))
        # A flattened 4x4 map keeps where strokes are; global average pooling cost ~0.5% accuracy here.
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(c3 * (IMAGE_SIZE // 8) ** 2, N_CLASSES)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


def _to_images(pixels: np.ndarray) -> np.ndarray:
    """sklearn digits [N,8,8] in 0..16 -> float32 [N,1,32,32] in [0,1], bilinear, align_corners=False."""
    x = torch.from_numpy((pixels / 16.0).astype(np.float32))[:, None]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.numpy()


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels): stratified 80/20, random_state=0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = _to_images(digits.images)
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    return x_tr, y_tr, x_te, y_te


def _publish(tmp: str, path: Path) -> None:
    # mkstemp creates 0600 files; these are shared, committed artifacts, so make them world-readable.
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _save_npz(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    """Write plain arrays (no pickle) to a temp file beside `path`, then rename: never a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, image=image.astype(np.float32), label=label.astype(np.int64))
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_state(path: Path, module: nn.Module) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(module.state_dict(), tmp)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [N,1,32,32], labels int64 [N]) from a calibration/validation npz, checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"digits data not found: {path}; run `make digits` to create it")
    with np.load(path, allow_pickle=False) as data:
        if set(data.files) != {"image", "label"}:
            raise DataError(f"{path}: keys {sorted(data.files)}, expected ['image', 'label']; rerun `make digits`")
        image, label = data["image"], data["label"]
    if image.dtype != np.float32 or image.ndim != 4 or image.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{path}: image is {image.dtype}{list(image.shape)}, expected float32[N,1,32,32]; rerun `make digits`")
    if label.dtype != np.int64 or label.shape != (image.shape[0],):
        raise DataError(f"{path}: label is {label.dtype}{list(label.shape)}, expected int64[{image.shape[0]}]; rerun `make digits`")
    return image, label


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seed everything, deterministic kernels, one thread (reduction order must not depend on cores).

    The caller's torch settings are restored afterwards: training is a library call, not a process.
    """
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def _shift(batch: torch.Tensor, max_px: int = 2) -> torch.Tensor:
    """Augmentation: move the batch by up to `max_px` pixels each way, filling with background (0)."""
    dy, dx = (int(v) for v in torch.randint(-max_px, max_px + 1, (2,)))
    padded = F.pad(batch, (max_px, max_px, max_px, max_px))
    rolled = torch.roll(padded, shifts=(dy, dx), dims=(2, 3))
    return rolled[:, :, max_px : max_px + IMAGE_SIZE, max_px : max_px + IMAGE_SIZE]


def _accuracy(module: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    module.eval()
    with torch.no_grad():
        return float((module(images).argmax(dim=1) == labels).float().mean())


def train(
    out_weights: Path,
    data_dir: Path,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> dict:
    """Train DigitsCNN deterministically; write the weights and the calibration/validation npz files.

    Returns {"test_accuracy", "train_seconds", "epochs", "params", "n_calibration", "n_validation"}.
    """
    out_weights, data_dir = Path(out_weights), Path(data_dir)
    x_tr, y_tr, x_te, y_te = load_split()
    with _deterministic(seed):
        start = time.perf_counter()
        module = DigitsCNN()
        images, labels = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
        opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
        steps_per_epoch = -(-len(images) // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        for _ in range(epochs):
            module.train()
            order = torch.randperm(len(images))
            for i in range(0, len(images), batch_size):
                idx = order[i : i + batch_size]
                logits = module(_shift(images[idx]))
                # Mild label smoothing keeps logits moderate, which makes later int8 quantization easier.
                loss = F.cross_entropy(logits, labels[idx], label_smoothing=0.05)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        seconds = time.perf_counter() - start
        accuracy = _accuracy(module, torch.from_numpy(x_te), torch.from_numpy(y_te))

    calib = np.random.default_rng(seed).permutation(len(x_tr))[:N_CALIBRATION]
    _save_state(out_weights, module)
    _save_npz(data_dir / "calibration.npz", x_tr[calib], y_tr[calib])
    _save_npz(data_dir / "validation.npz", x_te, y_te)
    return {
        "test_accuracy": accuracy,
        "train_seconds": seconds,
        "epochs": epochs,
        "params": sum(p.numel() for p in module.parameters()),
        "n_calibration": len(calib),
        "n_validation": len(x_te),
    }


def build(
    weights: str = DEFAULT_WEIGHTS, *, validation: str | None = None
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """(DigitsCNN in eval mode with trained weights, (one real validation image [1,1,32,32],)).

    The example is the first test-split image: rebuilt from scikit-learn's bundled data by default, so
    the builder works from any directory, or read from a `validation` npz (the same image when that
    file was written by `train`). Relative paths are taken from the current working directory.
    """
    path = Path(weights)
    if not path.is_file():
        raise ModelError(
            f"digits weights not found: {path.resolve()}; run `make digits` "
            f"(python -m pipeline.models.digits --weights {weights}) to train them"
        )
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # a truncated or foreign file: any unpickling error means the same
        raise ModelError(f"cannot read digits weights {path}: {exc}; rerun `make digits`") from exc
    module = DigitsCNN()
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"{path} does not fit DigitsCNN ({first}); rerun `make digits`") from exc
    module.eval()
    if validation is not None:
        images, _ = load_npz(validation)
    else:
        try:
            _, _, images, _ = load_split()
        except ImportError as exc:
            raise ModelError(
                "scikit-learn is needed for the digits example input; install it with "
                "`pip install -e .[models]`, or pass validation=<path to validation.npz>"
            ) from exc
    return module, (torch.from_numpy(np.ascontiguousarray(images[:1])),)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pipeline.models.digits", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=Path(DEFAULT_WEIGHTS))
    parser.add_argument("--data", type=Path, default=Path(DEFAULT_DATA_DIR))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = train(args.weights, args.data, epochs=args.epochs, seed=args.seed)
    print(
        f"digits: float test accuracy {result['test_accuracy']:.2%} on {result['n_validation']} images, "
        f"{result['params']} params, trained {result['epochs']} epochs in {result['train_seconds']:.1f} s; "
        f"wrote {args.weights}, {args.data}/calibration.npz, {args.data}/validation.npz"
    )
    return result


if __name__ == "__main__":
    main()
