"""A recipe gate (`gates:` entries): a bound on one metric of one output, and the check that its metric is
one the output's task reports (made when the recipe loads). Here, below the recipe, so the metric names
come from the task registry; `pipeline.recipe` re-exports `Gate`."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, model_validator

from ..schema import StrictModel as _Strict
from .base import known_metrics

__all__ = ["Gate", "Metric", "check_gates_measurable"]


def _known_metric(name: str) -> str:
    if name not in known_metrics():
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(sorted(known_metrics()))}")
    return name


# A metric some output can report: the generic ones of every output and those of the registered tasks.
Metric = Annotated[str, AfterValidator(_known_metric)]


class Gate(_Strict):
    """A threshold on one validation metric of one output: `min` and/or `max`. `accuracy_drop` is in points
    (pt). `output`: the model output whose metric is read (default: the task output)."""

    metric: Metric
    min: float | None = None
    max: float | None = None
    output: str | None = None

    @model_validator(mode="after")
    def _has_bound(self) -> "Gate":
        if self.min is None and self.max is None:
            raise ValueError(f"gate on {self.metric!r} needs 'min' or 'max'")
        return self


def check_gates_measurable(gates: list[Gate], validation) -> list[str]:
    """Gates whose metric the output's task cannot report, as messages (empty: all measurable). An output
    the recipe does not describe is checked against the model's outputs when the model is known."""
    problems = []
    for index, gate in enumerate(gates):
        task = validation.task_of(gate.output)
        if task is None and gate.output is not None and gate.output in validation.outputs:
            task = validation.outputs[gate.output].task
        if task is None:
            continue
        if gate.metric not in known_metrics(task):
            which = f"output '{gate.output}'" if gate.output else "the task output"
            problems.append(f"gates[{index}].metric: '{gate.metric}' is not measured for {which} (task {task}; "
                            f"it reports: {', '.join(sorted(known_metrics(task)))})")
    return problems
