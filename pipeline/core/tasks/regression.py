"""Regression: an output judged by its values alone (SQNR, relative and max error, worst channel, dead
channels: the generic float metrics). Also the task to name for an output that only needs its own
`channel_axis` or `allow_dead_channels`."""

from __future__ import annotations

from typing import Literal

import numpy as np

from .base import OutputSettings, TaskKind, register_task

__all__ = ["RegressionSettings"]


class RegressionSettings(OutputSettings):
    task: Literal["regression"] = "regression"


class _Accumulator:
    def __init__(self, settings: RegressionSettings, shape: tuple[int, ...]) -> None:
        pass

    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        pass

    def result(self, labels: np.ndarray | None) -> dict:
        return {}


register_task(TaskKind(
    name="regression",
    settings=RegressionSettings,
    metrics=frozenset(),
    accumulator=_Accumulator,
    summary="values only: SQNR, relative/max error, worst channel, dead channels",
))
