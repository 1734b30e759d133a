"""Two models in one graph, reading the same inputs: what a comparison of their intermediate values needs
without copying them out (`pipeline.quant.layer_error` reduces the differences inside the graph).

Every name of each model (nodes, values, initializers) gets its own prefix, except the graph inputs, which
both read. The opsets must agree per domain: an op's meaning can change between versions (ReduceMean's
axes moved to an input in 18), so models of different opsets are refused rather than silently merged.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
from onnx import helper

__all__ = ["side_by_side", "SideBySideError"]


class SideBySideError(ValueError):
    """The two models cannot share one graph (different inputs or opsets)."""


def _inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _copy_renamed(graph: onnx.GraphProto, target: onnx.GraphProto, rename: Callable[[str], str], prefix: str) -> None:
    for node in graph.node:
        new = target.node.add()
        new.CopyFrom(node)
        new.name = prefix + node.name
        for i, name in enumerate(node.input):
            new.input[i] = rename(name)
        for i, name in enumerate(node.output):
            new.output[i] = rename(name)
    for tensor in graph.initializer:
        new = target.initializer.add()
        new.CopyFrom(tensor)
        new.name = rename(tensor.name)
    for value in graph.value_info:
        new = target.value_info.add()
        new.CopyFrom(value)
        new.name = rename(value.name)


def side_by_side(first: onnx.ModelProto, second: onnx.ModelProto, prefixes: tuple[str, str] = ("a/", "b/")
                 ) -> tuple[onnx.ModelProto, Callable[[str], str], Callable[[str], str]]:
    """(model, name in it of a `first` value, name in it of a `second` value); no outputs yet: the caller
    adds nodes reading both and declares its own outputs. Subgraphs (If/Loop bodies) are not renamed:
    models holding them are refused."""
    inputs = _inputs(first)
    shared = {i.name for i in inputs}
    if shared != {i.name for i in _inputs(second)}:
        raise SideBySideError("the two models read different inputs")
    opsets = [{o.domain or "ai.onnx": o.version for o in m.opset_import} for m in (first, second)]
    common = set(opsets[0]) & set(opsets[1])
    if any(opsets[0][d] != opsets[1][d] for d in common):
        raise SideBySideError(f"the models' opsets differ ({opsets[0]} and {opsets[1]})")
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for m in (first, second) for n in m.graph.node for a in n.attribute):
        raise SideBySideError("a model holds subgraphs")
    graph = helper.make_graph([], "side_by_side", list(inputs), [])
    renames = []
    for model, prefix in zip((first, second), prefixes):
        def rename(name: str, prefix: str = prefix) -> str:
            return name if not name or name in shared else prefix + name
        _copy_renamed(model.graph, graph, rename, prefix)
        renames.append(rename)
    merged = {**opsets[1], **opsets[0]}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("" if d == "ai.onnx" else d, v)
                                                    for d, v in merged.items()])
    model.ir_version = max(first.ir_version, second.ir_version)
    return model, renames[0], renames[1]
