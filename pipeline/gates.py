"""Accuracy gates: the recipe's thresholds checked against the validate stage's metrics."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .core.tasks import gate_holds
from .errors import GateError, RecipeError
from .recipe import Gate

__all__ = ["GateResult", "evaluate_gates", "raise_for_failures"]


@dataclass(frozen=True)
class GateResult:
    metric: str
    value: float
    min: float | None
    max: float | None
    passed: bool

    def describe(self) -> str:
        bounds = " and ".join(
            part for part in (
                f">= {self.min:g}" if self.min is not None else "",
                f"<= {self.max:g}" if self.max is not None else "",
            ) if part
        )
        return f"{self.metric} = {self.value:.4g} (needs {bounds})"

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_gates(gates: list[Gate], metrics: dict) -> list[GateResult]:
    results = []
    for index, gate in enumerate(gates):
        if gate.metric not in metrics:
            available = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, (int, float))))
            raise RecipeError(
                f"gates[{index}].metric: '{gate.metric}' is not measured for this task "
                f"(available: {available})"
            )
        value = float(metrics[gate.metric])
        passed = gate_holds(value, gate.min, gate.max)
        results.append(GateResult(gate.metric, value, gate.min, gate.max, passed))
    return results


def raise_for_failures(recipe_name: str, results: list[GateResult], report: str) -> None:
    failed = [r for r in results if not r.passed]
    if failed:
        detail = "; ".join(r.describe() for r in failed)
        raise GateError(f"{recipe_name}: {len(failed)} accuracy gate(s) failed: {detail} (report: {report})")
