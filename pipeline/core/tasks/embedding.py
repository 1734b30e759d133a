"""Embedding: does each sample's nearest neighbour among the validation set stay the same.

Cosine and SQNR of the vectors are the generic float metrics every output gets; what this adds needs the
whole set, so it keeps one vector per sample (a few hundred floats each).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..metrics import nearest_neighbours
from .base import OutputSettings, TaskKind, register_task

__all__ = ["EmbeddingSettings"]


class EmbeddingSettings(OutputSettings):
    task: Literal["embedding"] = "embedding"


class _Accumulator:
    def __init__(self, settings: EmbeddingSettings, shape: tuple[int, ...]) -> None:
        self.ref: list[np.ndarray] = []
        self.got: list[np.ndarray] = []

    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        self.ref.append(ref.reshape(len(ref), -1).astype(np.float32))
        self.got.append(got.reshape(len(got), -1).astype(np.float32))

    def result(self, labels: np.ndarray | None) -> dict:
        ref = np.concatenate(self.ref) if self.ref else np.zeros((0, 0))
        if len(ref) < 2:
            return {"not_measured": {"nn_agreement": "nearest neighbours need at least 2 validation samples"}}
        got = np.concatenate(self.got)
        return {"nn_agreement": 100.0 * float((nearest_neighbours(ref) == nearest_neighbours(got)).mean())}


register_task(TaskKind(
    name="embedding",
    settings=EmbeddingSettings,
    metrics=frozenset({"nn_agreement"}),
    accumulator=_Accumulator,
    summary="nearest-neighbour agreement among the validation set (cosine, SQNR: generic)",
))
