"""Validation tasks: what an output means beyond tensor error, one module per kind (a registry).

classification (top-1 agreement over a class axis, confident positions, accuracy with labels), embedding
(nearest-neighbour agreement), regression (values only), detection (YOLO-style decode + NMS, boxes
matched), ctc (sequence recognition: non-blank steps, decoded strings), dense (thresholded maps, IoU).
Every output also gets the generic metrics of its dtype (`outputs.OutputEvaluator`).
"""

from __future__ import annotations

import numpy as np

from .base import (
    FLOAT_METRICS, GENERIC_METRICS, INTEGER_METRICS, OutputSettings, TaskAccumulator, TaskKind, known_metrics,
    register_task, task_kinds, task_schemas,
)
from .outputs import OutputEvaluator, OutputPlan, plan_outputs

__all__ = [
    "OutputSettings", "TaskAccumulator", "TaskKind", "register_task", "task_kinds", "task_schemas", "known_metrics",
    "FLOAT_METRICS", "INTEGER_METRICS", "GENERIC_METRICS", "OutputEvaluator", "OutputPlan", "plan_outputs",
    "task_metrics", "gate_holds",
]


def task_metrics(task: str, ref: np.ndarray, got: np.ndarray, labels: np.ndarray | None,
                 settings: OutputSettings | None = None) -> dict:
    """Task metrics of one output stacked over samples (first axis), with the task's default settings
    unless given (the fallback's held-out scoring and the study scripts; validation streams instead)."""
    kind = task_kinds().get(task)
    if kind is None:
        return {}
    settings = settings or kind.settings()
    acc = kind.accumulator(settings, tuple(ref.shape))
    for i in range(len(ref)):
        acc.update(ref[i:i + 1], got[i:i + 1])
    metrics = acc.result(labels)
    metrics.pop("not_measured", None)
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def gate_holds(value: float | None, minimum: float | None, maximum: float | None) -> bool:
    """Whether `value` is within the gate's bounds (a missing bound does not bind; no value never holds)."""
    if value is None:
        return False
    return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)


from . import classification, embedding, regression, detection, ctc, dense  # noqa: E402,F401,I001  (register)
