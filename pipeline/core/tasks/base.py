"""What every validation task shares: per-output settings, the accumulator protocol, the registry.

A task kind is a settings schema (its `task` literal names it in a recipe, `validation.outputs.<output>.task`),
the metric names it can report (so a recipe's gates are checked when the recipe is loaded, not after a
run), the channel axis its outputs have, and `accumulator(settings)`, which streams one output sample by
sample and returns the metrics. One module per kind, registered with `register_task`; adding a task is
one module plus its import in `pipeline.core.tasks`.

Accumulators keep what the metric needs and no more (argmaxes, per-sample counts, decoded strings), so
validation memory stays flat in the number of samples; embeddings are the exception (nearest neighbours
need every vector, a few hundred floats each).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from pydantic import Field

from ..schema import StrictModel

__all__ = [
    "OutputSettings", "TaskAccumulator", "TaskKind", "register_task", "task_kinds", "task_schemas",
    "FLOAT_METRICS", "INTEGER_METRICS", "GENERIC_METRICS", "known_metrics", "resolve_axis",
]

# Metrics every float output gets, whatever its task (pipeline.core.tasks.outputs).
FLOAT_METRICS = frozenset({
    "sqnr_db", "max_abs_error", "rel_error", "cosine_mean", "cosine_min", "sqnr_db_worst_channel", "dead_channels",
})
# Integer and boolean outputs (ArgMax indices, masks): compared exactly; SQNR and cosine mean nothing there.
INTEGER_METRICS = frozenset({"exact_agreement", "sample_agreement"})
GENERIC_METRICS = FLOAT_METRICS | INTEGER_METRICS


class OutputSettings(StrictModel):
    """Settings every output takes, whatever its task."""

    # Axis (of the output, batch axis first) whose channels get their own SQNR and the dead-channel check;
    # default: the task's (detection: the box/class axis; classification and CTC: the class axis), else by
    # shape (axis 1 for rank >= 4, the last axis otherwise).
    channel_axis: int | None = None
    # A reason: waives the default gate that fails a run when a channel of this output goes dead.
    allow_dead_channels: str | None = Field(default=None, min_length=3)



class TaskAccumulator(Protocol):
    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        """One model run's output, float reference and quantized, batch axis first."""

    def result(self, labels: np.ndarray | None) -> dict:
        """The task metrics; an entry "not_measured" ({metric: reason}) for those the data cannot give."""


@dataclass(frozen=True)
class TaskKind:
    name: str
    settings: type[OutputSettings]  # its pydantic schema; `task: Literal[name]` tells it apart in a recipe
    metrics: frozenset[str]  # every task metric it can report (gates are checked against these)
    accumulator: Callable[[OutputSettings, tuple[int, ...]], TaskAccumulator]  # (settings, output shape)
    # The channel axis of an output of this task (None: by shape), given the settings and the output shape.
    channel_axis: Callable[[OutputSettings, tuple[int, ...]], int | None] | None = None
    integer_outputs: bool = False  # whether it reads integer outputs (class ids) as well as float ones
    summary: str = ""


_TASKS: dict[str, TaskKind] = {}


def register_task(kind: TaskKind) -> TaskKind:
    if kind.name in _TASKS:
        raise ValueError(f"task '{kind.name}' is already registered")
    _TASKS[kind.name] = kind
    return kind


def task_kinds() -> dict[str, TaskKind]:
    """Registered task kinds by name, in registration order."""
    return dict(_TASKS)


def task_schemas() -> tuple[type, ...]:
    """The settings schema of every registered task (the recipe's `validation.outputs` union)."""
    return tuple(kind.settings for kind in _TASKS.values())


def known_metrics(task: str | None = None) -> frozenset[str]:
    """Metric names an output of `task` can report (every task's when None), generic ones included."""
    if task is None:
        return GENERIC_METRICS.union(*(k.metrics for k in _TASKS.values()))
    return GENERIC_METRICS | _TASKS[task].metrics


def resolve_axis(axis: int, rank: int, what: str) -> int:
    """A possibly negative axis made absolute, or a ValueError naming the setting."""
    if not -rank <= axis < rank:
        raise ValueError(f"{what} {axis} is out of range for an output of rank {rank}")
    return axis % rank
