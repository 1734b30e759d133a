"""Units and shares of the fallback: values (a tensor with its reshapes), and where each config's MACs and
nodes run, from the placement of the all-int8 model."""

from __future__ import annotations

from collections.abc import Callable, Iterable

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


def compute_shares(placement, config: FallbackConfig, readers16: Callable[[FallbackConfig], set[str]]) -> Shares:
    """Shares of a config from the base model's placement (`Inspection.placement` of the int8 model).

    A node predicted on the CPU in the int8 model stays there; `config.cpu` nodes join it; BF16 nodes
    run on the NPU; a MAC node that reads a 16-bit activation runs as A16W8 on the NPU.
    """
    a16_nodes = readers16(config)
    macs = dict(int8=0, a16=0, bf16=0, cpu=0)
    nodes_cpu = 0
    for p in placement:
        cpu = p.device == "CPU" or p.node in config.cpu
        nodes_cpu += cpu
        if not p.macs:
            continue
        kind = "cpu" if cpu else "bf16" if p.node in config.bf16 else "a16" if p.node in a16_nodes else "int8"
        macs[kind] += p.macs
    total = sum(macs.values())
    return Shares(total, macs["int8"], macs["a16"], macs["bf16"], macs["cpu"], len(placement),
                  len(placement) - nodes_cpu, nodes_cpu)
