"""The fallback over real models: scoring on a held-out split, sensitivity rankings, shares from placement.

Callers give the float model being quantized (after transforms), the reference it is judged against, a
`quantize(config)` function, the held-out batches (never the validation set) and the gates; `run()` builds
the `SearchSpace` and returns the `FallbackResult`. Nothing here reads a recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ...core.formats import Format
from ...core.masks import masked_softmax_inputs
from ...core.onnx_io import make_session
from ...core.ops import LAYOUT_OPS, MAC_OPS
from ...core.tasks import gate_holds, plan_outputs
from ...inspect import inspect_model
from ..layer_error import local_sqnr, node_sqnr_drop, quantized_view
from ..mac_share import mac_shares
from ..shared_grid import fused_activation_inputs
from .search import FallbackConfig, FallbackResult, SearchSpace, search
from .shares import compute_shares, value_groups

__all__ = ["HeldOutFallback", "npu_numerics"]


def npu_numerics(qmodel, config: FallbackConfig):
    """The model as the NPU computes it: BF16 nodes rounded to bfloat16 (`pipeline.quant.bf16`), rest as is."""
    if not config.bf16:
        return qmodel
    from ..bf16 import emulate_bf16

    keep = [n.name for n in qmodel.graph.node if n.name not in config.bf16]
    return emulate_bf16(qmodel, keep_float=keep)


@dataclass
class HeldOutFallback:
    """Runs `search` for one model: held-out scoring, rankings and shares over real models.

    `settings` carries the recipe's fallback settings (rungs, share budgets, curve_points); `gates` are
    objects with `metric`, `min`, `max` and `output`; `task`, `task_output`, `outputs` (per-output task
    settings) and `task_given` are the recipe's validation plan (`pipeline.core.tasks.plan_outputs`): every
    output is scored as validation scores it, and an output with a dead channel (unless `waived`, "*" for
    all) fails like the default gate does.
    """

    model: object  # the float model being quantized (after transforms)
    reference: object  # the float model validation compares against (the prepared model)
    quantize: Callable[[FallbackConfig], tuple]  # config -> (qmodel, ranges, info)
    target: object
    fmt: Format
    batches: Sequence[dict]
    where: str  # where the held-out split comes from (reported)
    gates: Sequence
    task: str
    task_output: str | None
    settings: object
    priority: frozenset[str] = frozenset()  # tensors the range guard found mixing ranges: ranked first
    outputs: dict = field(default_factory=dict)
    task_given: bool = False
    waived: frozenset[str] = frozenset()
    ranking_samples: int = 8
    _refs: list | None = None
    _base: tuple | None = None
    _placement: list = field(default_factory=list)
    _kinds: dict = field(default_factory=dict)
    _scores: dict = field(default_factory=dict)

    def run(self) -> FallbackResult:
        settings = self.settings
        reference = make_session(self.reference)
        names = [o.name for o in reference.get_outputs()]
        self._plan = plan_outputs(names, self.outputs, output=self.task_output, task=self.task,
                                  task_given=self.task_given)
        # Every output of the reference, per batch (held-out splits are small: 64-200 samples).
        self._refs = [reference.run(None, b) for b in self.batches]
        self._base = self.quantize(FallbackConfig())
        self._placement = inspect_model(self._base[0], self.target, self.fmt).placement
        self._kinds = mac_shares(self._base[0]).nodes  # int8 x int8 as an audit of the QDQ model counts it
        probe = self._metrics(self._base[0])
        self._scores = {FallbackConfig(): {k: v for k, v in probe.items() if isinstance(v, (int, float))}}
        steering = self.gates if settings.gates is None else [g for g in self.gates if g.metric in settings.gates]
        gates = [g for g in steering if self._key(g) in probe]
        skipped = sorted({self._key(g) for g in steering} - {self._key(g) for g in gates})
        left = sorted({self._key(g) for g in self.gates} - {self._key(g) for g in steering})
        offered = {"bf16": Format.BF16, "a16w8": Format.A16W8}
        rungs = [r for r in settings.rungs if r not in offered or offered[r] in self.target.formats]
        space = SearchSpace(
            score=self._score,
            gates=lambda m: (all(gate_holds(float(m[self._key(g)]), g.min, g.max) for g in gates)
                             and m.get("dead_channels_unwaived", 0) == 0),
            shares=lambda c: compute_shares(self._placement, c, self._kinds),
            rank_values=self._rank_values,
            rank_nodes=self._rank_nodes,
            rungs=rungs,
            max_off_int8=settings.max_mac_share_off_int8,
            max_off_npu=settings.max_mac_share_off_npu,
            max_nodes_off_npu=settings.max_node_share_off_npu,
            curve_points=settings.curve_points,
            min_int8=settings.min_mac_share_int8,
        )
        if not gates:
            result = FallbackResult(FallbackConfig(), False)
            result.notes.append("no gate can be measured on the held-out split: nothing to search for")
        else:
            result = search(space)
        result.notes.insert(0, f"held-out split: {self.where}")
        if skipped:
            result.notes.append(f"gates not measurable on the held-out split, left out of the search: {', '.join(skipped)}")
        if probe.get("dead_channels_unwaived"):
            result.notes.append("the all-int8 model has dead output channels on the held-out split: the search "
                                "also makes them live (the default dead-channel gate)")
        if left:
            result.notes.append(f"gates left to validation by the recipe (fallback.gates): {', '.join(left)}")
        for rung in sorted(set(offered) & set(settings.rungs) - set(rungs)):
            result.notes.append(f"{rung} rung skipped: target {self.target.name} does not take {offered[rung].value}")
        return result

    def _key(self, gate) -> str:
        """A gate's metric as `_metrics` names it: plain for the task output, `output:metric` otherwise."""
        output = getattr(gate, "output", None)
        return gate.metric if output in (None, self._plan.task_output) else f"{output}:{gate.metric}"

    def _metrics(self, npu_model) -> dict:
        session = make_session(npu_model, npu_emulation=True)
        evaluators = self._plan.evaluators()
        for refs, batch in zip(self._refs, self.batches):
            for name, r, g in zip(self._plan.names, refs, session.run(None, batch)):
                evaluators[name].update(r, g)
        metrics, dead = {}, 0
        for name, ev in evaluators.items():
            result = ev.result(None)
            if name not in self.waived and "*" not in self.waived:
                dead += int(result.get("dead_channels", 0))
            prefix = "" if name == self._plan.task_output else f"{name}:"
            metrics.update({prefix + k: v for k, v in result.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        metrics["dead_channels_unwaived"] = dead
        return metrics

    def _score(self, config: FallbackConfig) -> dict:
        if config in self._scores:  # the baseline, already scored to see which gates are measurable
            return self._scores[config]
        qmodel = self.quantize(config)[0]
        metrics = self._metrics(npu_numerics(qmodel, config))
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

    def _rank_values(self) -> list[list[str]]:
        qmodel, ranges, _ = self._base
        view = quantized_view(qmodel)
        # A fused activation's input takes the activation's quantization whatever it is promoted to (qdq):
        # promoting it buys nothing, and scored on the activation's range it would always rank first.
        fused = fused_activation_inputs(self.model)
        quantized = {t: r for t, r in ranges.items() if t in view and t not in fused}
        masked = masked_softmax_inputs(self.model)
        scores = local_sqnr(self.model, quantized, self.batches[: self.ranking_samples], masked=masked)
        groups = value_groups(self.model, quantized)
        # Promoting a value costs no int8 MACs (its MAC readers get int8 copies), and buys nothing when only
        # MAC nodes read it: only values some other op reads (residual Adds, LayerNorm, Softmax, ...) count.
        # Tensors the range guard found mixing ranges come first (the same signal).
        other_read = {i for n in self.model.graph.node if n.op_type not in MAC_OPS | LAYOUT_OPS for i in n.input}
        other_read |= {o.name for o in self.model.graph.output}
        groups = [g for g in groups if other_read & set(g)]
        return sorted(groups, key=lambda g: (not self.priority & set(g), min(scores[t] for t in g), sorted(g)))

    def _rank_nodes(self, rung: str, config: FallbackConfig) -> list[str]:
        _, _, info = self._base
        quantized_ops = set(info["op_types_quantized"]) - LAYOUT_OPS
        excluded = set(info["excluded_nodes"])
        candidates = [
            n.name for n in self.model.graph.node
            if n.op_type in quantized_ops and n.name not in excluded
            and (rung != "bf16" or self.target.runs(n.op_type, Format.BF16))
            and (rung != "a16w8" or self._kinds.get(n.name) == "int8")
        ]
        qmodel = self.quantize(config)[0]
        drops = node_sqnr_drop(self.model, qmodel, self.batches[: self.ranking_samples], candidates)
        return sorted(drops, key=lambda n: (-drops[n], n))
