"""A model's values at a cut that moves forward through its graph, for a fixed list of samples: each step
runs only the nodes between the last cut and the values it asks for.

Sequential AdaRound (`quantized_inputs`) needs, for layer after layer in graph order, that layer's input in
the QDQ model as rounded so far and its output in the float model, over the same samples. Run from the
model's inputs each time, that is a network's worth of inference per layer (MobileNetV2 XINT8: 53 layers,
most of the quantize stage). Here the values every not yet run node still reads (the live set: for a chain
with residuals, a stream and a branch) are kept per sample, so each layer costs only the nodes since the
previous one.

Exactness: the kept values are the tensors onnxruntime computed, so a segment run from them gives the same
values as a run from the inputs (a cut value is a graph output of one segment and a graph input of the
next, so no fusion crosses it; emulation sessions have no layout transform that would reorder
accumulation). When an initializer an already run node reads changes (the caller rounds a layer whose
weights were used before the cut), the cut goes back to the model's inputs.

Memory: the live set over all samples. When it would pass `limit_bytes` the frontier refuses (`values`
returns None), keeps nothing and starts again from the inputs at the next call; the caller streams that
layer from the inputs as before.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper

from ...core.onnx_io import make_session, subgraph_reads

__all__ = ["Frontier", "CACHE_LIMIT_BYTES"]

# Per model. MobileNetV2 at 64 samples keeps at most 294 MiB; a layer whose values would not fit is
# streamed from the model's inputs instead, and the next one tries again.
CACHE_LIMIT_BYTES = 512 << 20


class Frontier:
    def __init__(self, model: onnx.ModelProto, feeds: list[dict], *, limit_bytes: int = CACHE_LIMIT_BYTES,
                 **session_options) -> None:
        self.feeds = feeds
        self.limit_bytes = limit_bytes
        self.session_options = session_options
        self.opsets, self.ir_version = list(model.opset_import), model.ir_version
        self.functions = list(model.functions)
        # The graph's structure, read once: callers change initializer values between calls, never nodes.
        graph = model.graph
        self.constants = {t.name for t in graph.initializer}
        self.inputs = [i.name for i in graph.input if i.name not in self.constants]
        self.producer = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
        # What each node reads, its subgraphs' outer-scope names included.
        self.reads = [{name for name in node.input if name} | subgraph_reads(node) for node in graph.node]
        self.reset()

    def reset(self) -> None:
        self.cached: dict[str, list[np.ndarray]] = {}  # the live set, one array per sample
        self.run_outputs: set[str] = set()  # outputs of the nodes run so far
        self.read_constants: set[str] = set()  # initializers those nodes read

    def changed(self, initializers: Iterable[str]) -> None:
        """The caller changed these initializers: the cut goes back to the inputs if a run node read one."""
        if self.read_constants & set(initializers):
            self.reset()

    def values(self, model: onnx.ModelProto, wanted: list[str]) -> list[list[np.ndarray]] | None:
        """Per sample, the values `wanted` of `model` (the same graph as before; initializers may differ, see
        `changed`); None when keeping the live set would pass the memory limit (then nothing is kept)."""
        graph = model.graph
        available = set(self.cached) | set(self.inputs)
        segment: set[int] = set()
        sources: set[str] = set()
        stack = list(wanted)
        while stack:
            name = stack.pop()
            if name in available:
                sources.add(name)
            elif name not in self.constants:
                index = self.producer[name]
                if index not in segment:
                    segment.add(index)
                    stack.extend(self.reads[index])
        order = sorted(segment)
        nodes = [graph.node[i] for i in order]
        run_outputs = self.run_outputs | {name for node in nodes for name in node.output if name}
        pending = set()
        for node, reads in zip(graph.node, self.reads):
            if not any(name in run_outputs for name in node.output):
                pending |= reads
        segment_reads = set().union(*(self.reads[i] for i in order))
        made = [name for node in nodes for name in node.output if name]
        keep = [name for name in dict.fromkeys([*self.cached, *made]) if name in pending]
        outputs = list(dict.fromkeys([*wanted, *(name for name in keep if name in made)]))
        results = self._run(graph, nodes, sorted(sources), outputs, segment_reads) if nodes else None
        per_sample = []
        kept: dict[str, list[np.ndarray]] = {name: [] for name in keep}
        for k in range(len(self.feeds)):
            value = {name: self._known(name, k) for name in sources}
            if results is not None:
                value.update(zip(outputs, results[k]))
            per_sample.append([value[name] for name in wanted])
            for name in keep:
                kept[name].append(value[name] if name in value else self.cached[name][k])
        size = sum(a.nbytes for arrays in kept.values() for a in arrays)
        if size > self.limit_bytes:
            self.reset()
            return None
        self.cached = kept
        self.run_outputs = run_outputs
        self.read_constants |= segment_reads & self.constants
        return per_sample

    def _known(self, name: str, k: int) -> np.ndarray:
        return self.cached[name][k] if name in self.cached else np.asarray(self.feeds[k][name])

    def _run(self, graph: onnx.GraphProto, nodes: list, sources: list[str], outputs: list[str],
             reads: set[str]) -> list[list[np.ndarray]]:
        """The segment `nodes` (reading `reads`) as a model fed with `sources`, run on every sample."""
        example = {name: self._known(name, 0) for name in sources}
        inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(example[name].dtype),
                                                list(example[name].shape)) for name in sources]
        sub = helper.make_graph(nodes, "segment", inputs, [onnx.ValueInfoProto(name=name) for name in outputs],
                                [t for t in graph.initializer if t.name in reads])
        model = helper.make_model(sub, opset_imports=self.opsets, ir_version=self.ir_version, functions=self.functions)
        session = make_session(model, **self.session_options)
        return [session.run(outputs, {name: self._known(name, k) for name in sources}) for k in range(len(self.feeds))]
