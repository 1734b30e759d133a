"""A QDQ model as a differentiable torch function, for fine-tuning its integer weights and biases.

Every node is evaluated as onnxruntime's emulation evaluates it (`pipeline.core.emulation`): a
QuantizeLinear -> DequantizeLinear pair on an activation is fake quantization (divide by the scale, round
half to even, add the zero point, saturate, subtract it, multiply back), with the straight-through
estimator for the rounding, so the gradient sees the quantized model the NPU runs. The learnable values are
the constant integers behind the weight and bias DequantizeLinears of Conv, Gemm and MatMul, held as floats
in units of their own grid step (so one learning rate suits every layer, whatever its scale) and rounded
and clamped to the integer range in the forward pass (again straight through). Scales, zero points and the
graph are untouched: `write_back` returns the model with new integer values only, so every NPU rule it met
(power-of-two scales, zero points, bit widths) it still meets.

The supported operators are those of the CNNs and heads the pipeline quantizes (convolutions, pooling,
elementwise arithmetic and activations, shape ops with constant shapes); a model with another operator
raises `Unsupported` naming it, and the caller leaves the model as it was. Shapes are the model's own
(static, batch 1): samples are run one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from ...core.ops import node_attr

__all__ = ["Unsupported", "QDQTorchGraph"]

_MAC_OPS = ("Conv", "Gemm", "MatMul")


class Unsupported(Exception):
    """The model has something the torch evaluation does not reproduce (the message names it)."""



def _ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward (onnxruntime's QuantizeLinear), identity backward."""
    return x + (torch.round(x) - x).detach()


def _axis_shape(values: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """A per-axis scale or zero point reshaped to broadcast along `axis` of a rank-`rank` tensor."""
    if values.size == 1:
        return values.reshape(())
    shape = [1] * rank
    shape[axis % rank] = -1
    return values.reshape(shape)


class _Learned:
    """One learnable integer tensor: the DequantizeLinear that reads it, its grid and its integer range."""

    def __init__(self, node: onnx.NodeProto, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, unit: float) -> None:
        self.node = node
        self.dtype = q.dtype
        self.unit = unit  # the parameter counts steps of `unit` grid steps (bias: 128, so one rate suits both)
        info = np.iinfo(q.dtype)
        # Weights the quantizer kept off the most negative value (symmetric, narrow range) stay off it.
        narrow = info.min < 0 and q.dtype != np.int32 and q.min() > info.min
        self.low, self.high = (info.min + 1 if narrow else info.min), info.max
        axis = node_attr(node, "axis", 1)
        self.scale = torch.tensor(_axis_shape(scale.astype(np.float32), axis, q.ndim))
        self.zero = torch.tensor(_axis_shape(zero.astype(np.float32), axis, q.ndim))
        self.param = torch.nn.Parameter(torch.tensor(q.astype(np.float32) / unit))

    def value(self) -> torch.Tensor:
        q = torch.clamp(_ste_round(self.param * self.unit), self.low, self.high)
        return (q - self.zero) * self.scale

    def integers(self) -> np.ndarray:
        with torch.no_grad():
            q = torch.clamp(torch.round(self.param * self.unit), self.low, self.high)
        return q.numpy().astype(self.dtype)


class QDQTorchGraph:
    """`QDQTorchGraph(qmodel)(feeds)` -> the model's outputs as torch tensors (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.model = model
        self.constants: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.nodes = list(graph.node)
        self.outputs = [o.name for o in graph.output]
        for node in self.nodes:
            qdq = node.op_type in ("QuantizeLinear", "DequantizeLinear")
            if node.domain not in ("", "ai.onnx") and not (qdq and node.domain == "com.microsoft"):
                raise Unsupported(f"node {node.name or node.output[0]!r}: {node.domain}.{node.op_type}")
            if node.op_type == "Constant":
                self.constants[node.output[0]] = numpy_helper.to_array(node_attr(node, "value"))
            elif node.op_type not in _EVALUATORS and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                raise Unsupported(f"node {node.name or node.output[0]!r}: operator {node.op_type}")
        self.learned: dict[str, _Learned] = {}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        for node in self.nodes:
            if node.op_type != "DequantizeLinear" or not all(n in self.constants for n in node.input if n):
                continue
            users = readers.get(node.output[0], [])
            slots = {(u.op_type, list(u.input).index(node.output[0])) for u in users}
            q = self.constants[node.input[0]]
            if q.dtype.kind not in "iu" or not users or len(slots) != 1:
                continue
            op, slot = slots.pop()
            if op in _MAC_OPS and slot == 1 and q.dtype != np.int32:
                unit = 1.0
            elif op in ("Conv", "Gemm") and slot == 2 and q.dtype == np.int32:
                unit = 128.0
            else:
                continue
            scale = self.constants[node.input[1]]
            zero = self.constants[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), q.dtype)
            self.learned[node.output[0]] = _Learned(node, q, scale, zero, unit)
        # Built once, not per forward pass: each activation Q/DQ pair's grid (checked here), the float
        # constants as tensors, and the constant DequantizeLinears that are not learned, dequantized.
        self.grids: dict[str, _Grid] = {}
        for node in self.nodes:
            if node.op_type == "QuantizeLinear":
                self.grids[node.output[0]] = _Grid(node, self.constants)
            elif node.op_type == "DequantizeLinear" and node.input[0] in self.grids:
                self.grids[node.input[0]].check_reader(node, self.constants)
        self.fixed: dict[str, torch.Tensor] = {
            name: torch.from_numpy(value.copy()) for name, value in self.constants.items() if value.dtype.kind == "f"}
        for node in self.nodes:
            if (node.op_type == "DequantizeLinear" and node.output[0] not in self.learned
                    and all(n in self.constants for n in node.input if n)):
                self.fixed[node.output[0]] = torch.from_numpy(_dequantize(node, self.constants))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [learned.param for learned in self.learned.values()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[torch.Tensor]:
        env: dict[str, object] = {name: torch.from_numpy(np.asarray(value)) for name, value in feeds.items()}

        def get(name: str):
            for source in (env, self.fixed, self.constants):  # non-float constants (shapes) stay numpy
                if name in source:
                    return source[name]
            raise Unsupported(f"value {name!r} has no producer")

        for node in self.nodes:
            out = node.output[0]
            if out in self.learned:
                env[out] = self.learned[out].value()
            elif out in self.fixed or node.op_type == "Constant":
                continue
            elif node.op_type == "QuantizeLinear":
                env[out] = _Quantized(self.grids[out], get(node.input[0]))
            elif node.op_type == "DequantizeLinear":
                source = get(node.input[0])
                if not isinstance(source, _Quantized):
                    raise Unsupported(f"DequantizeLinear {node.name!r} reads an integer input of the model")
                env[out] = source.grid.fake(source.value)
            else:
                args = [get(n) if n else None for n in node.input]
                if any(isinstance(a, _Quantized) for a in args):
                    raise Unsupported(f"node {node.name!r} reads a quantized integer tensor directly")
                env[out] = _EVALUATORS[node.op_type](node, args)
        results = []
        for name in self.outputs:
            value = env[name]
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise Unsupported(f"output {name!r} is not a float tensor")
            results.append(value)
        return results

    def write_back(self) -> onnx.ModelProto:
        """A copy of the model with the learned integers in place of the old ones."""
        model = onnx.ModelProto.FromString(self.model.SerializeToString())
        by_name = {t.name: t for t in model.graph.initializer}
        for learned in self.learned.values():
            name = learned.node.input[0]
            by_name[name].CopyFrom(numpy_helper.from_array(learned.integers(), name))
        return model


def _dequantize(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> np.ndarray:
    q = constants[node.input[0]]
    axis = node_attr(node, "axis", 1)
    scale = _axis_shape(constants[node.input[1]].astype(np.float32), axis, q.ndim)
    zero = constants[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), q.dtype)
    zero = _axis_shape(zero.astype(np.int64), axis, q.ndim)
    return ((q.astype(np.int64) - zero).astype(np.float32) * scale).astype(np.float32)


class _Grid:
    """An activation's QuantizeLinear grid (scale, zero point, integer range), checked once: constants,
    no attribute but `axis`, an integer type, and every DequantizeLinear reading it on the same grid."""

    def __init__(self, node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> None:
        if len(node.input) < 3 or not node.input[2] or node.input[1] not in constants or node.input[2] not in constants:
            raise Unsupported(f"QuantizeLinear {node.name!r}: scale and zero point must be constants")
        if any(a.name not in ("axis",) for a in node.attribute):
            raise Unsupported(f"QuantizeLinear {node.name!r}: attribute {node.attribute[0].name}")
        self.node = node
        zero = constants[node.input[2]]
        if zero.dtype.kind not in "iu":
            raise Unsupported(f"QuantizeLinear {node.name!r}: {zero.dtype} output")
        self.axis = node_attr(node, "axis", 1)
        self.scale_values = constants[node.input[1]].astype(np.float32)
        self.zero_values = zero.astype(np.float32)
        self.scale, self.zero = torch.tensor(self.scale_values), torch.tensor(self.zero_values)
        info = np.iinfo(zero.dtype)
        self.low, self.high = float(info.min), float(info.max)

    def check_reader(self, dq: onnx.NodeProto, constants: dict[str, np.ndarray]) -> None:
        same = (dq.input[1] == self.node.input[1] or np.array_equal(constants.get(dq.input[1]), constants[self.node.input[1]]))
        zero_same = (len(dq.input) > 2 and (dq.input[2] == self.node.input[2]
                                            or np.array_equal(constants.get(dq.input[2]), constants[self.node.input[2]])))
        if not (same and zero_same):
            raise Unsupported(f"DequantizeLinear {dq.name!r} does not use its QuantizeLinear's scale and zero point")

    def fake(self, value: torch.Tensor) -> torch.Tensor:
        """Quantize and dequantize `value` on this grid (straight-through rounding)."""
        scale, zero = self.scale, self.zero
        if self.scale_values.size > 1:  # per axis: broadcast along `axis` of this value
            scale = torch.from_numpy(_axis_shape(self.scale_values, self.axis, value.dim()))
            zero = torch.from_numpy(_axis_shape(self.zero_values, self.axis, value.dim()))
        q = torch.clamp(_ste_round(value / scale) + zero, self.low, self.high)
        return (q - zero) * scale


@dataclass
class _Quantized:
    """A QuantizeLinear's output, kept as its float input until the DequantizeLinear that reads it."""

    grid: _Grid
    value: torch.Tensor


def _ints(value) -> list[int]:
    return [int(v) for v in np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value).ravel()]


def _spatial_pads(node: onnx.NodeProto, dims: int) -> list[int]:
    if node_attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise Unsupported(f"{node.op_type} {node.name!r}: auto_pad")
    pads = node_attr(node, "pads", [0] * 2 * dims)
    padding = []
    for d in reversed(range(dims)):  # F.pad wants the last dimension first
        padding += [pads[d], pads[d + dims]]
    return padding


def _conv(node, args):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    dims = w.dim() - 2
    if dims not in (1, 2):
        raise Unsupported(f"Conv {node.name!r}: {dims}-d")
    x = F.pad(x, _spatial_pads(node, dims))
    conv = F.conv1d if dims == 1 else F.conv2d
    return conv(x, w, bias, stride=node_attr(node, "strides", [1] * dims), dilation=node_attr(node, "dilations", [1] * dims),
                groups=node_attr(node, "group", 1))


def _gemm(node, args):
    a, b = args[0], args[1]
    if node_attr(node, "transA", 0):
        a = a.t()
    if node_attr(node, "transB", 0):
        b = b.t()
    y = node_attr(node, "alpha", 1.0) * (a @ b)
    if len(args) > 2 and args[2] is not None:
        y = y + node_attr(node, "beta", 1.0) * args[2]
    return y


def _clip(node, args):
    low = float(args[1]) if len(args) > 1 and args[1] is not None else node_attr(node, "min")
    high = float(args[2]) if len(args) > 2 and args[2] is not None else node_attr(node, "max")
    return torch.clamp(args[0], low, high)


def _pool(node, args, kind):
    x = args[0]
    kernel = node_attr(node, "kernel_shape")
    if len(kernel) != 2 or node_attr(node, "dilations", [1, 1]) != [1, 1]:
        raise Unsupported(f"{node.op_type} {node.name!r}: only 2-d pooling without dilation")
    strides = node_attr(node, "strides", [1, 1])
    ceil = bool(node_attr(node, "ceil_mode", 0))
    pads = _spatial_pads(node, 2)
    if kind == "max":
        return F.max_pool2d(F.pad(x, pads, value=float("-inf")), kernel, strides, ceil_mode=ceil)
    if any(pads) and not node_attr(node, "count_include_pad", 0):
        raise Unsupported(f"AveragePool {node.name!r}: padding excluded from the count")
    return F.avg_pool2d(F.pad(x, pads), kernel, strides, ceil_mode=ceil)


def _reshape(node, args):
    x, shape = args[0], _ints(args[1])
    shape = [x.shape[i] if s == 0 and not node_attr(node, "allowzero", 0) else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _squeeze_axes(node, args):
    return _ints(args[1]) if len(args) > 1 and args[1] is not None else node_attr(node, "axes")


def _unsqueeze(node, args):
    x = args[0]
    for axis in sorted(a % (x.dim() + len(_squeeze_axes(node, args))) for a in _squeeze_axes(node, args)):
        x = x.unsqueeze(axis)
    return x


def _squeeze(node, args):
    axes = _squeeze_axes(node, args)
    x = args[0]
    if axes is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def _softmax(node, args):
    return torch.softmax(args[0], dim=node_attr(node, "axis", -1))


def _hard_sigmoid(node, args):
    return torch.clamp(node_attr(node, "alpha", 0.2) * args[0] + node_attr(node, "beta", 0.5), 0.0, 1.0)


_EVALUATORS = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda node, a: torch.matmul(a[0], a[1]),
    "Add": lambda node, a: a[0] + a[1],
    "Sub": lambda node, a: a[0] - a[1],
    "Mul": lambda node, a: a[0] * a[1],
    "Div": lambda node, a: a[0] / a[1],
    "Clip": _clip,
    "Relu": lambda node, a: F.relu(a[0]),
    "LeakyRelu": lambda node, a: F.leaky_relu(a[0], node_attr(node, "alpha", 0.01)),
    "Sigmoid": lambda node, a: torch.sigmoid(a[0]),
    "Tanh": lambda node, a: torch.tanh(a[0]),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": lambda node, a: a[0] * torch.clamp(a[0] / 6 + 0.5, 0.0, 1.0),
    "GlobalAveragePool": lambda node, a: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "AveragePool": lambda node, a: _pool(node, a, "average"),
    "MaxPool": lambda node, a: _pool(node, a, "max"),
    "Flatten": lambda node, a: a[0].reshape(int(np.prod(a[0].shape[:node_attr(node, "axis", 1) % a[0].dim()])), -1),
    "Reshape": _reshape,
    "Transpose": lambda node, a: a[0].permute(*(node_attr(node, "perm") or reversed(range(a[0].dim())))),
    "Concat": lambda node, a: torch.cat(a, dim=node_attr(node, "axis")),
    "Softmax": _softmax,
    "Identity": lambda node, a: a[0],
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
}
