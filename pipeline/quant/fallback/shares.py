"""Units and shares of the fallback: values (a tensor with its reshapes), and where each config's MACs and
nodes run, from the placement of the all-int8 model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ...core.ops import LAYOUT_OPS
from .search import FallbackConfig, Shares

__all__ = ["value_groups", "compute_shares"]


def value_groups(model, tensors: Iterable[str]) -> list[list[str]]:
    """Quantized tensors grouped with their reshapes/transposes (one value, several layouts)."""
    names = list(tensors)
    parent = {t: t for t in names}

    def find(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for node in model.graph.node:
        if node.op_type in LAYOUT_OPS and node.input and node.input[0] in parent and node.output[0] in parent:
            parent[find(node.output[0])] = find(node.input[0])
    groups: dict[str, list[str]] = {}
    for t in names:
        groups.setdefault(find(t), []).append(t)
    return list(groups.values())


def compute_shares(placement, config: FallbackConfig, base_kinds: Mapping[str, str]) -> Shares:
    """Shares of a config from the base model's placement (`Inspection.placement` of the int8 model) and
    the kind of each MAC node in the base QDQ model (`pipeline.quant.mac_share`: "int8", "16", "float").

    int8 means int8 x int8 as an audit of the QDQ model counts it: activation and weight from 8-bit DQs.
    A node predicted on the CPU in the int8 model stays there; `config.cpu` nodes join it; BF16 nodes run on
    the NPU in float; `config.wide` nodes read 16-bit activations (A16W8). Promoted values (`config.promote`)
    change no MAC's kind: their MAC readers get int8 copies (`pipeline.quant.requant`).
    """
    macs = dict(int8=0, a16=0, bf16=0, cpu=0)
    nodes_cpu = 0
    for p in placement:
        cpu = p.device == "CPU" or p.node in config.cpu
        nodes_cpu += cpu
        if not p.macs:
            continue
        base = base_kinds.get(p.node, "float")
        if cpu:
            kind = "cpu"
        elif p.node in config.bf16 or base == "float":
            kind = "bf16"
        elif p.node in config.wide or base == "16":
            kind = "a16"
        else:
            kind = "int8"
        macs[kind] += p.macs
    total = sum(macs.values())
    return Shares(total, macs["int8"], macs["a16"], macs["bf16"], macs["cpu"], len(placement),
                  len(placement) - nodes_cpu, nodes_cpu)
