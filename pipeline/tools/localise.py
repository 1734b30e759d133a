"""Find the first node whose output differs between an EP run and the reference numerics (for `parity`).

Candidates, in graph order: the outputs of activation QuantizeLinear nodes (integers the fused QLinear*
kernels produce themselves, so exposing them keeps the fusion) or, in a model without Q nodes, the float
node outputs. See `pipeline.tools.parity` for the method; this module does the graph work and the
comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Candidate", "Divergence", "candidates", "localise"]

_MAC_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger"}
_FUSED_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh"}


@dataclass
class Divergence:
    node: str
    op_type: str
    fused: list[str]  # activations that run inside the same kernel
    tensor: str  # the compared tensor (a Q output, or a float node output)
    max_lsb: float | None  # integers: max |difference| in LSBs
    share_differing: float  # of elements
    share_beyond_tolerance: float
    sqnr_db: float
    worst_channel: int | None
    share_channels_affected: float | None


@dataclass(frozen=True)
class Candidate:
    tensor: str
    elem_type: int  # onnx TensorProto type of the exposed value
    zero_point: float  # integers: compared as (q - zero_point); 0 for floats
    integer: bool
    node: str  # the compute node that produced the value (the one feeding the Q)
    op_type: str
    fused: tuple[str, ...]  # activations between that node and the Q, run in the same kernel


def _constants(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _compute_node(producers: dict, tensor: str):
    """(node name, op type, fused activations) of what produced `tensor`: an activation right after a MAC
    op (Conv -> Relu -> Q) is fused into it by the int8 kernels, so the MAC op is named."""
    node = producers.get(tensor)
    if node is None:
        return tensor, "graph input", ()
    if node.op_type in _FUSED_ACTIVATIONS and node.input and node.input[0] in producers:
        before = producers[node.input[0]]
        if before.op_type in _MAC_OPS:
            return before.name or before.output[0], before.op_type, (f"{node.op_type} '{node.name}'",)
    return node.name or node.output[0], node.op_type, ()


def candidates(model) -> list[Candidate]:
    """Activation Q outputs in graph order; without any, the float node outputs (see module doc)."""
    import onnx
    from onnx import TensorProto, helper

    consts = _constants(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in consts:
            continue  # weights are constants: nothing an EP computes differently
        zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        out_type = next((a.i for a in node.attribute if a.name == "output_dtype" and a.i), None)
        if zp is not None:
            elem = helper.np_dtype_to_tensor_dtype(zp.dtype)
        else:
            elem = out_type or TensorProto.UINT8
        name, op, fused = _compute_node(producers, node.input[0])
        found.append(Candidate(node.output[0], elem, float(np.asarray(zp).reshape(-1)[0]) if zp is not None and zp.size == 1 else 0.0,
                               True, name, op, fused))
    if found:
        return found
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {v.name for v in [*inferred.graph.value_info, *inferred.graph.output]
              if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    for node in model.graph.node:
        for out in node.output:
            if out in floats and node.op_type not in ("Constant", "Shape"):
                found.append(Candidate(out, TensorProto.FLOAT, 0.0, False, node.name or out, node.op_type, ()))
    return found


def _expose(model_bytes: bytes, cands: Sequence[Candidate]) -> bytes:
    import onnx
    from onnx import helper

    model = onnx.ModelProto.FromString(model_bytes)
    existing = {o.name for o in model.graph.output}
    for c in cands:
        if c.tensor not in existing:
            model.graph.output.append(helper.make_tensor_value_info(c.tensor, c.elem_type, None))
    return model.SerializeToString()


@dataclass
class _Probe:
    unchanged: bool  # the EP's own outputs are bit-identical to the plain run: the exposure changed nothing
    stats: dict[str, dict]


def _probe(ref_bytes, model_bytes, providers, batches, cands, plain_outputs, session, lsb) -> _Probe:
    ref = session(_expose(ref_bytes, cands), ["CPUExecutionProvider"], optimize=False)
    run = session(_expose(model_bytes, cands), providers, optimize=True)
    names = [o.name for o in run.get_outputs()]
    n_orig = len(plain_outputs[0])
    unchanged = True
    pairs: dict[str, list] = {c.tensor: [] for c in cands}
    for batch, plain in zip(batches, plain_outputs):
        r = dict(zip([o.name for o in ref.get_outputs()], ref.run(None, batch)))
        g = run.run(None, batch)
        unchanged &= all(np.array_equal(a, b) for a, b in zip(plain, g[:n_orig]))
        got = dict(zip(names, g))
        for c in cands:
            pairs[c.tensor].append((r[c.tensor], got[c.tensor]))
    return _Probe(unchanged, {c.tensor: _compare(c, pairs[c.tensor], lsb) for c in cands})


def _compare(c: Candidate, pairs: list[tuple[np.ndarray, np.ndarray]], lsb: int) -> dict:
    a = np.concatenate([p[0].reshape(1, *p[0].shape) for p in pairs]).astype(np.float64) - c.zero_point
    b = np.concatenate([p[1].reshape(1, *p[1].shape) for p in pairs]).astype(np.float64) - c.zero_point
    d = np.abs(a - b)
    noise = float((d * d).sum())
    sqnr = 200.0 if noise == 0 else min(200.0, 10 * np.log10(max(float((a * a).sum()), 1e-300) / noise))
    entry = {"tensor": c.tensor, "node": c.node, "op_type": c.op_type, "sqnr_db": round(float(sqnr), 3),
             "share_differing": float((d > 0).mean()) if d.size else 0.0,
             "share_beyond_tolerance": float((d > (lsb if c.integer else 0)).mean()) if d.size else 0.0,
             "max_lsb": float(d.max(initial=0.0)) if c.integer else None,
             "max_abs": float(d.max(initial=0.0))}
    if a.ndim >= 3:  # (samples, batch, channels, ...): which channels carry the difference
        per_channel = np.moveaxis(d, 2, 0).reshape(d.shape[2], -1).max(axis=1)
        entry["worst_channel"] = int(per_channel.argmax())
        entry["per_channel_max"] = per_channel
    return entry


def localise(ref_bytes: bytes, model_bytes: bytes, providers: list, batches: list[dict], *, tolerance):
    """(Divergence or None, how it was found, profile of every compared tensor in graph order)."""
    import onnx

    from .common import ep_session

    model = onnx.ModelProto.FromString(model_bytes)
    cands = candidates(model)
    if not cands:
        return None, "the model has no intermediate to compare", []
    plain = ep_session(model_bytes, providers, optimize=True)
    plain_outputs = [plain.run(None, b) for b in batches]

    def diverged(c: Candidate, entry: dict) -> bool:
        if c.integer:
            return entry["max_lsb"] > tolerance.lsb
        return entry["sqnr_db"] < tolerance.min_sqnr_db

    full = _probe(ref_bytes, model_bytes, providers, batches, cands, plain_outputs, ep_session, tolerance.lsb)
    kind = "Q outputs (integers)" if cands[0].integer else "float node outputs"
    if full.unchanged:
        profile = [_public(c, full.stats[c.tensor], diverged(c, full.stats[c.tensor])) for c in cands]
        first = next((c for c in cands if diverged(c, full.stats[c.tensor])), None)
        how = (f"all {len(cands)} {kind} exposed at once on the {len(batches)} worst samples; the EP's outputs "
               "stayed bit-identical to the plain run (fusion kept)")
        if first is None:
            within = (f"none differs by more than {tolerance.lsb} LSB" if cands[0].integer
                      else f"none has an SQNR below {tolerance.min_sqnr_db:g} dB")
            return None, f"{how}; {within}", profile
        return _divergence(first, full.stats[first.tensor], tolerance), how, profile
    # Exposing everything changed what the EP computes: one candidate at a time, bisecting.
    order = list(cands)
    skipped: list[str] = []
    profile: dict[str, dict] = {}
    lo, hi = 0, len(order)
    found = None  # the last diverging probe: the bisection ends on it (divergence assumed to persist downstream)
    while lo < hi:
        mid = (lo + hi) // 2
        c = order[mid]
        probe = _probe(ref_bytes, model_bytes, providers, batches, [c], plain_outputs, ep_session, tolerance.lsb)
        if not probe.unchanged:
            skipped.append(c.tensor)
            order.pop(mid)
            hi -= 1
            continue
        profile[c.tensor] = _public(c, probe.stats[c.tensor], diverged(c, probe.stats[c.tensor]))
        if diverged(c, probe.stats[c.tensor]):
            hi = mid
            found = (c, probe.stats[c.tensor])
        else:
            lo = mid + 1
    how = (f"exposing all {len(cands)} {kind} changed the EP's outputs, so bisected one at a time "
           f"({len(profile)} probes" + (f"; {len(skipped)} changed the EP's result when exposed and were left out: "
                                        f"{', '.join(skipped[:5])}" if skipped else "") + ")")
    ordered = [profile[c.tensor] for c in cands if c.tensor in profile]
    if found is None:
        return None, how + "; no compared tensor diverges", ordered
    c, entry = found
    return _divergence(c, entry, tolerance), how, ordered


def _public(c: Candidate, entry: dict, diverged: bool) -> dict:
    return {k: v for k, v in entry.items() if k != "per_channel_max"} | {"diverged": diverged}


def _divergence(c: Candidate, entry: dict, tolerance):
    channels = entry.get("per_channel_max")
    affected = None if channels is None else float((channels > (tolerance.lsb if c.integer else 0)).mean())
    return Divergence(node=c.node, op_type=c.op_type, fused=list(c.fused), tensor=c.tensor, max_lsb=entry["max_lsb"],
               share_differing=entry["share_differing"], share_beyond_tolerance=entry["share_beyond_tolerance"],
               sqnr_db=entry["sqnr_db"], worst_channel=entry.get("worst_channel"), share_channels_affected=affected)
