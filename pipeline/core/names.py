"""Fresh names for tensors, nodes and initializers added to a graph: one allocator, no collisions."""

from __future__ import annotations

from collections.abc import Iterable

import onnx

__all__ = ["NameAllocator"]


class NameAllocator:
    """Hands out names that collide with nothing in the graph it was built from, nor with each other."""

    def __init__(self, graph: onnx.GraphProto | None = None, *, taken: Iterable[str] = ()) -> None:
        self.used: set[str] = set(taken)
        if graph is not None:
            self.used |= {n.name for n in graph.node}
            self.used |= {v.name for v in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]}
            for node in graph.node:
                self.used.update(node.input)
                self.used.update(node.output)
        self.used.discard("")

    def fresh(self, base: str) -> str:
        """`base`, or `base_1`, `base_2`, ... : the first one not taken (it is taken from now on)."""
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def reserve(self, name: str) -> None:
        self.used.add(name)

    def __contains__(self, name: str) -> bool:
        return name in self.used
