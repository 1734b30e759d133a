"""Accuracy-aware fallback: give the fewest, most sensitive layers more precision until the gates hold.

The ladder, cheapest first: int8 activations -> 16-bit activations (A16W8 for the layers that read them)
-> BF16 (XDNA2 only; emulated with `pipeline.bf16` for those nodes) -> float on the CPU. At each rung the
candidates are ranked by sensitivity; the longest prefix the share budget allows is scored, and if it
passes, the shortest passing prefix is found by bisection (about log2(n) + 1 quantize-and-score rounds
per rung, not n); if it fails, the rung keeps it and the next rung starts from there:

- 16-bit rung: units are *values*, a quantized activation together with the reshapes/transposes of it
  (one Q/DQ range each, but one set of numbers). Values that no MatMul/Gemm/Conv reads come first (they
  cost no int8 MACs), then the others; within each, worst first by the value's own int8 quantization
  SQNR, measured by fake-quantizing the float model's activations with the ranges quantize chose;
- BF16 and CPU rungs: units are compute nodes. Rank: how much SQNR a node loses from its inputs to its
  output in the current mixed model (`pipeline.layer_error`), i.e. the error it adds itself.

Softmax inputs that carry an additive attention mask are scored on unmasked positions only: the -1e4
at masked positions clips harmlessly, and would otherwise read as ~0 dB.

The gates are evaluated on a *held-out split of the calibration data* (samples after the ones the
statistics came from), never on the validation set, so the validation figures stay an honest test. A
gate whose metric the held-out split cannot give (accuracy without labels) is left out of the search
and reported. The recipe bounds the search, as shares given up against the all-int8 model:
`max_mac_share_off_int8` (MACs that may leave int8 for 16-bit activations, BF16 or the CPU),
`max_mac_share_off_npu` and `max_node_share_off_npu` (MACs and nodes that may go to the CPU; both 0
by default, which leaves the CPU rung nothing to move). Every evaluated point is kept: held-out metrics
against the int8/NPU shares of MACs and nodes (from `pipeline.inspect`'s placement of the all-int8 model,
with the moved nodes re-labelled), which the report draws as the accuracy-vs-share curves. A rung that
fails even in full also scores `curve_points` shorter prefixes, only so that the curve has a middle.

What a chosen configuration means on the device is not all documented: a QDQ model mixing int8 and
int16 activations (XDNA2 takes both formats) and float "BF16 island" nodes in a QDQ model (XDNA2 compiles
float models to BF16) are emulated here op by op; `inspect` flags int16 Q/DQ under a8w8 and places the
float nodes on the CPU, and the report says so rather than hiding it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

__all__ = [
    "FallbackConfig",
    "Shares",
    "FallbackPoint",
    "FallbackResult",
    "search",
    "value_groups",
    "local_sqnr",
    "node_sqnr_drop",
    "compute_shares",
    "layer_error_report",
    "holdout_batches",
    "npu_numerics",
    "RecipeFallback",
    "MASKED_BELOW",
]

_DATA_MOVEMENT = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"})
_MAC_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
MASKED_BELOW = -5.0e3  # an additive mask is clamped to -1e4 (prepare): below this a score is masked
RUNGS = ("a16", "bf16", "cpu")


@dataclass(frozen=True)
class FallbackConfig:
    """What leaves int8: activation tensors at 16 bits, nodes in BF16, nodes on the CPU."""

    promote: frozenset[str] = frozenset()
    bf16: frozenset[str] = frozenset()
    cpu: frozenset[str] = frozenset()

    def to_json(self) -> dict:
        return {"promoted_to_16_bits": sorted(self.promote), "bf16_nodes": sorted(self.bf16), "cpu_nodes": sorted(self.cpu)}


@dataclass(frozen=True)
class Shares:
    """MACs and counted nodes by where and how they run."""

    macs_total: int
    macs_int8: int
    macs_a16: int
    macs_bf16: int
    macs_cpu: int
    nodes_total: int
    nodes_npu: int
    nodes_cpu: int

    @property
    def mac_share_int8(self) -> float:
        return self.macs_int8 / self.macs_total if self.macs_total else 1.0

    @property
    def mac_share_npu(self) -> float:
        return 1.0 - (self.macs_cpu / self.macs_total if self.macs_total else 0.0)

    @property
    def node_share_npu(self) -> float:
        return self.nodes_npu / self.nodes_total if self.nodes_total else 1.0

    def to_json(self) -> dict:
        out = asdict(self)
        out.update({
            "mac_share_int8": round(self.mac_share_int8, 6),
            "mac_share_npu": round(self.mac_share_npu, 6),
            "node_share_npu": round(self.node_share_npu, 6),
        })
        return out


@dataclass(frozen=True)
class FallbackPoint:
    rung: str  # "baseline", "a16", "bf16", "cpu"
    units: int  # how many units of this rung were moved
    metrics: dict
    shares: Shares
    passed: bool
    within_budget: bool

    def to_json(self) -> dict:
        return {
            "rung": self.rung,
            "units": self.units,
            "metrics": {k: round(float(v), 6) for k, v in sorted(self.metrics.items())},
            "shares": self.shares.to_json(),
            "passed": self.passed,
            "within_budget": self.within_budget,
        }


@dataclass
class FallbackResult:
    config: FallbackConfig
    passed: bool
    points: list[FallbackPoint] = field(default_factory=list)
    chosen: FallbackPoint | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "config": self.config.to_json(),
            "chosen": self.chosen.to_json() if self.chosen else None,
            "points": [p.to_json() for p in self.points],
            "notes": self.notes,
        }


# ------------------------------------------------------------------------------------ sensitivity


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
        if node.op_type in _DATA_MOVEMENT and node.input and node.input[0] in parent and node.output[0] in parent:
            parent[find(node.output[0])] = find(node.input[0])
    groups: dict[str, list[str]] = {}
    for t in names:
        groups.setdefault(find(t), []).append(t)
    return list(groups.values())


def _expose(model, names: Sequence[str]):
    from .layer_error import _expose as expose

    return expose(model, list(names))


def local_sqnr(
    model, ranges: dict[str, dict], batches: Iterable[dict], *, masked: Iterable[str] = ()
) -> dict[str, float]:
    """Each tensor's own quantization SQNR (dB): its float values against their fake-quantized copy.

    `ranges[t]` holds "lo", "hi" (symmetric or not) and "bits", as quantize chose them. Tensors named in
    `masked` (Softmax inputs with an additive mask) are scored where the value is above MASKED_BELOW.
    """
    from .onnx_utils import make_session

    names = [t for t in ranges]
    masked = set(masked)
    session = make_session(_expose(model, names).SerializeToString(), optimize=False)
    index = {o.name: i for i, o in enumerate(session.get_outputs())}
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    for batch in batches:
        outputs = session.run(None, batch)
        for t in names:
            x = outputs[index[t]].astype(np.float64).ravel()
            if t in masked:
                x = x[x > MASKED_BELOW]
            r = ranges[t]
            levels = 2.0 ** r["bits"] - 1
            scale = max((r["hi"] - r["lo"]) / levels, 1e-30)
            zero = np.round(-r["lo"] / scale)
            q = np.clip(np.round(x / scale) + zero, 0, levels)
            err = (q - zero) * scale - x
            signal[t] += float(x @ x)
            noise[t] += float(err @ err)
    return {t: float(10 * np.log10(signal[t] / noise[t])) if noise[t] > 0 else 200.0 for t in names}


def node_sqnr_drop(float_model, qmodel, batches: Iterable[dict], candidates: Iterable[str]) -> dict[str, float]:
    """dB of SQNR each candidate node loses between its worst input and its output in `qmodel`."""
    from .layer_error import layer_errors

    errors = {e.tensor: e.sqnr_db for e in layer_errors(float_model, qmodel, batches)}
    wanted = set(candidates)
    drops = {}
    for node in float_model.graph.node:
        if node.name not in wanted:
            continue
        outs = [errors[o] for o in node.output if o in errors]
        ins = [errors[i] for i in node.input if i in errors]
        if not outs:
            continue
        drops[node.name] = (min(ins) if ins else 200.0) - min(outs)
    return drops


def layer_error_report(float_model, qmodel, batches: Sequence[dict], *, bf16: bool = False) -> dict:
    """Per-layer SQNR/cosine (`pipeline.layer_error`), worst first, mask-aware, as JSON-ready data.

    A Softmax input that carries an additive attention mask is rescored on its unmasked positions
    (a masked score clipped to the range's bottom changes nothing, but counts as a huge error).
    `bf16`: `qmodel` is a bfloat16-rounding copy; every float node output is compared by name.
    """
    from .layer_error import LayerError, layer_errors, quantized_view
    from .stages.quantize import _masked_softmax_inputs, mask_path_nodes

    producers = {o: n for n in float_model.graph.node for o in n.output}
    if bf16:  # layer_errors(bf16=True) would expose integer outputs (mask path) as float: compare floats only
        pairs = {t: t for t in _float_outputs(float_model) & _float_outputs(qmodel)}
        measured = _errors(float_model, qmodel, batches, pairs)
        errors = [LayerError(t, producers[t].name, producers[t].op_type, *measured[t]) for t in sorted(pairs)]
        masked = []
    else:
        errors = layer_errors(float_model, qmodel, batches)
        view = quantized_view(qmodel)
        masked = [t for t in _masked_softmax_inputs(float_model, mask_path_nodes(float_model)) if t in view]
    rescored = _errors(float_model, qmodel, batches, {t: view[t] for t in masked}, masked=True) if masked else {}
    order = {o: i for i, n in enumerate(float_model.graph.node) for o in n.output}
    layers = []
    for e in errors:
        entry = {"tensor": e.tensor, "producer": e.producer, "op_type": e.op_type, "order": order.get(e.tensor, -1),
                 "sqnr_db": round(e.sqnr_db, 4), "cosine": round(e.cosine, 6)}
        if e.tensor in rescored:
            sqnr, cosine = rescored[e.tensor]
            entry.update(sqnr_db=round(sqnr, 4), cosine=round(cosine, 6),
                         note=f"additive attention mask: positions below {MASKED_BELOW:g} (masked) excluded")
        layers.append(entry)
    layers.sort(key=lambda x: (x["sqnr_db"], x["tensor"]))
    return {"samples": len(batches), "layers": layers}


def _float_outputs(model) -> set[str]:
    """Node outputs that onnx shape inference types as float32."""
    import onnx
    from onnx import TensorProto

    inferred = onnx.shape_inference.infer_shapes(model)
    return {v.name for v in [*inferred.graph.value_info, *inferred.graph.output]
            if v.type.tensor_type.elem_type == TensorProto.FLOAT} & {o for n in model.graph.node for o in n.output}


def _errors(float_model, qmodel, batches, pairs: dict[str, str], *, masked: bool = False) -> dict[str, tuple[float, float]]:
    """{float tensor: (SQNR dB, cosine)} of `pairs` (float tensor -> the qmodel value to compare), streamed.

    `masked`: only positions where the float value is above MASKED_BELOW count.
    """
    from .onnx_utils import make_session

    names = list(pairs)
    f_session = make_session(_expose(float_model, names).SerializeToString(), optimize=False)
    q_session = make_session(_expose(qmodel, [pairs[t] for t in names]).SerializeToString(), npu_emulation=True)
    f_index = {o.name: i for i, o in enumerate(f_session.get_outputs())}
    q_index = {o.name: i for i, o in enumerate(q_session.get_outputs())}
    sums = {t: np.zeros(4) for t in names}  # signal, noise, dot, quantized energy
    for batch in batches:
        f_out, q_out = f_session.run(None, batch), q_session.run(None, batch)
        for t in names:
            ref = f_out[f_index[t]].astype(np.float64).ravel()
            got = q_out[q_index[pairs[t]]].astype(np.float64).ravel()
            if masked:
                keep = ref > MASKED_BELOW
                ref, got = ref[keep], got[keep]
            sums[t] += [ref @ ref, (got - ref) @ (got - ref), ref @ got, got @ got]
    out = {}
    for t, (signal, noise, dot, energy) in sums.items():
        sqnr = min(10 * np.log10(signal / noise), 200.0) if noise > 0 else 200.0
        out[t] = (float(sqnr), float(dot / np.sqrt(signal * energy)) if signal * energy > 0 else 1.0)
    return out


# ------------------------------------------------------------------------------------ shares


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


# ------------------------------------------------------------------------------------ search


@dataclass
class SearchSpace:
    """What the search needs from the caller; the callables hide onnx/onnxruntime from the algorithm."""

    score: Callable[[FallbackConfig], dict]  # quantize with the config, run the held-out split: metrics
    gates: Callable[[dict], bool]  # True when every searchable gate holds
    shares: Callable[[FallbackConfig], Shares]
    rank_values: Callable[[], list[list[str]]]  # 16-bit rung units, most sensitive first
    rank_nodes: Callable[[str, FallbackConfig], list[str]]  # (rung, current config) -> BF16/CPU rung units
    rungs: Sequence[str] = RUNGS
    max_off_int8: float = 1.0  # shares lost relative to the int8 baseline, of all MACs / counted nodes
    max_off_npu: float = 0.0
    max_nodes_off_npu: float = 0.0
    curve_points: int = 0  # shorter prefixes scored on a rung that fails, only to draw the curve


def _within(space: SearchSpace, shares: Shares, baseline: Shares) -> bool:
    eps = 1e-9
    return (baseline.mac_share_int8 - shares.mac_share_int8 <= space.max_off_int8 + eps
            and baseline.mac_share_npu - shares.mac_share_npu <= space.max_off_npu + eps
            and baseline.node_share_npu - shares.node_share_npu <= space.max_nodes_off_npu + eps)


def _with(config: FallbackConfig, rung: str, units: Sequence) -> FallbackConfig:
    if rung == "a16":
        return replace(config, promote=config.promote | {t for group in units for t in group})
    if rung == "bf16":
        return replace(config, bf16=config.bf16 | set(units))
    return replace(config, cpu=config.cpu | set(units), bf16=config.bf16 - set(units))


def search(space: SearchSpace, base: FallbackConfig = FallbackConfig()) -> FallbackResult:
    """Climb the ladder until the gates hold on the held-out split or the budget is spent.

    Per rung: find the longest prefix of the ranking the share budget allows (shares only, no scoring),
    score it; if the gates still fail, keep it and go to the next rung; if they hold, bisect for the
    shortest passing prefix. About log2(units) + 1 scorings per rung; it assumes that more precision
    does not hurt (the prefix returned was measured to pass either way).
    """
    points: list[FallbackPoint] = []
    baseline = space.shares(base)
    cache: dict[FallbackConfig, FallbackPoint] = {}

    def evaluate(rung: str, k: int, config: FallbackConfig, *, score: bool = True) -> FallbackPoint:
        if config in cache:
            return cache[config]
        shares = space.shares(config)
        within = _within(space, shares, baseline)
        if not (within and score):
            return FallbackPoint(rung, k, {}, shares, False, within)
        metrics = space.score(config)
        point = FallbackPoint(rung, k, metrics, shares, space.gates(metrics), within)
        points.append(point)
        cache[config] = point
        return point

    config = base
    best = evaluate("baseline", 0, config)
    result = FallbackResult(config, best.passed, points, best)
    if best.passed:
        result.notes.append("the gates hold without fallback")
        return result
    for rung in space.rungs:
        units = space.rank_values() if rung == "a16" else space.rank_nodes(rung, config)
        units = [u for u in units if _new(config, rung, u)]
        if not units:
            result.notes.append(f"{rung}: nothing left to move")
            continue
        top = _longest_within(lambda k: evaluate(rung, k, _with(config, rung, units[:k]), score=False).within_budget,
                              len(units))
        if top == 0:
            result.notes.append(f"{rung}: not even one unit fits the recipe's share budget")
            continue
        full = evaluate(rung, top, _with(config, rung, units[:top]))
        if not full.passed:  # keep every unit the budget allows and climb on
            for i in range(1, space.curve_points + 1):  # a few shorter prefixes, for the accuracy/share curve
                k = round(top * i / (space.curve_points + 1))
                if 0 < k < top:
                    evaluate(rung, k, _with(config, rung, units[:k]))
            config = _with(config, rung, units[:top])
            result.config, result.chosen = config, full
            result.notes.append(f"{rung}: gates still fail with {top} of {len(units)} units moved"
                                + ("" if top == len(units) else " (the share budget stops there)"))
            continue
        lo, hi = 0, top  # at(lo) fails (the config before this rung), at(hi) passes
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if evaluate(rung, mid, _with(config, rung, units[:mid])).passed:
                hi = mid
            else:
                lo = mid
        chosen = cache[_with(config, rung, units[:hi])]
        result.config, result.chosen, result.passed = _with(config, rung, units[:hi]), chosen, True
        return result
    return result


def _longest_within(fits: Callable[[int], bool], n: int) -> int:
    """Largest k <= n with fits(k) (fits is monotone: more units, more share given up); 0 if none."""
    if fits(n):
        return n
    lo, hi = 0, n  # fits(lo) (0 units: the current config, within by induction), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _new(config: FallbackConfig, rung: str, unit) -> bool:
    if rung == "a16":
        return not set(unit) <= config.promote
    return unit not in config.cpu and (rung == "cpu" or unit not in config.bf16)


# ------------------------------------------------------------------------------------ recipe glue


def holdout_batches(recipe, holdout: int) -> tuple[list[dict], str]:
    """The held-out split: the `holdout` calibration samples after the ones statistics came from.

    When the calibration data holds fewer, the last `holdout` samples are used and overlap the
    statistics' samples (said in the returned note, and so in the report).
    """
    from .data import open_dataset

    used = recipe.calibration.samples
    batches = list(open_dataset(recipe, "calibration", limit=used + holdout))
    if len(batches) >= used + holdout:
        return batches[used:], f"calibration samples {used}..{used + holdout - 1} (not used for the statistics)"
    kept = batches[-holdout:]
    return kept, (f"the calibration data holds {len(batches)} samples, fewer than {used} + {holdout}: the held-out "
                  f"split is its last {len(kept)}, which the statistics also saw (optimistic)")


def npu_numerics(qmodel, config: FallbackConfig):
    """The model as the NPU computes it: BF16 nodes rounded to bfloat16 (`pipeline.bf16`), rest as is."""
    if not config.bf16:
        return qmodel
    from .bf16 import emulate_bf16

    keep = [n.name for n in qmodel.graph.node if n.name not in config.bf16]
    return emulate_bf16(_typed(qmodel), keep_float=keep)


def _typed(qmodel):
    """A copy whose com.microsoft DequantizeLinear outputs are declared float (onnx cannot infer them)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(qmodel.SerializeToString())
    known = {v.name for v in model.graph.value_info}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.domain == "com.microsoft" and node.output[0] not in known:
            model.graph.value_info.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None))
    return model


@dataclass
class RecipeFallback:
    """Runs `search` for a recipe: held-out scoring, rankings and shares over real models."""

    recipe: object
    model: object  # the float model being quantized (after transforms)
    reference: object  # the float model validation compares against (the prepared model)
    quantize: Callable[[FallbackConfig], tuple]  # config -> (qmodel, ranges, info)
    target: object
    fmt: object
    progress: bool = False
    ranking_samples: int = 8
    _batches: list = field(default_factory=list)
    _refs: np.ndarray | None = None
    _base: tuple | None = None
    _placement: list = field(default_factory=list)

    def run(self) -> FallbackResult:
        from .gates import evaluate_gates
        from .inspect import inspect_model
        from .onnx_utils import make_session
        from .recipe import Format

        settings = self.recipe.quantization.fallback
        self._batches, where = holdout_batches(self.recipe, settings.holdout)
        reference = make_session(self.reference.SerializeToString())
        names = [o.name for o in reference.get_outputs()]
        self._task = names.index(self.recipe.validation.output or names[0])
        self._refs = np.concatenate([reference.run(None, b)[self._task] for b in self._batches])
        self._base = self.quantize(FallbackConfig())
        self._placement = inspect_model(self._base[0], self.target, self.fmt).placement
        probe = self._metrics(self._base[0])
        gates = [g for g in self.recipe.gates if g.metric in probe]
        skipped = sorted({g.metric for g in self.recipe.gates} - {g.metric for g in gates})
        rungs = [r for r in settings.rungs if r != "bf16" or Format.BF16 in self.target.formats]
        space = SearchSpace(
            score=self._score,
            gates=lambda m: all(r.passed for r in evaluate_gates(gates, m)),
            shares=lambda c: compute_shares(self._placement, c, self._readers16),
            rank_values=self._rank_values,
            rank_nodes=self._rank_nodes,
            rungs=rungs,
            max_off_int8=settings.max_mac_share_off_int8,
            max_off_npu=settings.max_mac_share_off_npu,
            max_nodes_off_npu=settings.max_node_share_off_npu,
            curve_points=settings.curve_points,
        )
        if not gates:
            result = FallbackResult(FallbackConfig(), False)
            result.notes.append("no gate can be measured on the held-out split: nothing to search for")
        else:
            result = search(space)
        result.notes.insert(0, f"held-out split: {where}")
        if skipped:
            result.notes.append(f"gates not measurable on the held-out split, left out of the search: {', '.join(skipped)}")
        if "bf16" in settings.rungs and "bf16" not in rungs:
            result.notes.append(f"bf16 rung skipped: target {self.target.name} does not run BF16")
        return result

    def _metrics(self, npu_model) -> dict:
        from .onnx_utils import make_session
        from .stages.validate import compare_outputs, task_metrics

        session = make_session(npu_model.SerializeToString(), npu_emulation=True)
        got = np.concatenate([session.run(None, b)[self._task] for b in self._batches])
        return {**task_metrics(self.recipe.validation.task, self._refs, got, None), **compare_outputs([self._refs], [got])}

    def _score(self, config: FallbackConfig) -> dict:
        qmodel = self.quantize(config)[0]
        metrics = self._metrics(npu_numerics(qmodel, config))
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

    def _readers16(self, config: FallbackConfig) -> set[str]:
        return {n.name for n in self.model.graph.node if any(i in config.promote for i in n.input)}

    def _rank_values(self) -> list[list[str]]:
        from .layer_error import quantized_view
        from .stages.quantize import _masked_softmax_inputs, mask_path_nodes

        qmodel, ranges, _ = self._base
        view = quantized_view(qmodel)
        quantized = {t: r for t, r in ranges.items() if t in view}
        masked = _masked_softmax_inputs(self.model, mask_path_nodes(self.model))
        scores = local_sqnr(self.model, quantized, self._batches[: self.ranking_samples], masked=masked)
        groups = value_groups(self.model, quantized)
        mac_read = {i for n in self.model.graph.node if n.op_type in _MAC_OPS for i in n.input}
        # Values no MAC node reads first: promoting them costs no int8 MACs.
        return sorted(groups, key=lambda g: (bool(mac_read & set(g)), min(scores[t] for t in g), sorted(g)))

    def _rank_nodes(self, rung: str, config: FallbackConfig) -> list[str]:
        from .recipe import Format

        _, _, info = self._base
        quantized_ops = set(info["op_types_quantized"]) - _DATA_MOVEMENT
        excluded = set(info["excluded_nodes"])
        candidates = [
            n.name for n in self.model.graph.node
            if n.op_type in quantized_ops and n.name not in excluded
            and (rung != "bf16" or self.target.runs(n.op_type, Format.BF16))
        ]
        qmodel = self.quantize(config)[0]
        drops = node_sqnr_drop(self.model, qmodel, self._batches[: self.ranking_samples], candidates)
        return sorted(drops, key=lambda n: (-drops[n], n))
