"""Every output of a model, evaluated: generic metrics chosen by its dtype and shape, plus its task's.

- float outputs: SQNR, relative error (||q - f|| / ||f||), max |error|, cosine per sample (only when a
  sample holds more than one value: the cosine of two scalars is +-1 whatever they are), and per channel
  (`ChannelSums`): the worst channel's SQNR and the dead channels (quantized constant, float varying);
- integer and boolean outputs (ArgMax indices, masks): exact agreement of elements and of whole samples,
  never SQNR or cosine (an int64 ArgMax output is not "200 dB").

`plan_outputs` decides, from the recipe's per-output section and its legacy `task`/`output`, which output
is the task output (the one gates without `output:` read) and which task each output has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ...errors import RecipeError
from ..metrics import ChannelSums, ErrorSums, default_channel_axis
from .base import OutputSettings, TaskKind, resolve_axis, task_kinds

__all__ = ["OutputEvaluator", "OutputPlan", "plan_outputs"]


class OutputEvaluator:
    """Streams one output (float reference and quantized, per model run) into its metrics."""

    def __init__(self, name: str, settings: OutputSettings | None) -> None:
        self.name = name
        self.settings = settings
        self.kind: TaskKind | None = task_kinds()[settings.task] if settings is not None else None
        self.task = None
        self.integer: bool | None = None
        self.sums = ErrorSums()
        self.cosines: list[float] = []
        self.channels: ChannelSums | None = None
        self.equal = self.elements = self.samples = self.samples_equal = 0
        self.shape: tuple[int, ...] = ()
        self.dtype = ""

    def _start(self, ref: np.ndarray) -> None:
        self.shape, self.dtype = tuple(ref.shape), str(ref.dtype)
        self.integer = ref.dtype.kind in "iub"
        where = f"validation.outputs.{self.name}"
        try:
            if self.kind is not None:
                if self.integer and not self.kind.integer_outputs:
                    raise ValueError(f"task {self.kind.name} reads float scores; this output is {ref.dtype} "
                                     "(integer outputs are compared exactly; give it no task)")
                self.task = self.kind.accumulator(self.settings, self.shape)
            axis = self._channel_axis()
        except ValueError as err:
            raise RecipeError(f"{where}: {err}") from None
        if axis is not None and not self.integer:
            self.channels = ChannelSums(axis)

    def _channel_axis(self) -> int | None:
        explicit = self.settings.channel_axis if self.settings is not None else None
        if explicit is not None:
            return resolve_axis(explicit, len(self.shape), "channel_axis")
        if self.kind is not None and self.kind.channel_axis is not None:
            return self.kind.channel_axis(self.settings, self.shape)
        return default_channel_axis(self.shape)

    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        if self.integer is None:
            self._start(ref)
        if ref.shape != got.shape:
            raise RecipeError(f"output '{self.name}': the quantized model gives shape {list(got.shape)}, "
                              f"the float model {list(ref.shape)}")
        n = len(ref) if ref.ndim else 1
        self.samples += n
        if self.integer:
            equal = ref == got
            self.equal += int(equal.sum())
            self.elements += equal.size
            self.samples_equal += int(equal.reshape(n, -1).all(axis=1).sum())
        else:
            r = ref.astype(np.float64).reshape(n, -1)
            g = got.astype(np.float64).reshape(n, -1)
            self.sums.update(r, g)
            if r.shape[1] > 1:
                norms = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
                dots = (r * g).sum(axis=1)
                # Two all-zero vectors agree perfectly; one zero vector against a non-zero one does not.
                cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(dots == 0, 1.0, 0.0))
                self.cosines.extend(float(c) for c in cos)
            if self.channels is not None:
                self.channels.update(ref, got)
        if self.task is not None:
            try:
                self.task.update(ref, got)
            except ValueError as err:
                raise RecipeError(f"validation.outputs.{self.name}: {err}") from None

    def result(self, labels: np.ndarray | None = None) -> dict:
        out: dict = {"task": self.settings.task if self.settings is not None else None,
                     "dtype": self.dtype, "shape": list(self.shape), "samples": self.samples}
        if self.integer:
            out["exact_agreement"] = 100.0 * self.equal / self.elements if self.elements else 100.0
            out["sample_agreement"] = 100.0 * self.samples_equal / self.samples if self.samples else 100.0
        elif self.integer is not None:
            s = self.sums
            out["sqnr_db"] = round(s.sqnr_db, 3)
            out["rel_error"] = float(np.sqrt(s.noise / s.signal)) if s.signal > 0 else (0.0 if s.noise == 0 else
                                                                                           float("inf"))
            out["max_abs_error"] = float(s.max_abs)
            if self.cosines:
                cos = np.asarray(self.cosines)
                out["cosine_mean"], out["cosine_min"] = float(cos.mean()), float(cos.min())
            if self.channels is not None:
                out.update(self.channels.result())
        if self.task is not None:
            try:
                out.update(self.task.result(labels))
            except ValueError as err:
                raise RecipeError(f"validation.outputs.{self.name}: {err}") from None
        if out.get("rel_error") == float("inf"):  # JSON has no infinity: a float output of zeros, a nonzero error
            out["rel_error"] = 1e300
        return out


@dataclass(frozen=True)
class OutputPlan:
    """Which task each model output has, and which output is the task output (gates default to it)."""

    names: tuple[str, ...]
    task_output: str
    settings: Mapping[str, OutputSettings | None]

    @property
    def task(self) -> str | None:
        s = self.settings[self.task_output]
        return s.task if s is not None else None

    def evaluators(self) -> dict[str, OutputEvaluator]:
        return {n: OutputEvaluator(n, self.settings[n]) for n in self.names}


def plan_outputs(names: Sequence[str], declared: Mapping[str, OutputSettings], *, output: str | None,
                 task: str, task_given: bool = False) -> OutputPlan:
    """Resolve the recipe's `validation` (`outputs`, `output`, `task`) against the model's output names.

    The task output: `output` if given (`ValidationSettings.task_output_name` already chose between it,
    the first declared output and, None, the model's first output). It has the task `outputs` declares for
    it, else `task` with that task's default settings (`task_given`: the recipe wrote `task`, so the two
    must agree). Other outputs have the task declared for them, or none (generic metrics only).
    """
    unknown = [n for n in [*declared, *([output] if output else [])] if n not in names]
    if unknown:
        raise RecipeError(f"validation: the model has no output {', '.join(repr(n) for n in unknown)} "
                          f"(its outputs: {', '.join(names)}); fix validation.output / validation.outputs")
    task_output = output or names[0]
    settings: dict[str, OutputSettings | None] = {n: declared.get(n) for n in names}
    if settings[task_output] is None:
        settings[task_output] = task_kinds()[task].settings()
    elif task_given and settings[task_output].task != task:
        raise RecipeError(f"validation: task '{task}' is for the task output '{task_output}', which "
                          f"validation.outputs.{task_output} gives task '{settings[task_output].task}' "
                          "(give the task once, in validation.outputs)")
    return OutputPlan(tuple(names), task_output, settings)
