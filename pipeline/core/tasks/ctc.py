"""Sequence recognition with CTC: per-step agreement where it matters, and the decoded strings.

An output [N, T, C] (or [T, N, C]: `time_axis: 0`) holds per time step the scores of C symbols, one of
them the CTC blank. Most steps of a text line are blank, so agreement over all steps reads high while the
text is lost (97% of steps, 0 of 40 characters): the metrics that count are on the steps where the float
model reads a character, and on the strings greedy CTC decoding gives (merge repeats, drop blanks).

step_agreement: every step's argmax; nonblank_agreement: steps whose float argmax is not blank;
string_agreement: sequences decoded to the same string; char_error_rate: edit distance of the quantized
string to the float one, summed, over the float strings' length (%).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from .base import OutputSettings, TaskKind, register_task, resolve_axis

__all__ = ["CtcSettings", "ctc_greedy_decode", "edit_distance"]


class CtcSettings(OutputSettings):
    task: Literal["ctc"] = "ctc"
    blank: int = Field(default=0, ge=0)  # index of the blank symbol on the class axis
    class_axis: int = -1
    time_axis: int = 1  # 0 for [T, N, C] outputs (the batch axis is then 1)


def ctc_axis(settings: CtcSettings, shape: tuple[int, ...]) -> int | None:
    if len(shape) != 3:
        raise ValueError(f"ctc reads an output [batch, time, classes]; this one has shape {list(shape)}")
    axis = resolve_axis(settings.class_axis, 3, "ctc class_axis")
    if axis == resolve_axis(settings.time_axis, 3, "ctc time_axis"):
        raise ValueError("ctc: class_axis and time_axis are the same axis")
    if not 0 <= settings.blank < shape[axis]:
        raise ValueError(f"ctc: blank {settings.blank} is not a class index (the class axis has {shape[axis]})")
    return axis


def ctc_greedy_decode(steps: np.ndarray, blank: int) -> tuple[int, ...]:
    """Argmax per step -> symbols: repeats merged, blanks dropped."""
    if not steps.size:
        return ()
    keep = np.ones(steps.shape, dtype=bool)
    keep[1:] = steps[1:] != steps[:-1]
    return tuple(int(s) for s in steps[keep & (steps != blank)])


def edit_distance(a: tuple, b: tuple) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), one row at a time."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


class _Accumulator:
    def __init__(self, settings: CtcSettings, shape: tuple[int, ...]) -> None:
        self.s = settings
        self.class_axis = ctc_axis(settings, shape)
        self.time_axis = resolve_axis(settings.time_axis, 3, "ctc time_axis")
        self.batch_axis = ({0, 1, 2} - {self.class_axis, self.time_axis}).pop()
        self.steps = self.steps_equal = self.nonblank = self.nonblank_equal = 0
        self.sequences = self.strings_equal = self.chars = self.edits = 0

    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        order = (self.batch_axis, self.time_axis, self.class_axis)
        r = np.transpose(ref, order).argmax(2)  # [batch, time]
        g = np.transpose(got, order).argmax(2)
        equal = r == g
        real = r != self.s.blank
        self.steps += equal.size
        self.steps_equal += int(equal.sum())
        self.nonblank += int(real.sum())
        self.nonblank_equal += int((equal & real).sum())
        for a, b in zip(r, g):
            ta, tb = ctc_greedy_decode(a, self.s.blank), ctc_greedy_decode(b, self.s.blank)
            self.sequences += 1
            self.strings_equal += ta == tb
            self.chars += len(ta)
            self.edits += edit_distance(tb, ta)

    def result(self, labels: np.ndarray | None) -> dict:
        if not self.steps:
            return {}
        out: dict = {
            "step_agreement": 100.0 * self.steps_equal / self.steps,
            "nonblank_steps": self.nonblank,
            "string_agreement": 100.0 * self.strings_equal / self.sequences,
        }
        if self.nonblank:
            out["nonblank_agreement"] = 100.0 * self.nonblank_equal / self.nonblank
        if self.chars:
            out["char_error_rate"] = 100.0 * self.edits / self.chars
        if not self.nonblank:
            reason = (f"the float model reads blank (index {self.s.blank}) at every step of {self.sequences} "
                      "sequences: check blank, class_axis and the validation data")
            out["not_measured"] = {"nonblank_agreement": reason, "char_error_rate": reason}
        return out


register_task(TaskKind(
    name="ctc",
    settings=CtcSettings,
    metrics=frozenset({"step_agreement", "nonblank_agreement", "nonblank_steps", "string_agreement",
                       "char_error_rate"}),
    accumulator=_Accumulator,
    channel_axis=ctc_axis,
    summary="CTC sequences: agreement on non-blank steps, decoded-string agreement, character error rate",
))
