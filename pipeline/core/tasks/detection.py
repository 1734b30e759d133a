"""Detection: YOLO-style dense predictions decoded and NMS-ed on both models, then matched.

An output [N, 4+C, anchors] (YOLOv8: `channels_first`) or [N, anchors, 4+C] (YOLOv5: `channels_last`, with
`objectness`) holds per anchor a box (`xywh`: centre, width, height; or `xyxy`: corners), any further box
parameters (`box_coords` > 4), an optional objectness, and C class scores. Each model's predictions are
decoded (best class per anchor, score above `score_threshold`), class-aware NMS at `nms_iou`, at most
`max_detections` kept; then a float box counts as matched when a quantized box of the same class overlaps
it at IoU >= `match_iou` (greedy, best float score first, each quantized box used once).

boxes_matched: share of float boxes matched (what the quantized model still finds); boxes_precision:
share of quantized boxes that match a float one (what it invents). Only per-sample counts are kept.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from .base import OutputSettings, TaskKind, register_task

__all__ = ["DetectionSettings", "decode_detections", "nms", "match_boxes"]

_MAX_CANDIDATES = 3000  # highest-scoring anchors NMS looks at (ultralytics: 30000; O(n^2) worst case here)


class DetectionSettings(OutputSettings):
    task: Literal["detection"] = "detection"
    layout: Literal["channels_first", "channels_last"] = "channels_first"
    box_format: Literal["xywh", "xyxy"] = "xywh"
    box_coords: int = Field(default=4, ge=4)  # channels before the scores; the first four are the box
    objectness: bool = False  # one channel after the box coordinates: score = objectness * class score
    score_threshold: float = Field(default=0.25, gt=0.0, lt=1.0)
    nms_iou: float = Field(default=0.5, gt=0.0, le=1.0)
    match_iou: float = Field(default=0.5, gt=0.0, le=1.0)
    max_detections: int = Field(default=300, ge=1)


def detection_axis(settings: DetectionSettings, shape: tuple[int, ...]) -> int | None:
    if len(shape) != 3:
        raise ValueError(f"detection reads an output [batch, 4+classes, anchors] or [batch, anchors, 4+classes]; "
                         f"this one has shape {list(shape)}")
    return 1 if settings.layout == "channels_first" else 2


def _xyxy(box: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "xyxy":
        return box
    cx, cy, w, h = box.T
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes a [n, 4] and b [m, 4]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, limit: int) -> np.ndarray:
    """Indices kept by greedy class-aware NMS, best score first (at most `limit`)."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < limit:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        same = classes[rest] == classes[i]
        overlap = _iou(boxes[i:i + 1], boxes[rest])[0]
        order = rest[~(same & (overlap > iou))]
    return np.asarray(keep, dtype=np.int64)


def decode_detections(pred: np.ndarray, s: DetectionSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample's predictions [anchors, K] -> (xyxy boxes, classes, scores) after threshold and NMS."""
    pred = pred.astype(np.float64)
    first = s.box_coords + (1 if s.objectness else 0)
    if pred.shape[1] <= first:
        raise ValueError(f"detection: {pred.shape[1]} values per anchor leave no class score after "
                         f"{s.box_coords} box coordinates{' and objectness' if s.objectness else ''} "
                         "(check layout and box_coords)")
    scores = pred[:, first:]
    if s.objectness:
        scores = scores * pred[:, s.box_coords:s.box_coords + 1]
    classes, best = scores.argmax(1), scores.max(1)
    idx = np.flatnonzero(best > s.score_threshold)
    if idx.size > _MAX_CANDIDATES:
        idx = idx[np.argsort(-best[idx], kind="stable")[:_MAX_CANDIDATES]]
    boxes = _xyxy(pred[idx, :4], s.box_format)
    kept = nms(boxes, best[idx], classes[idx], s.nms_iou, s.max_detections)
    return boxes[kept], classes[idx][kept], best[idx][kept]


def match_boxes(ref: tuple, got: tuple, iou: float) -> int:
    """How many float boxes a same-class quantized box matches at IoU >= `iou` (greedy, each used once)."""
    ref_boxes, ref_cls, ref_scores = ref
    got_boxes, got_cls, _ = got
    if not len(ref_boxes) or not len(got_boxes):
        return 0
    overlaps = _iou(ref_boxes, got_boxes)
    overlaps[ref_cls[:, None] != got_cls[None, :]] = 0.0
    used = np.zeros(len(got_boxes), dtype=bool)
    matched = 0
    for i in np.argsort(-ref_scores, kind="stable"):
        row = np.where(used, 0.0, overlaps[i])
        j = int(row.argmax())
        if row[j] >= iou:
            used[j] = True
            matched += 1
    return matched


class _Accumulator:
    def __init__(self, settings: DetectionSettings, shape: tuple[int, ...]) -> None:
        self.s = settings
        detection_axis(settings, shape)  # the shape check
        self.float_boxes = self.quantized_boxes = self.matched = self.samples = 0

    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        for r, g in zip(ref, got):  # one sample at a time: [K, anchors] or [anchors, K]
            if self.s.layout == "channels_first":
                r, g = r.T, g.T
            a, b = decode_detections(r, self.s), decode_detections(g, self.s)
            self.float_boxes += len(a[0])
            self.quantized_boxes += len(b[0])
            self.matched += match_boxes(a, b, self.s.match_iou)
            self.samples += 1

    def result(self, labels: np.ndarray | None) -> dict:
        out: dict = {"float_boxes": self.float_boxes, "quantized_boxes": self.quantized_boxes}
        missing = {}
        if self.float_boxes:
            out["boxes_matched"] = 100.0 * self.matched / self.float_boxes
        else:
            missing["boxes_matched"] = (
                f"the float model detects no box above score_threshold {self.s.score_threshold:g} on "
                f"{self.samples} samples: nothing to match (check the validation data, layout, box_coords, "
                "objectness and score_threshold)")
        if self.quantized_boxes:
            out["boxes_precision"] = 100.0 * self.matched / self.quantized_boxes
        else:
            missing["boxes_precision"] = "the quantized model detects no box"
        if missing:
            out["not_measured"] = missing
        return out


register_task(TaskKind(
    name="detection",
    settings=DetectionSettings,
    metrics=frozenset({"boxes_matched", "boxes_precision", "float_boxes", "quantized_boxes"}),
    accumulator=_Accumulator,
    channel_axis=detection_axis,
    summary="YOLO-style decode + NMS on both models; float boxes matched by a same-class quantized box",
))
