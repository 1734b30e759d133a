"""Recurrent state inputs (`inputs[].from_output`), recorded from the float model over the data's sequence.

A streaming model (a GRU/LSTM cell exported one step at a time, a voice-activity detector) takes its
previous state as an input. Calibrating it on zeros, or on random states, measures ranges no real run
produces. Here the data source's samples are walked in order as one sequence: the first sample of each
sequence gets the input's `initial` value, and sample i gets the float model's output `from_output` of
sample i-1, computed on that sample with its own recorded state. So calibration and validation see the
states the float model itself reaches, and the quantized model is judged on the same states as the float
one. A sequence restarts at sample 0, every `reset_every` samples, and where the data kind says a new one
begins (each audio file's first window).

Without a float model (`npu-pipeline check`, which runs no stage), states stay at their initial value.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..core.onnx_io import make_session
from ..errors import DataError
from .base import Batch, DataSource

__all__ = ["with_states", "INITIAL_STATES"]

# `state_model` value meaning: feed every state its initial value (nothing is run).
INITIAL_STATES = "initial"


def _initial(spec) -> np.ndarray:
    return np.full(spec.shape, spec.initial, dtype=spec.dtype)


def with_states(source: DataSource, states: list, model: Path | str, constants: dict[str, np.ndarray]) -> DataSource:
    """`source` with every state input filled in (see the module docstring). `constants` are fed to a
    model that still takes them as inputs (the exported model, before prepare folds them)."""

    def starts_sequence(index: int, spec) -> bool:
        return index == 0 or index in source.starts or (spec.reset_every is not None and index % spec.reset_every == 0)

    def batches() -> Iterator[Batch]:
        session = None if model == INITIAL_STATES else make_session(Path(model))
        taken = {i.name for i in session.get_inputs()} if session is not None else set()
        fixed = {k: v for k, v in constants.items() if k in taken}
        outputs = [s.from_output for s in states]
        previous: list[np.ndarray] | None = None
        for index, batch in enumerate(source):
            current = {
                spec.name: _initial(spec) if previous is None or starts_sequence(index, spec) else previous[k]
                for k, spec in enumerate(states)
            }
            if session is not None:
                try:
                    previous = session.run(outputs, {**fixed, **batch, **current})
                except Exception as err:  # onnxruntime's own error classes: a shape or dtype the model rejects
                    raise DataError(f"inputs: recording recurrent states, the float model rejects sample {index}: {err}") from None
                for spec, value in zip(states, previous):
                    if list(value.shape) != list(spec.shape) or value.dtype != np.dtype(spec.dtype):
                        raise DataError(
                            f"inputs.{spec.name}.from_output: output '{spec.from_output}' is {value.dtype}"
                            f"{list(value.shape)}, the state input takes {spec.dtype}{list(spec.shape)}"
                        )
            yield {**batch, **current}

    return DataSource(source.description, [*source.inputs, *states], source.count, batches, source.labels, source.starts)
