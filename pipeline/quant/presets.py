"""Defaults per model family, so a recipe that names no accuracy techniques still gets the right ones.

`choose_preset(name, model)`: "auto" reads the family off the prepared graph (`model_family`), "cnn" and
"none" are taken as given. The quantize stage applies a preset only where the recipe is silent: its
transforms when `quantization.transforms` (and the legacy keys) name none, its activation range method
when `calibration.method` is not set, its weight range method when `quantization.weight_method` is not.

- `cnn` (a graph with Conv layers and no attention): for 8-bit activations residual-stream equalization
  (one scale per channel through each chain of residual Adds), cross-layer equalization (ReLU6 kept,
  bounded by the calibration statistics), bias absorption (ReLU6 outputs read by 1x1 convolutions centred
  on 0 for the symmetric int8 grid; with 8-bit activations those a padded depthwise conv reads too,
  through an explicit Pad), for power-of-two formats (XINT8) power-of-two alignment of the activations,
  AdaRound with bias correction after Q/DQ insertion (with 8-bit activations, XINT8 and A8W8, on the
  quantized model's inputs, layer by layer), activation ranges by squared error for 8-bit activations and
  by percentile for 16-bit ones and for the graph outputs (squared error clips for a tensor's bulk; at an
  output that cuts the answer: the top logit, or a channel saturated whole), MSE weight ranges.
  Per-tensor int8 MobileNetV2 needs all of them (see the README's figures).
- `transformer` (a graph with attention): MSE weight ranges only (MiniLM A8W8: mean nearest-neighbour
  agreement over validation and three held-out sets 93.0% -> 94.4%, every set better or equal).
  SmoothQuant's alpha, the outlier split and the fallback stay model-specific choices (the MiniLM recipes).
- `none`: nothing added.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

__all__ = ["Preset", "PRESETS", "model_family", "choose_preset", "preset_steps"]


@dataclass(frozen=True)
class Preset:
    name: str
    transforms: tuple[tuple[str, dict], ...] = ()
    activation_method: str | None = None
    # The range method of 8-bit activations when it differs from `activation_method`.
    activation_method_8bit: str | None = None
    weight_method: str | None = None

    def activation_method_for(self, bits: int) -> str | None:
        """The activation range method for activations of `bits` bits."""
        return self.activation_method_8bit if bits == 8 and self.activation_method_8bit else self.activation_method


PRESETS = {
    "cnn": Preset(
        "cnn",
        # Bias absorption keeps the float model exact ("float"): AdaRound after it takes that model as its
        # target and its bias correction removes the constant (W_q - W) c the shift leaves.
        transforms=(("residual_equalization", {}), ("cross_layer_equalization", {}),
                    ("bias_absorption", {"consumer_bias": "float"}), ("adaround", {})),
        activation_method="percentile",
        # 256 steps: where each activation's range is clipped matters, and the squared-error optimum of its
        # histogram clips a heavy-tailed tensor (a residual stream) more than a fixed percentile and a
        # bounded one (a centred ReLU6) less. MobileNetV2 A8W8 19.5 -> 20.2 dB, XINT8 18.1 -> 18.4 dB
        # (percentile 99.999); 16-bit activations keep the percentile (A16W8: nothing to clip for).
        activation_method_8bit="mse",
        weight_method="mse",
    ),
    "transformer": Preset("transformer", weight_method="mse"),
    "none": Preset("none"),
}


def model_family(model: onnx.ModelProto) -> str:
    """"cnn" for a graph whose convolutions (Conv/ConvTranspose) do most of its multiply-accumulates,
    "transformer" for one with attention (a MatMul of two computed tensors) where they do not, else
    "other". A convolutional backbone under a small attention neck (PP-OCR's SVTR recognizers: 2% of the
    MACs in attention and its projections) is a CNN: its accuracy lives in the backbone, and without the
    CNN preset the backbone's per-tensor int8 error reads no text at all."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    attention = any(n.op_type == "MatMul" and not (set(n.input[:2]) & consts) for n in model.graph.node)
    convolutional = any(n.op_type in ("Conv", "ConvTranspose") for n in model.graph.node)
    if convolutional and attention:
        return "cnn" if _conv_mac_share(model) > 0.5 else "transformer"
    if attention:
        return "transformer"
    return "cnn" if convolutional else "other"


def _conv_mac_share(model: onnx.ModelProto) -> float:
    """Share of the MACs (static shapes; 0 when none are known) in Conv/ConvTranspose nodes."""
    from ..core.graph import Graph, infer_shapes, node_macs

    graph = Graph(model)
    infer_shapes(graph, model)
    conv = total = 0
    for node in model.graph.node:
        macs = node_macs(graph, node) or 0
        total += macs
        conv += macs if node.op_type in ("Conv", "ConvTranspose") else 0
    return conv / total if total else 0.0


def choose_preset(name: str, model: onnx.ModelProto, *, family: str | None = None) -> Preset:
    """The preset `name` stands for on `model` ("auto": by `model_family`, or `family` when the caller
    has it: counting MACs runs shape inference)."""
    if name == "auto":
        return PRESETS.get(family or model_family(model), PRESETS["none"])
    return PRESETS[name]


def preset_steps(preset: Preset, *, power_of_two: bool, method: str, percentile: float,
                 activation_bits: int | None = None) -> list[tuple[str, dict]]:
    """The preset's transforms for one format: with power-of-two scales, the activations are aligned to
    the grid (with the range method the quantizer will use) after the float-graph transforms that move
    activations (equalization, bias absorption), so it sees the tensors the quantizer will. With 8-bit
    activations AdaRound runs on the quantized model's inputs, layer by layer (below)."""
    eight_bit = power_of_two or activation_bits == 8
    steps = [(name, dict(cfg)) for name, cfg in preset.transforms]
    if not eight_bit:
        # The stream's equalization trades the readers' weight resolution for the int8 activations they
        # read; with 16-bit activations there is nothing to buy (MobileNetV2 A16W8: 26.3 -> 25.4 dB with
        # it, 25.1 dB levelling the weights alone).
        steps = [(name, cfg) for name, cfg in steps if name != "residual_equalization"]
    if power_of_two and any(name == "cross_layer_equalization" for name, _ in steps):
        moving = ("residual_equalization", "cross_layer_equalization", "bias_absorption")
        at = max(i for i, (name, _) in enumerate(steps) if name in moving) + 1
        steps.insert(at, ("pow2_alignment", {"method": method, "percentile": percentile}))
    if eight_bit:
        # 8-bit activations (power-of-two scales all the more: every range rounds up to the next power of
        # two) leave an error each layer passes on; AdaRound on the quantized model's inputs, layer by
        # layer, absorbs much of it into the rounding and the bias correction. MobileNetV2 on an AVX-only
        # x86: XINT8 15.6 -> 16.1 dB (32 -> 64 samples), A8W8 16.7 -> 17.8 dB; 16-bit activations pass on
        # little, so A16W8 keeps the float inputs. It costs about what AdaRound on float inputs does
        # since each layer runs from the previous layer's kept activations (`adaround.frontier`).
        steps = [(name, {**cfg, **_SEQUENTIAL}) if name == "adaround" else (name, cfg) for name, cfg in steps]
        # An 8-bit ReLU6 output that a padded (depthwise) conv reads is centred too, its padding made an
        # explicit Pad of the shifted zero: MobileNetV2 A8W8 18.2 -> 18.5 dB (16-bit activations have the
        # bit to spare and keep the op count).
        steps = [(name, {**cfg, **_PADDED}) if name == "bias_absorption" else (name, cfg) for name, cfg in steps]
    return steps


_SEQUENTIAL = {"quantized_inputs": True}
_PADDED = {"padded": "pad"}
