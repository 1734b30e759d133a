"""Placement prediction: which nodes of a model a target's NPU runs and which fall back to the CPU.

The rule, per node. Q/DQ, Constant and bfloat16 Cast nodes are not placed on their own: they go with
the compute they wrap (listed apart as `attached`, and not counted as CPU nodes).
1. the target's device is the CPU -> CPU;
2. a custom-domain op, an op outside the target's table for the format, or any op of a model with fewer
   Conv layers than the target's `min_conv_layers` -> CPU;
3. float model (no activation Q/DQ) or BF16: every op in the table -> NPU (as if this pipeline quantized it);
4. quantized model: an op whose float inputs all come from DequantizeLinear and whose float outputs all
   go to QuantizeLinear -> NPU. Data-movement ops (Reshape, Transpose, Concat...) between them are looked
   through; a MAC op's float weight is not allowed; other float constants (Resize scales, Clip bounds)
   are; an activation (Relu, Clip...) between a quantized op and its Q is fused with it. A data-movement
   op (or a node with no float output, i.e. shape arithmetic) that is not wrapped itself runs on the NPU
   when every neighbour (through Q/DQ) is on the NPU and it does not touch a graph input or output;
   any other op -> CPU.
Transitions: edges between an NPU node and a CPU node, with Q/DQ chains collapsed. This is a prediction
from the published operator table; the VitisAI EP's own report (`vitisai_ep_report.json`) is the truth.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.formats import Format
from ..core.graph import Graph, node_macs
from ..core.ops import DATA_MOVEMENT_OPS as _DATA_MOVEMENT
from ..core.ops import DQ_OPS, MAC_OPS, Q_OPS
from ..core.ops import FUSIBLE_ACTIVATIONS as _FUSIBLE
from .target import Target

__all__ = ["Placement", "PlacementResult", "predict_placement"]

@dataclass(frozen=True)
class Placement:
    node: str
    op_type: str
    device: str  # "NPU" or "CPU"
    reason: str
    macs: int | None = None  # Conv/ConvTranspose/MatMul/Gemm only; None when their shapes are unknown


@dataclass(frozen=True)
class PlacementResult:
    placement: list[Placement]  # counted nodes, graph order
    attached: list[Placement]  # Q/DQ, Constant, bf16 Cast nodes
    transitions: int
    conv_layers: int
    too_few_convs: bool  # fewer than the target's min_conv_layers: everything on the CPU


def predict_placement(g: Graph, target: Target, fmt: Format, *, quantized: bool) -> PlacementResult:
    """Where each node of `g` runs on `target` in format `fmt` (see the module docstring for the rule).

    `quantized`: the model carries activation Q/DQ, so an op needs them around it to run on the NPU;
    otherwise (float model, BF16) every op in the table is placed on the NPU.
    """
    n = len(g.nodes)
    counted = [i for i in range(n) if not g.attached(i)]
    preds, succs, boundary = _collapsed(g)
    convs = sum(node.op_type == "Conv" for node in g.nodes)
    too_few = convs < target.min_conv_layers
    wrap = quantized and Format(fmt).spec.quantized
    device: dict[int, str] = {}
    reason: dict[int, str] = {}
    pending: list[int] = []
    for i in counted:
        node = g.nodes[i]
        if target.device != "NPU":
            device[i], reason[i] = target.device, f"{target.name} runs every node on the {target.device}"
        elif node.domain not in ("", "ai.onnx"):
            device[i], reason[i] = "CPU", f"custom op domain '{node.domain}'"
        elif fmt not in target.op_table:
            device[i], reason[i] = "CPU", f"{target.name} does not run {fmt.value}"
        elif not target.runs(node.op_type, fmt):
            device[i], reason[i] = "CPU", f"{node.op_type} is not in {target.name}'s {fmt.value} operator table"
        elif too_few:
            device[i], reason[i] = "CPU", f"fewer than {target.min_conv_layers} Conv layers"
        elif not wrap:
            note = "" if quantized or not Format(fmt).spec.quantized else " (once quantized)"
            device[i], reason[i] = target.device, f"{node.op_type} in the {fmt.value} table{note}"
        else:
            why = _unquantized(g, i)
            if why is None:
                device[i], reason[i] = target.device, "quantized (DequantizeLinear in, QuantizeLinear out)"
            elif node.op_type in _DATA_MOVEMENT or not any(o and g.is_float(o) for o in node.output):
                device[i], reason[i] = target.device, "data movement between NPU nodes"
                pending.append(i)
            else:
                device[i], reason[i] = "CPU", why
    changed = True
    while changed:  # demote data-movement nodes next to the CPU until nothing changes
        changed = False
        for i in pending:
            if device[i] == "CPU":
                continue
            cpu = next((j for j in (*preds[i], *succs[i]) if device.get(j) == "CPU"), None)
            if cpu is not None or boundary[i]:
                device[i] = "CPU"
                reason[i] = (f"data movement next to CPU node '{g.names[cpu]}'" if cpu is not None
                             else "unquantized data movement at a graph input/output")
                changed = True
    placement = [
        Placement(g.names[i], g.nodes[i].op_type, device[i], reason[i], node_macs(g, g.nodes[i])) for i in counted
    ]
    attached = []
    for i in range(n):
        if i in device:
            continue
        node = g.nodes[i]
        sides = (preds[i], succs[i]) if node.op_type in Q_OPS or node.op_type == "Cast" else (succs[i], preds[i])
        side = next((s for s in sides if s), [])
        dev = "NPU" if any(device[j] == "NPU" for j in side) else "CPU"
        why = f"goes with {g.nodes[side[0]].op_type} '{g.names[side[0]]}'" if side else "no compute neighbour"
        attached.append(Placement(g.names[i], node.op_type, dev, why))
    edges = {(j, i) for i in counted for j in preds[i] if device[j] != device[i]}
    return PlacementResult(placement, attached, len(edges), convs, too_few)


def _collapsed(g: Graph):
    """Per node: counted producers and consumers with Q/DQ/Constant/Cast chains skipped, and whether it
    touches a graph input or output through such a chain."""
    n = len(g.nodes)
    preds: list[list[int]] = [[] for _ in range(n)]
    succs: list[list[int]] = [[] for _ in range(n)]
    boundary = [False] * n

    def data_inputs(i: int) -> list[str]:
        node = g.nodes[i]
        names = node.input[:1] if g.attached(i) else node.input
        return [x for x in names if x and x not in g.consts]

    for i in range(n):
        seen, stack = set(), list(data_inputs(i))
        while stack:
            name = stack.pop()
            j = g.producer.get(name)
            if j is None:
                boundary[i] |= name in g.input_names
            elif g.attached(j):
                if j not in seen:
                    seen.add(j)
                    stack.extend(data_inputs(j))
            elif j not in preds[i]:
                preds[i].append(j)
        seen, stack = set(), [o for o in g.nodes[i].output if o]
        while stack:
            name = stack.pop()
            boundary[i] |= name in g.output_names
            for j in g.consumers.get(name, []):
                if g.attached(j):
                    if j not in seen and name in data_inputs(j):
                        seen.add(j)
                        stack.extend(o for o in g.nodes[j].output if o)
                elif j not in succs[i]:
                    succs[i].append(j)
    for i in range(n):
        preds[i].sort()
        succs[i].sort()
    return preds, succs, boundary


def _unquantized(g: Graph, i: int) -> str | None:
    """Why node i is not wrapped by Q/DQ in a quantized model, or None if it is."""
    why = _inputs_unquantized(g, i)
    return why if why is not None else _outputs_unquantized(g, i)


def _inputs_unquantized(g: Graph, i: int) -> str | None:
    node = g.nodes[i]
    for k, name in enumerate(node.input):
        if not name or not g.is_float(name):
            continue
        if name in g.consts:
            if node.op_type in MAC_OPS and k == 1:
                return f"weight '{name}' is float (not dequantized)"
            continue  # float constants (Resize scales, Clip bounds, bias: see bias-int32) are fine
        why = _source_unquantized(g, name)
        j = g.producer.get(name)
        if why is None or (node.op_type in _FUSIBLE and k == 0 and j is not None and not g.attached(j)
                           and _inputs_unquantized(g, j) is None):
            continue  # dequantized, or an activation fused with the quantized op before it (Conv+Relu)
        return why
    return None


def _source_unquantized(g: Graph, name: str) -> str | None:
    """None if float tensor `name` comes from a DequantizeLinear, possibly through data-movement ops."""
    j = g.producer.get(name)
    if j is None:
        return f"input '{name}' is a float graph input, not quantized"
    producer = g.nodes[j]
    if producer.op_type in DQ_OPS and g.attached(j):
        return None
    if producer.op_type in _DATA_MOVEMENT and not g.attached(j):
        data = [x for x in producer.input if x and x not in g.consts and g.is_float(x)]
        if data and all(_source_unquantized(g, x) is None for x in data):
            return None
    return f"input '{name}' comes from {producer.op_type} '{g.names[j]}', not a DequantizeLinear"


def _outputs_unquantized(g: Graph, i: int) -> str | None:
    for name in g.nodes[i].output:
        if name and g.is_float(name):
            why = _sink_unquantized(g, name)
            if why is not None:
                return why
    return None


def _sink_unquantized(g: Graph, name: str) -> str | None:
    """None if every reader of float tensor `name` is a QuantizeLinear, possibly through data-movement ops
    or a fused activation."""
    if name in g.output_names:
        return f"output '{name}' is a float graph output, not quantized"
    for c in g.consumers.get(name, []):
        consumer = g.nodes[c]
        if consumer.op_type in Q_OPS and g.attached(c):
            continue
        if consumer.op_type in _FUSIBLE and consumer.input[0] == name and _outputs_unquantized(g, c) is None:
            continue  # fused activation, then Q
        if consumer.op_type in _DATA_MOVEMENT and _outputs_unquantized(g, c) is None:
            continue
        return f"output '{name}' feeds {consumer.op_type} '{g.names[c]}', not a QuantizeLinear"
    return None
