"""The fallback's search: climb the precision ladder over ranked units until the gates hold.

Pure algorithm: scoring, ranking and shares come in as callables (`SearchSpace`), so nothing here touches
onnx or onnxruntime (NNCF's accuracy control likewise depends on a ranker and a validation callback only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

__all__ = ["RUNGS", "FallbackConfig", "Shares", "FallbackPoint", "FallbackResult", "SearchSpace", "search"]

RUNGS = ("a16", "a16w8", "bf16", "cpu")


@dataclass(frozen=True)
class FallbackConfig:
    """What leaves int8: activation tensors at 16 bits (their MAC readers still read int8 copies), MAC
    nodes reading 16-bit activations (A16W8), nodes in BF16, nodes on the CPU."""

    promote: frozenset[str] = frozenset()
    bf16: frozenset[str] = frozenset()
    cpu: frozenset[str] = frozenset()
    wide: frozenset[str] = frozenset()

    def to_json(self) -> dict:
        return {"promoted_to_16_bits": sorted(self.promote), "a16w8_nodes": sorted(self.wide),
                "bf16_nodes": sorted(self.bf16), "cpu_nodes": sorted(self.cpu)}


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


@dataclass
class SearchSpace:
    """What the search needs from the caller; the callables hide onnx/onnxruntime from the algorithm."""

    score: Callable[[FallbackConfig], dict]  # quantize with the config, run the held-out split: metrics
    gates: Callable[[dict], bool]  # True when every searchable gate holds
    shares: Callable[[FallbackConfig], Shares]
    rank_values: Callable[[], list[list[str]]]  # 16-bit rung units, most sensitive first
    rank_nodes: Callable[[str, FallbackConfig], list[str]]  # (rung, current config) -> A16W8/BF16/CPU units
    rungs: Sequence[str] = RUNGS
    max_off_int8: float = 1.0  # shares lost relative to the int8 baseline, of all MACs / counted nodes
    max_off_npu: float = 0.0
    max_nodes_off_npu: float = 0.0
    min_int8: float = 0.0  # int8 x int8 share of all MACs the result must keep (absolute)
    curve_points: int = 0  # shorter prefixes scored on a rung that fails, only to draw the curve


def _within(space: SearchSpace, shares: Shares, baseline: Shares) -> bool:
    eps = 1e-9
    return (baseline.mac_share_int8 - shares.mac_share_int8 <= space.max_off_int8 + eps
            and shares.mac_share_int8 >= space.min_int8 - eps
            and baseline.mac_share_npu - shares.mac_share_npu <= space.max_off_npu + eps
            and baseline.node_share_npu - shares.node_share_npu <= space.max_nodes_off_npu + eps)


def _with(config: FallbackConfig, rung: str, units: Sequence) -> FallbackConfig:
    if rung == "a16":
        return replace(config, promote=config.promote | {t for group in units for t in group})
    if rung == "a16w8":
        return replace(config, wide=config.wide | set(units))
    if rung == "bf16":
        return replace(config, bf16=config.bf16 | set(units), wide=config.wide - set(units))
    return replace(config, cpu=config.cpu | set(units), bf16=config.bf16 - set(units), wide=config.wide - set(units))


def search(space: SearchSpace, base: FallbackConfig = FallbackConfig()) -> FallbackResult:
    """Climb the ladder until the gates hold on the held-out split or the budget is spent.

    Per rung: take the ranked units greedily while the share budget allows (shares only, no scoring),
    score them all; if the gates still fail, keep it and go to the next rung; if they hold, bisect for the
    shortest passing prefix. About log2(units) + 1 scorings per rung; it assumes that more precision
    does not hurt (the prefix returned was measured to pass either way).
    """
    points: list[FallbackPoint] = []
    baseline = space.shares(base)
    cache: dict[FallbackConfig, FallbackPoint] = {}

    def evaluate(rung: str, k: int, config: FallbackConfig, *, score: bool = True, always: bool = False) -> FallbackPoint:
        if config in cache:
            return cache[config]
        shares = space.shares(config)
        within = _within(space, shares, baseline)
        if not (within and score) and not always:
            return FallbackPoint(rung, k, {}, shares, False, within)
        metrics = space.score(config)
        point = FallbackPoint(rung, k, metrics, shares, within and space.gates(metrics), within)
        points.append(point)
        cache[config] = point
        return point

    config = base
    best = evaluate("baseline", 0, config, always=True)
    result = FallbackResult(config, best.passed, points, best)
    if best.passed:
        result.notes.append("the gates hold without fallback")
        return result
    if not best.within_budget:
        result.notes.append(f"the baseline keeps {baseline.mac_share_int8:.1%} of MACs int8 x int8, below the "
                            f"recipe's min_mac_share_int8 {space.min_int8:.1%}: nothing can be moved")
        return result
    for rung in space.rungs:
        units = space.rank_values() if rung == "a16" else space.rank_nodes(rung, config)
        units = [u for u in units if _new(config, rung, u)]
        if not units:
            result.notes.append(f"{rung}: nothing left to move")
            continue
        ranked = len(units)
        units = _fitting(units, lambda chosen: evaluate(rung, len(chosen), _with(config, rung, chosen),
                                                        score=False).within_budget)
        top = len(units)
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
            result.notes.append(f"{rung}: gates still fail with {top} of {ranked} units moved"
                                + ("" if top == ranked else " (the others would break the share budget)"))
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


def _fitting(units: Sequence, fits: Callable[[list], bool]) -> list:
    """The units, in ranking order, that fit the budget when taken greedily: one that would break it is
    skipped and the next ones are still tried (a big layer first in the ranking must not stop the rung)."""
    kept: list = []
    for unit in units:
        if fits([*kept, unit]):
            kept.append(unit)
    return kept


def _new(config: FallbackConfig, rung: str, unit) -> bool:
    if rung == "a16":
        return not set(unit) <= config.promote
    if rung == "a16w8":
        return unit not in config.wide | config.bf16 | config.cpu
    return unit not in config.cpu and (rung == "cpu" or unit not in config.bf16)
