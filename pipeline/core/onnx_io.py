"""ONNX and onnxruntime helpers for every layer: loading with clear errors, sessions, saving, exposing
intermediate values as outputs.

Numerics: `npu_emulation=True` runs a QDQ model with every graph optimization disabled, so Q/DQ pairs run
as float ops (ideal integer arithmetic, what the NPU computes). The CPU EP's fused int8 kernels saturate
on x86 without VNNI (a digits CNN scored 52.8% instead of 99.4%), so their figures are labelled CPU-EP.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ModelError

# Threads per onnxruntime session; batch sets it so that parallel workers share the cores.
THREADS_ENV = "NPU_PIPELINE_THREADS"

__all__ = [
    "THREADS_ENV", "load_onnx", "save_onnx", "model_opset", "make_session", "run_session", "static_input_shapes",
    "expose_outputs", "drop_unread_nodes", "subgraph_reads", "copy_model",
]


def load_onnx(path: Path, *, where: str = "model"):
    """Load and check an ONNX file; a missing, truncated or invalid file raises one `ModelError`."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{where}: {path} does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as err:  # protobuf raises DecodeError and friends; all mean "not an ONNX file"
        raise ModelError(f"{where}: {path} is not a readable ONNX file ({type(err).__name__}: {err})") from None
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise ModelError(f"{where}: {path} is not a valid ONNX model: {first}") from None
    if not model.graph.node:
        raise ModelError(f"{where}: {path} has an empty graph")
    return model


def save_onnx(model, path: Path) -> None:
    """Serialise deterministically (same graph, same bytes) and write atomically."""
    from .fileio import atomic_write

    atomic_write(Path(path), model.SerializeToString(deterministic=True))


def model_opset(model) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def make_session(model, *, npu_emulation: bool = False, optimize: bool = True, threads: int = 0,
                 disabled_optimizers: Sequence[str] = (), may_edit: bool = False):
    """A CPU-EP session of `model`: a path, serialized bytes, or a ModelProto (not modified). `npu_emulation`:
    Q/DQ kept as float ops with their exact semantics, constant weights dequantized once
    (`pipeline.core.emulation`); `optimize=False`: no graph optimization at all; `disabled_optimizers`:
    onnxruntime transformers to leave out besides; `may_edit`: the ModelProto is a throwaway, the emulation
    may edit it instead of a copy.

    Pass a ModelProto rather than its bytes where you have one: the emulation edits a parsed model, and a
    round trip through bytes (or a copy) costs a serialization and a parse each (MiniLM's side-by-side graph
    for per-layer errors: 1.3 s of 4.8)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    threads = threads or int(os.environ.get(THREADS_ENV, "0") or 0)
    if threads:
        options.intra_op_num_threads = threads
    disabled: list[str] = list(disabled_optimizers)
    model = Path(model) if isinstance(model, str) else model
    where = model if isinstance(model, Path) else "the model"
    if npu_emulation:
        import onnx

        from .emulation import EMULATION_DISABLED_OPTIMIZERS, drop_redundant_activation_pairs, fold_constant_dequantize

        # A proto parsed here is ours to edit; the caller's is copied by the fold unless it is a throwaway.
        owned = may_edit or not isinstance(model, onnx.ModelProto)
        proto = (load_onnx(model, where="model") if isinstance(model, Path)
                 else onnx.ModelProto.FromString(model) if isinstance(model, bytes) else model)
        source = drop_redundant_activation_pairs(fold_constant_dequantize(proto, in_place=owned)).SerializeToString()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        disabled += EMULATION_DISABLED_OPTIMIZERS
    else:
        source = str(model) if isinstance(model, Path) else model if isinstance(model, bytes) else model.SerializeToString()
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph classes
        raise ModelError(f"onnxruntime cannot load {where}: {err}") from None


def run_session(model: Path, feeds: dict[str, np.ndarray], *, optimize: bool = True) -> Sequence[np.ndarray]:
    session = make_session(model, optimize=optimize)
    return session.run(None, feeds)


def static_input_shapes(model) -> dict[str, list[int | str]]:
    """Each graph input's dims: ints where static, the dim_param (or '?') where dynamic."""
    init_names = {i.name for i in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in init_names:
            continue
        dims = []
        for d in value.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
        shapes[value.name] = dims
    return shapes


def copy_model(model):
    """A deep copy of a ModelProto (the caller may edit it freely)."""
    import onnx

    return onnx.ModelProto.FromString(model.SerializeToString())


def expose_outputs(model, names: Sequence[str], *, replace: bool = False):
    """A copy of `model` that also returns the float values `names` (after its own outputs, or instead of
    them when `replace`: then only the nodes they depend on are kept, see `drop_unread_nodes`). Names
    already among the outputs are not repeated."""
    from onnx import TensorProto, helper

    model = copy_model(model)
    if replace:
        del model.graph.output[:]
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
            existing.add(name)
    if replace:
        drop_unread_nodes(model)
    return model


def subgraph_reads(node) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies, nested ones included) read from the enclosing graph:
    what they read and do not define themselves (as inputs, initializers or node outputs)."""
    reads: set[str] = set()
    for attr in node.attribute:
        for graph in [attr.g, *attr.graphs] if (attr.HasField("g") or attr.graphs) else []:
            defined = ({i.name for i in graph.input} | {t.name for t in graph.initializer}
                       | {name for inner in graph.node for name in inner.output})
            inner_reads = {o.name for o in graph.output}
            for inner in graph.node:
                inner_reads.update(inner.input)
                inner_reads |= subgraph_reads(inner)
            reads |= inner_reads - defined
    reads.discard("")
    return reads


def drop_unread_nodes(model) -> None:
    """Remove, in place, the nodes no graph output depends on and the initializers nothing reads; graph
    inputs stay (the same feeds still work). Why: onnxruntime runs every node of a graph whether its
    output is read or not, so a model cut down to an early value by `expose_outputs(replace=True)`
    otherwise costs a whole inference (AdaRound's layer-by-layer passes ran the full network per layer)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
            needed |= subgraph_reads(node)
    if len(kept) == len(graph.node):
        return
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
