"""Dense maps: a probability or score map (a text detector's [N, 1, H, W] map, a segmentation mask)
thresholded at the recipe's value on both models, then compared as regions.

map_iou: intersection over union of the thresholded maps, pooled over the set (sums of intersections
over sums of unions); map_iou_min: the worst sample's IoU (a sample empty in both counts as 100%);
pixel_agreement: elements on the same side of the threshold.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .base import OutputSettings, TaskKind, register_task

__all__ = ["DenseSettings"]


class DenseSettings(OutputSettings):
    task: Literal["dense"] = "dense"
    threshold: float = 0.3  # a value above it is "in" the map (DBNet binarises its probability map at 0.3)


class _Accumulator:
    def __init__(self, settings: DenseSettings, shape: tuple[int, ...]) -> None:
        self.t = settings.threshold
        self.inter = self.union = self.elements = self.same = self.positive = 0
        self.worst = 100.0

    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        for r, g in zip(ref, got):
            a, b = r > self.t, g > self.t
            inter, union = int((a & b).sum()), int((a | b).sum())
            self.inter += inter
            self.union += union
            self.elements += a.size
            self.same += int((a == b).sum())
            self.positive += int(a.sum())
            self.worst = min(self.worst, 100.0 * inter / union if union else 100.0)

    def result(self, labels: np.ndarray | None) -> dict:
        if not self.elements:
            return {}
        out: dict = {"pixel_agreement": 100.0 * self.same / self.elements,
                     "float_positive_share": 100.0 * self.positive / self.elements}
        if self.positive:
            out["map_iou"] = 100.0 * self.inter / self.union
            out["map_iou_min"] = self.worst
        else:
            reason = (f"the float map never exceeds threshold {self.t:g}: no region to compare (check the "
                      "threshold and the validation data)")
            out["not_measured"] = {"map_iou": reason, "map_iou_min": reason}
        return out


register_task(TaskKind(
    name="dense",
    settings=DenseSettings,
    metrics=frozenset({"map_iou", "map_iou_min", "pixel_agreement", "float_positive_share"}),
    accumulator=_Accumulator,
    summary="maps thresholded on both models: IoU (pooled and worst sample), pixel agreement",
))
