"""Task metrics: what a validation task means for the outputs, beyond tensor error (`core.metrics`).

classification: top-1 agreement with the float model (and accuracy against labels when given);
embedding: nearest-neighbour agreement (does each sample's nearest neighbour among the set stay the same).
Inputs are the task output stacked over samples (first axis).
"""

from __future__ import annotations

import numpy as np

from .metrics import nearest_neighbours

__all__ = ["task_metrics", "gate_holds"]


def task_metrics(task: str, ref: np.ndarray, got: np.ndarray, labels: np.ndarray | None) -> dict:
    """Task metrics on the task output, stacked over samples (first axis)."""
    ref2, got2 = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
    metrics: dict[str, float] = {}
    if task == "classification":
        ref_top, got_top = ref2.argmax(axis=1), got2.argmax(axis=1)
        metrics["top1_agreement"] = 100.0 * float((ref_top == got_top).mean())
        if labels is not None:
            labels = labels.reshape(-1)[: len(ref_top)]
            metrics["accuracy_float"] = 100.0 * float((ref_top == labels).mean())
            metrics["accuracy"] = 100.0 * float((got_top == labels).mean())
            metrics["accuracy_drop"] = metrics["accuracy_float"] - metrics["accuracy"]
    elif task == "embedding" and len(ref2) > 1:
        metrics["nn_agreement"] = 100.0 * float((nearest_neighbours(ref2) == nearest_neighbours(got2)).mean())
    return metrics


def gate_holds(value: float, minimum: float | None, maximum: float | None) -> bool:
    """Whether `value` is within the gate's bounds (a missing bound does not bind)."""
    return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
