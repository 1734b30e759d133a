"""Classification over a chosen axis: top-1 agreement with the float model, on every position and on the
positions the float model is sure of, and accuracy against labels when the data has them.

An output [N, C] has one prediction per sample; [N, T, C] (a direction classifier per text line, a
per-timestep head) has one per position along the other axes: the class axis is chosen (`axis`), never
flattened into one argmax (5% "top-1" where per-timestep agreement was 97%). An integer output (an ArgMax
inside the graph) holds the class ids themselves and is compared exactly.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from .base import OutputSettings, TaskKind, register_task, resolve_axis

__all__ = ["ClassificationSettings", "class_axis"]


class ClassificationSettings(OutputSettings):
    task: Literal["classification"] = "classification"
    # Class axis of the output (batch axis first); default: the only axis longer than 1, else the last one.
    axis: int | None = None
    # top1_agreement_confident: positions whose float top-1 probability exceeds this.
    confidence: float = Field(default=0.5, ge=0.0, lt=1.0)
    # How probabilities are read: softmax of logits, or the output as is; auto: as is when every position
    # of a sample is non-negative and sums to 1, else softmax.
    scores: Literal["auto", "logits", "probabilities"] = "auto"


def class_axis(settings: ClassificationSettings, shape: tuple[int, ...]) -> int | None:
    if len(shape) < 2:
        return None
    if settings.axis is not None:
        return resolve_axis(settings.axis, len(shape), "classification axis")
    longer = [a for a in range(1, len(shape)) if shape[a] > 1]
    return longer[0] if len(longer) == 1 else len(shape) - 1


def _probabilities(values: np.ndarray, how: str) -> np.ndarray:
    """values [P, C] -> probabilities [P, C]."""
    v = values.astype(np.float64)
    if how == "probabilities" or (how == "auto" and v.min() >= 0 and np.allclose(v.sum(1), 1.0, atol=1e-3)):
        return v
    e = np.exp(v - v.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


class _Accumulator:
    def __init__(self, settings: ClassificationSettings, shape: tuple[int, ...]) -> None:
        self.settings = settings
        self.axis = class_axis(settings, shape)
        self.ref: list[np.ndarray] = []  # per run: float top-1 per position
        self.got: list[np.ndarray] = []
        self.sure: list[np.ndarray] = []  # per run: float top-1 probability > confidence
        self.integer: bool | None = None

    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        if self.integer is None:
            self.integer = ref.dtype.kind in "iub"
        if self.integer:  # class ids already
            self.ref.append(ref.reshape(-1).astype(np.int64))
            self.got.append(got.reshape(-1).astype(np.int64))
            return
        if self.axis is None:  # one value per sample: nothing to choose between
            raise ValueError("classification needs an output with a class axis (it has one value per sample); "
                             "use task: regression for a score")
        r = np.moveaxis(ref, self.axis, -1)
        r = r.reshape(-1, r.shape[-1])
        g = np.moveaxis(got, self.axis, -1)
        g = g.reshape(-1, g.shape[-1])
        self.ref.append(r.argmax(1))
        self.got.append(g.argmax(1))
        self.sure.append(_probabilities(r, self.settings.scores).max(1) > self.settings.confidence)

    def result(self, labels: np.ndarray | None) -> dict:
        if not self.ref:
            return {}
        ref, got = np.concatenate(self.ref), np.concatenate(self.got)
        agree = ref == got
        out: dict = {"class_axis": self.axis, "positions": int(agree.size),
                     "top1_agreement": 100.0 * float(agree.mean())}
        missing = {}
        if self.sure:
            sure = np.concatenate(self.sure)
            out["confident_share"] = 100.0 * float(sure.mean())
            if sure.any():
                out["top1_agreement_confident"] = 100.0 * float(agree[sure].mean())
            else:
                missing["top1_agreement_confident"] = (
                    f"the float model's top-1 probability exceeds {self.settings.confidence:g} at no position "
                    "(lower validation.outputs.<output>.confidence, or check scores: logits/probabilities)")
        else:
            missing["top1_agreement_confident"] = "the output holds class ids, not scores"
        if labels is not None:
            flat = np.asarray(labels).reshape(-1)
            if flat.size < ref.size:
                raise ValueError(f"the validation labels hold {flat.size} values for {ref.size} predicted positions "
                                 f"({len(self.ref)} samples); give one label per position")
            flat = flat[: ref.size]
            out["accuracy_float"] = 100.0 * float((ref == flat).mean())
            out["accuracy"] = 100.0 * float((got == flat).mean())
            out["accuracy_drop"] = out["accuracy_float"] - out["accuracy"]
        if missing:
            out["not_measured"] = missing
        return out


register_task(TaskKind(
    name="classification",
    settings=ClassificationSettings,
    metrics=frozenset({"top1_agreement", "top1_agreement_confident", "confident_share", "accuracy",
                       "accuracy_float", "accuracy_drop"}),
    accumulator=_Accumulator,
    channel_axis=class_axis,
    integer_outputs=True,
    summary="top-1 agreement over a class axis (all positions, confident ones), accuracy with labels",
))
