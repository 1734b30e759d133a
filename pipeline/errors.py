"""One error hierarchy for everything a user can get wrong or a stage can refuse.

The CLI catches `PipelineError` only: it prints the message on one line and exits with the class's
`exit_code`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "PipelineError",
    "RecipeError",
    "DataError",
    "ModelError",
    "StageError",
    "ReadinessError",
    "GateError",
    "ParityError",
    "ArtifactError",
    "OutputError",
]


class PipelineError(Exception):
    """Root of every error the pipeline raises on purpose. Message: what, where, how to fix."""

    exit_code = 2


class RecipeError(PipelineError):
    """The recipe file is missing, not YAML, or does not fit the schema."""

    exit_code = 2


class DataError(PipelineError):
    """Calibration or validation data is missing, malformed, or does not match the model's inputs."""

    exit_code = 2


class ModelError(PipelineError):
    """A model file or builder cannot be loaded, or its inputs do not match the recipe."""

    exit_code = 2


class StageError(PipelineError):
    """A stage ran but its result is wrong (e.g. the exported ONNX model disagrees with torch)."""

    exit_code = 3


class ReadinessError(PipelineError):
    """The model breaks a hard rule of the NPU target (dynamic shape, Loop/If, non power-of-two scale...)."""

    exit_code = 5


class GateError(PipelineError):
    """An accuracy gate of the recipe failed. The report is written before this is raised."""

    exit_code = 4


class ParityError(GateError):
    """An execution provider's outputs miss the parity tolerance against the emulated NPU numerics
    (`npu-pipeline parity`). A gate like the recipe's, with its exit code: the artifact is sound as the
    NPU computes it, this EP computes something else, so CI treats it as a failed accuracy check."""


class ArtifactError(PipelineError):
    """A bundle is incomplete or was modified after packaging (a hash does not match its manifest)."""

    exit_code = 6


class OutputError(PipelineError):
    """An output cannot be written: the folder is not ours (it holds the user's own files), the disk is
    full, the path is read-only or its parent is a file. Nothing of the user's is touched."""

    exit_code = 2
