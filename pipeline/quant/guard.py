"""The range guard: find tensors that mix ranges before they are quantized, and keep them at a precision
that holds.

One scale per tensor cannot serve values of very different magnitudes: a YOLO head that concatenates box
coordinates (0..320) and class scores (0..1) gets an int8 step of 2.5, every score rounds to 0, the model
detects nothing, and the output SQNR still reads 26 dB (the boxes dominate it). Found from statistics
alone, before quantization:

- a Concat whose inputs' ranges (calibration histograms: max(hi, 0) - min(lo, 0)) differ by `ratio` or
  more: its inputs keep their own int8 scales (they are separate tensors), and the Concat output, where
  they would share one, is kept at a precision that holds;
- a graph output whose channel groups differ in range by `ratio` or more (per-channel max |x| over the
  first `samples` calibration samples, one extra pass over those only, on the axes a channel can be on:
  1 for rank >= 4, every non-batch axis for rank 3, the last for rank 2). Inside the network the next
  layer mixes channels again (per-tensor activation error there is the transforms' business); at an
  output, a group of small channels is the answer itself.

The precision that holds: 16-bit activations when the target runs them (A16W8) and the small group keeps
at least `min_bits` bits of a 16-bit grid; otherwise float (the node runs on the CPU, in the placement).
Threshold and bits are for int8 activations; a 16-bit format flags only what even 16 bits lose.

`GuardResult` lists the findings, the nodes kept float and the tensors promoted: quantize adds them to
the configuration it runs (reported in the quantize info and the report), and the accuracy-aware fallback
ranks these tensors first when the guard is off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import onnx
from pydantic import Field

from ..core.formats import Format
from ..core.ops import PERMUTING_OPS
from ..core.schema import StrictModel
from .histogram import StatsCollector
from .statistics import StatisticsService

__all__ = ["GuardConfig", "MixedRange", "GuardResult", "find_mixed_ranges"]


class GuardConfig(StrictModel):
    """`quantization.range_guard` in a recipe."""

    enabled: bool = True
    ratio: float = Field(default=100.0, gt=1.0)  # ranges this many times apart mix (int8 activations)
    min_bits: float = Field(default=6.0, ge=1.0, le=15.0)  # bits the small group keeps at 16 bits, or float
    samples: int = Field(default=32, ge=1)  # calibration samples for the outputs' per-channel ranges


@dataclass(frozen=True)
class MixedRange:
    tensor: str
    node: str  # the node that computes its values (through reshapes and transposes)
    op_type: str
    kind: str  # "concat" (inputs of different ranges) or "channels" (channel groups of different ranges)
    big: float  # the largest range, and the smallest one it is mixed with
    small: float
    groups: str  # which inputs / channels are small
    action: str  # "float" or "16-bit"
    # The value: the computed tensor and its reshapes/transposes (each has its own Q/DQ, one set of numbers),
    # and the layout nodes between them; all of them get the action.
    tensors: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()

    @property
    def ratio(self) -> float:
        return self.big / self.small

    def to_json(self) -> dict:
        return {"tensor": self.tensor, "node": self.node, "op_type": self.op_type, "kind": self.kind,
                "value": list(self.tensors),
                "range_big": round(self.big, 6), "range_small": round(self.small, 9),
                "ratio": round(self.ratio, 1), "small": self.groups, "action": self.action}


@dataclass
class GuardResult:
    findings: list[MixedRange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def float_nodes(self) -> frozenset[str]:
        return frozenset(n for f in self.findings if f.action == "float" for n in f.nodes)

    @property
    def promote(self) -> frozenset[str]:
        return frozenset(t for f in self.findings if f.action == "16-bit" for t in f.tensors)

    @property
    def tensors(self) -> frozenset[str]:
        """Every tensor found mixing ranges, with its reshapes (what the fallback ranks first)."""
        return frozenset(t for f in self.findings for t in f.tensors)

    def to_json(self) -> dict:
        return {"findings": [f.to_json() for f in self.findings], "float_nodes": sorted(self.float_nodes),
                "promoted_to_16_bits": sorted(self.promote), "notes": self.notes}


def _value(model: onnx.ModelProto, tensor: str) -> tuple[str, list[str], list[str]]:
    """(source tensor, tensors, nodes) of the value `tensor` belongs to: back through layout ops to the
    tensor a computing node writes, then forward through layout ops to every rearrangement of it."""
    writers = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input[:1]:
            readers.setdefault(i, []).append(n)
    source = tensor
    while source in writers and writers[source].op_type in PERMUTING_OPS and writers[source].input:
        source = writers[source].input[0]
    tensors, nodes, todo = [source], [writers[source].name] if source in writers else [], [source]
    while todo:
        for n in readers.get(todo.pop(), []):
            if n.op_type in PERMUTING_OPS and n.output[0] not in tensors:
                tensors.append(n.output[0])
                nodes.append(n.name)
                todo.append(n.output[0])
    return source, tensors, nodes


def _finding(model: onnx.ModelProto, tensor: str, kind: str, big: float, small: float, groups: str,
             action: str) -> MixedRange:
    source, tensors, nodes = _value(model, tensor)
    writer = next((n for n in model.graph.node if source in n.output), None)
    return MixedRange(tensor, writer.name if writer else source, writer.op_type if writer else "input", kind, big,
                      small, groups, action, tuple(tensors), tuple(nodes))


def _span(stats) -> float:
    """The range a quantization grid must cover: zero and every value seen."""
    return max(stats.max, 0.0) - min(stats.min, 0.0)


def _action(ratio: float, config: GuardConfig, sixteen: bool) -> str:
    return "16-bit" if sixteen and 16 - math.log2(ratio) >= config.min_bits else "float"


def _flag_ratio(config: GuardConfig, fmt: Format) -> float:
    """Ranges this far apart lose the small ones at the format's activation width."""
    return config.ratio * 2.0 ** (fmt.spec.activation_bits - 8)


def _concats(model: onnx.ModelProto, histograms: StatsCollector, config: GuardConfig, fmt: Format,
             sixteen: bool) -> list[MixedRange]:
    found = []
    for node in model.graph.node:
        if node.op_type != "Concat" or node.output[0] not in histograms:
            continue
        spans = [(i, _span(histograms[name])) for i, name in enumerate(node.input) if name in histograms]
        spans = [(i, s) for i, s in spans if s > 0]
        if len(spans) < 2:
            continue
        big = max(s for _, s in spans)
        small = [(i, s) for i, s in spans if s * _flag_ratio(config, fmt) <= big]
        if small:
            low = min(s for _, s in small)
            groups = "inputs " + ", ".join(f"{i} ({node.input[i]}: {s:.3g})" for i, s in small)
            found.append(_finding(model, node.output[0], "concat", big, low, groups,
                                  _action(big / low, config, sixteen)))
    return found


def _output_axes(shape: list[int]) -> list[int]:
    rank = len(shape)
    if rank >= 4:
        return [1]
    if rank == 3:
        return [1, 2]
    return [rank - 1] if rank == 2 else []


def _small_runs(absmax, threshold: float) -> str:
    small = [i for i, a in enumerate(absmax) if 1e-6 * absmax.max() < a <= threshold]
    runs: list[list[int]] = []
    for c in small:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:8]) + (" ..." if len(runs) > 8 else "")


def _output_channels(model: onnx.ModelProto, histograms: StatsCollector, config: GuardConfig, fmt: Format,
                     sixteen: bool, batches: Callable[[int], Iterable[dict]], skip: set[str]) -> list[MixedRange]:
    """Graph outputs whose channel groups differ in range: at most two passes over `config.samples`
    calibration samples (the service keys channel requests by tensor: a rank-3 output's second axis
    needs the second pass)."""
    from .statistics import activation_tensors

    shapes = activation_tensors(model)
    writers = {o: n for n in model.graph.node for o in n.output}
    candidates = [o.name for o in model.graph.output
                  if not {o.name} & skip and o.name in writers and o.name in histograms and o.name in shapes]
    found: list[MixedRange] = []
    for slot in (0, 1):
        requests = {}
        for name in candidates:
            axes = [a for a in _output_axes(shapes[name]) if shapes[name][a] > 1]
            if slot < len(axes) and name not in {f.tensor for f in found}:
                requests[name] = (len(shapes[name]), axes[slot])
        if not requests:
            continue
        # Unoptimized: a transformed graph (SmoothQuant) meets onnxruntime 1.32's MatMulAddFusion bug, and
        # these passes see `samples` samples only.
        service = StatisticsService(model, optimize=False)
        service.request_channels(requests)
        channels = service.collect(batches(config.samples), limit=config.samples).channels
        for name, (_, axis) in requests.items():
            absmax = channels[name].absmax.reshape(-1)
            live = absmax[absmax > 1e-6 * absmax.max()]  # below: float noise, not a channel that varies
            if live.size < 2:
                continue
            big, low = float(live.max()), float(live.min())
            if big < _flag_ratio(config, fmt) * low:
                continue
            groups = f"axis {axis}, channels {_small_runs(absmax, big / _flag_ratio(config, fmt))}"
            found.append(_finding(model, name, "channels", big, low, groups, _action(big / low, config, sixteen)))
    return found


def find_mixed_ranges(model: onnx.ModelProto, histograms: StatsCollector, config: GuardConfig, *, target,
                      fmt: Format, batches: Callable[[int], Iterable[dict]]) -> GuardResult:
    """The guard over the float graph about to be quantized (see the module docstring). `batches(limit)`
    opens the calibration data."""
    result = GuardResult()
    if not config.enabled:
        result.notes.append("range guard off (quantization.range_guard.enabled: false)")
        return result
    # 16 bits where the target runs them beside int8 (A8W8 on XDNA2); XINT8 requantizes by power-of-two
    # shifts and 16-bit Q/DQ in it are undocumented: float there.
    sixteen = fmt.spec.activation_bits == 8 and not fmt.spec.power_of_two and Format.A16W8 in target.formats
    result.findings = _concats(model, histograms, config, fmt, sixteen)
    done = {t for f in result.findings for t in f.tensors}
    result.findings += _output_channels(model, histograms, config, fmt, sixteen, batches, done)
    if result.findings and not sixteen:
        result.notes.append(f"{fmt.value} on {target.name}: no 16-bit activations beside these int8 ones "
                            "(only A8W8-like formats on a target that runs A16W8), so mixed tensors stay float (CPU)")
    return result
