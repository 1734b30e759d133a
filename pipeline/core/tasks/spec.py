"""The recipe's view of validation that lives below the recipe: which output has which task (`OutputsSpec`,
the base of `recipe.ValidationSettings`), the gates (`Gate`: a bound on one metric of one output), and the
check that a gate's metric is one its output's task reports, made when the recipe loads. Here, so the
task and metric names come from the registry; `pipeline.recipe` re-exports `Gate`.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import AfterValidator, Field, model_validator

from ..schema import StrictModel as _Strict
from .base import known_metrics, task_kinds, task_schemas

__all__ = ["Gate", "Metric", "OutputsSpec", "OutputTask", "gate_problems"]


def _known_task(name: str) -> str:
    if name not in task_kinds():
        raise ValueError(f"unknown task {name!r}; known: {', '.join(task_kinds())}")
    return name


# Per-output validation settings: one schema per registered task, told apart by `task`.
OutputTask = Annotated[Union[task_schemas()], Field(discriminator="task")]


class OutputsSpec(_Strict):
    """Which output has which task (README: Validation)."""

    # Task of the task output (the output gates without `output:` read). Legacy spelling of
    # `outputs: {<output>: {task: ...}}`; kept so old recipes keep their metric names and gates.
    task: Annotated[str, AfterValidator(_known_task)] = "classification"
    # Which model output is the task output (default: the model's first when `task` is given, else the
    # first of `outputs`, else the model's first).
    output: str | None = None
    # Per output: its task and the task's settings. Outputs not named get the generic metrics of their
    # dtype (SQNR, worst channel, dead channels; exact agreement for integer outputs).
    outputs: dict[str, OutputTask] = Field(default_factory=dict)
    # A reason: waives the default dead-channel gate for every output (per output: allow_dead_channels).
    allow_dead_channels: str | None = Field(default=None, min_length=3)

    @model_validator(mode="after")
    def _one_task_per_output(self):
        name = self.task_output_name()
        declared = self.outputs.get(name) if name is not None else None
        if declared is not None and "task" in self.model_fields_set and declared.task != self.task:
            raise ValueError(f"task '{self.task}' and outputs.{name}.task '{declared.task}' disagree "
                             f"(give the task once, in outputs.{name})")
        return self

    def task_output_name(self) -> str | None:
        """The task output's name when the recipe says it (None: the model's first output)."""
        if self.output is not None or "task" in self.model_fields_set:
            return self.output
        return next(iter(self.outputs), None)

    def plan_arguments(self) -> dict:
        """What `pipeline.core.tasks.plan_outputs` needs besides the model's output names."""
        return {"declared": dict(self.outputs), "output": self.task_output_name(), "task": self.task,
                "task_given": "task" in self.model_fields_set}

    def task_of(self, output: str | None) -> str | None:
        """The task of `output` (None: the task output) when the recipe alone says it; None if unknown."""
        task_output = self.task_output_name()
        if output is None or output == task_output:
            declared = self.outputs.get(task_output) if task_output is not None else None
            return declared.task if declared is not None else self.task
        declared = self.outputs.get(output)
        return declared.task if declared is not None else None


def _known_metric(name: str) -> str:
    if name not in known_metrics():
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(sorted(known_metrics()))}")
    return name


# A metric some output can report: the generic ones of every output and those of the registered tasks.
Metric = Annotated[str, AfterValidator(_known_metric)]
# A bound is a finite number: `.nan` compares false with everything and `.inf` never binds.
Bound = Annotated[float, Field(allow_inf_nan=False)]


class Gate(_Strict):
    """A threshold on one validation metric of one output: `min` and/or `max`. `accuracy_drop` is in points
    (pt). `output`: the model output whose metric is read (default: the task output)."""

    metric: Metric
    min: Bound | None = None
    max: Bound | None = None
    output: str | None = None

    @model_validator(mode="after")
    def _has_bound(self) -> "Gate":
        if self.min is None and self.max is None:
            raise ValueError(f"gate on {self.metric!r} needs 'min' or 'max'")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"gate on {self.metric!r}: min {self.min:g} is above max {self.max:g}; no value can pass")
        return self


_NEEDS_LABELS = {"accuracy", "accuracy_drop", "accuracy_float"}
# Metrics reported in percent (0-100). A `min` between 0 and 1 on one is a fraction written where a
# percentage belongs (`map_iou: {min: 0.8}`): a gate every broken model passes.
PERCENT_METRICS = frozenset({
    "top1_agreement", "top1_agreement_confident", "accuracy", "nn_agreement", "boxes_matched", "boxes_precision",
    "step_agreement", "nonblank_agreement", "string_agreement", "map_iou", "map_iou_min", "pixel_agreement",
    "exact_agreement", "sample_agreement",
})


def gate_problems(gates: list[Gate], spec: OutputsSpec, *, has_labels: bool | None) -> list[str]:
    """Gates whose metric their output's task never reports, or that need labels the data lacks
    (`has_labels` None: unknown, e.g. a builder data kind), as messages; empty when all are measurable.
    An output the recipe does not describe is checked once the model's outputs are known
    (`pipeline.gates.check_outputs`)."""
    problems = []
    for index, gate in enumerate(gates):
        if gate.metric in PERCENT_METRICS and gate.min is not None and 0 < gate.min < 1:
            problems.append(f"gates.{index}.min: {gate.min:g} on '{gate.metric}', a percentage (0-100): every model "
                            f"passes it; write {gate.min * 100:g} for {gate.min * 100:g}%")
        task = spec.task_of(gate.output)
        if task is None:
            continue
        which = f"output '{gate.output}'" if gate.output else "the task output"
        if gate.metric not in known_metrics(task):
            problems.append(f"gates.{index}.metric: '{gate.metric}' is not measured for task '{task}' ({which}; "
                            f"measured: {', '.join(sorted(known_metrics(task)))})")
        elif gate.metric in _NEEDS_LABELS and has_labels is False and spec.task_of(None) == task and (
                gate.output is None or gate.output == spec.task_output_name()):
            problems.append(f"gates.{index}.metric: '{gate.metric}' needs labels; set validation.data.labels "
                            "(or gate on top1_agreement: agreement with the float model)")
    return problems
