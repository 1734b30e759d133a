"""Smoothing an input whose source also feeds a residual branch: fold 1/s upstream, restore x s there.

A post-LN transformer (BERT, MiniLM) sends each LayerNorm output X both into weight layers (Q/K/V, or the
FFN's first layer through a Reshape) and into the next residual Add. `fold.plan_fold` refuses it (the Add
has no weight to absorb s). Here the Add's branch gets X back through one elementwise Mul:

    LayerNorm(gamma / s, beta / s) -> X / s -+-> MatMul(W * s)           (the weight layers: unchanged)
                                             +-> Mul(s) -> X -> Add      (the residual: unchanged)

The Mul is an NPU op (elementwise, no MACs). X / s is what the MatMuls read at int8, smoothed; the Mul's
output carries X at whatever precision the residual stream has (16 bits where the fallback puts it).
`s` is snapped to the grid its own int8 quantization will use (symmetric, step max(s) / 127), so the
Mul's constant quantizes exactly and the float function stays exact with the snapped s on both sides.

Only the fold site's own output may take the Mul (the LayerNorm output, not a tensor inside the path):
that is where the residual branch leaves in post-LN blocks, and where s has the site's channel layout.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ...core.editable import Editable
from ...core.ops import LAYOUT_OPS
from .fold import FoldPlan, NotFoldable, plan_fold

__all__ = [
    "Restore", "plan_with_restore", "insert_restore", "set_restore_scale", "snap_to_int8_grid", "snap_for_mul_site",
]

INT8_LEVELS = 127


@dataclass
class Restore:
    """The Mul that gives `others` (the residual readers) the unscaled `source` back."""

    source: str
    others: list[onnx.NodeProto]
    mul: onnx.NodeProto | None = None


def snap_to_int8_grid(s: np.ndarray) -> np.ndarray:
    """s rounded to multiples of max(s)/127 (at least one step): exactly representable in symmetric int8."""
    step = float(np.max(s)) / INT8_LEVELS
    return np.clip(np.round(s / step), 1, INT8_LEVELS) * step


def snap_for_mul_site(graph: Editable, plan: FoldPlan, s: np.ndarray) -> np.ndarray:
    """s adjusted so that a Mul site's new constant (c / s per channel) lies on its own int8 grid.

    A Mul by a per-channel constant (GELU's 0.5, a split mask) is quantized like an activation, per tensor:
    c / s spread over two decades would lose its small entries to rounding. Snapping c / s to multiples of
    max|c / s| / 127 (at least one step where c != 0) and taking s = c / snapped keeps the fold exact.
    Other sites (weights, LayerNorm) return s unchanged."""
    site = plan.site
    if site.op_type != "Mul":
        return s
    slot = 0 if graph.const(site.input[0]) is not None else 1
    const = graph.const(site.input[slot])
    out_shape = graph.shape(site.output[0])
    full = np.broadcast_to(const.reshape((1,) * (len(out_shape) - const.ndim) + const.shape), out_shape)
    c_site = np.moveaxis(full, plan.site_axis, -1).reshape(-1, full.shape[plan.site_axis])[0].astype(np.float64)
    c = np.empty_like(c_site)
    c[plan.site_map] = c_site
    v = c / s
    step = float(np.abs(v).max()) / INT8_LEVELS
    if step <= 0:
        return s
    q = np.round(v / step)
    q = np.where((c != 0) & (q == 0), np.sign(v), np.clip(q, -INT8_LEVELS, INT8_LEVELS))
    return np.where(c != 0, c / np.where(q == 0, 1.0, q * step), s)


def _source(graph: Editable, tensor: str) -> tuple[str, list[onnx.NodeProto]]:
    """Walk back from `tensor` through layout ops to the first tensor a non-layout op writes: (that tensor
    X, X's readers on the way to the weight layers). Other readers inside the path: plan_fold refuses."""
    weight_readers = [n for n in graph.consumers.get(tensor, []) if graph.weight(n) is not None and n.input[0] == tensor]
    path_readers, current = weight_readers, tensor
    node = graph.producer.get(current)
    while node is not None and node.op_type in LAYOUT_OPS and node.input[0] not in graph.inits:
        path_readers, current = [node], node.input[0]
        node = graph.producer.get(current)
    return current, path_readers


@contextmanager
def _hidden(graph: Editable, name: str, keep: list[onnx.NodeProto]):
    """Within the block, `graph` sees only `keep` reading `name` (as it will once the Mul takes the rest)."""
    saved = graph.consumers.get(name, [])
    graph.consumers[name] = list(keep)
    try:
        yield
    finally:
        graph.consumers[name] = saved


def plan_with_restore(graph: Editable, tensor: str) -> tuple[FoldPlan, Restore]:
    """A fold plan for `tensor` that a restoring Mul on its source's other readers makes possible;
    raises NotFoldable (with the reason) when even that does not help."""
    source, path_readers = _source(graph, tensor)
    if source in graph.outputs:
        raise NotFoldable(f"'{source}' is a graph output")
    others = [r for r in graph.consumers.get(source, []) if all(r is not p for p in path_readers)]
    if not others:
        raise NotFoldable("no residual reader to restore")
    with _hidden(graph, source, path_readers):
        plan = plan_fold(graph, tensor)
    if source not in plan.site.output:
        raise NotFoldable(f"'{source}' lies inside the fold path, not at its site: no single place for the Mul")
    if plan.site_axis not in (-1, len(graph.shape(source)) - 1):
        raise NotFoldable("the site's channels are not on the last axis (the Mul's constant broadcasts there)")
    return plan, Restore(source, others)


def insert_restore(graph: Editable, restore: Restore) -> None:
    """Insert `Mul(source, 1)` after the source's producer and move the other readers onto it (the scale
    is set once s is known, `set_restore_scale`). Keeps `graph`'s indexes current."""
    source = restore.source
    out = graph.names.fresh(f"{source}_restored")
    ones = graph.names.fresh(f"{source}_restore_scale")
    shape = graph.shape(source)
    graph.model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(shape[-1:], np.float32), ones))
    graph.inits[ones] = graph.model.graph.initializer[-1]
    mul = helper.make_node("Mul", [source, ones], [out], name=graph.names.fresh(f"{source}_restore"))
    producer = graph.producer[source]
    nodes = graph.model.graph.node
    index = next(i for i, n in enumerate(nodes) if n is producer)
    nodes.insert(index + 1, mul)
    mul = nodes[index + 1]
    for reader in restore.others:
        for slot, name in enumerate(reader.input):
            if name == source:
                reader.input[slot] = out
        graph.consumers.setdefault(out, []).append(reader)
    graph.consumers[source] = [r for r in graph.consumers[source] if all(r is not o for o in restore.others)]
    graph.consumers[source].append(mul)
    graph.consumers[ones] = [mul]
    graph.producer[out] = mul
    graph.shapes[out] = tuple(shape)
    # Statistics find activations through value_info: declare the new one like its source.
    graph.model.graph.value_info.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, list(shape)))
    restore.mul = mul


def set_restore_scale(graph: Editable, plan: FoldPlan, restore: Restore, s: np.ndarray, tag: str) -> None:
    """After `plan.apply(s)`: the Mul multiplies the source (now X / s, in the site's channel order) by s."""
    site_s = np.asarray(s, dtype=np.float64)[plan.site_map]
    graph.set_input_const(restore.mul, 1, site_s.astype(np.float32), tag)
