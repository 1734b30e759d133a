"""Runs stages in order over a run folder, with a content-addressed cache and atomic outputs.

Layout of a run folder (`build/<recipe name>/` unless the recipe or `--out` says otherwise):

    export/     model.onnx, stage.json
    prepare/    model.onnx, stage.json
    calibrate/  stats.npz, tensors.json, stage.json
    quantize/   model.onnx, ranges.json, stage.json
    validate/   metrics.json, stage.json
    artifact/   the deployable bundle (package stage), stage.json

A stage declares the files it writes (`outputs`, and `optional_outputs` it may write); the runner checks
that a finished stage wrote every required file and nothing undeclared, so the files between stages are a
contract, not a convention. Each stage's `stage.json` holds its cache key: a hash of the recipe sections it reads, the keys of the
stages it reads from, the content of any user file it reads, and the versions of the libraries that shape
it. An unchanged stage is skipped. A stage writes into a temporary folder that is renamed into place only
when it finished, so a killed run never leaves a half-written stage behind, and a lock file serialises
two processes converting into the same folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from . import __version__
from .core.fileio import UMASK as _UMASK
from .core.fileio import atomic_write, dump_json
from .errors import PipelineError, StageError
from .recipe import Recipe

__all__ = ["Stage", "RunContext", "StageRecord", "Runner", "library_versions"]

RECORD = "stage.json"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the artifacts (cache key and manifest)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"npu-pipeline": __version__}
    for name in ("torch", "onnx", "onnxruntime", "numpy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions


@dataclass(frozen=True)
class StageRecord:
    """What `stage.json` holds: provenance for the cache, the manifest and the report."""

    stage: str
    key: str
    seconds: float
    metrics: dict = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> "StageRecord | None":
        try:
            data = json.loads((folder / RECORD).read_text())
            return cls(data["stage"], data["key"], float(data["seconds"]), data.get("metrics", {}))
        except (OSError, ValueError, KeyError, TypeError):
            return None


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: Path
    progress: bool = True

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def require(self, stage: str, filename: str) -> Path:
        """A file a finished earlier stage wrote (one of its declared outputs)."""
        path = self.stage_dir(stage) / filename
        if not path.is_file():
            raise StageError(
                f"{path} is missing: run the '{stage}' stage first (npu-pipeline {stage} RECIPE) or use 'run'"
            )
        return path

    def optional(self, stage: str, filename: str) -> Path | None:
        """One of an earlier stage's optional outputs, or None when that stage did not write it."""
        path = self.stage_dir(stage) / filename
        return path if path.is_file() else None

    def record(self, stage: str) -> StageRecord:
        record = StageRecord.load(self.stage_dir(stage))
        if record is None:
            raise StageError(f"{self.stage_dir(stage)} holds no finished '{stage}' stage: run it first")
        return record


class Stage(ABC):
    """One step of the pipeline. Subclasses set the class variables and implement `run`."""

    name: ClassVar[str]
    # The run folder's subfolder (the stage's name unless it says otherwise).
    folder: ClassVar[str | None] = None
    # Files the stage writes, always (`outputs`) or when its settings call for them (`optional_outputs`).
    outputs: ClassVar[tuple[str, ...]] = ()
    optional_outputs: ClassVar[tuple[str, ...]] = ()
    # Recipe sections whose content is part of this stage's cache key.
    sections: ClassVar[tuple[str, ...]] = ()
    # Earlier stages whose outputs this stage reads (their keys chain into this key).
    after: ClassVar[tuple[str, ...]] = ()
    # Bump when the stage's code changes what it writes.
    revision: ClassVar[int] = 1

    def extra_key(self, ctx: RunContext) -> dict:
        """Anything else the output depends on (e.g. hashes of user files the stage reads)."""
        return {}

    @abstractmethod
    def run(self, ctx: RunContext, out: Path) -> dict:
        """Write the stage's files into `out` (a fresh folder) and return its metrics."""

    @classmethod
    def folder_name(cls) -> str:
        return cls.folder or cls.name

    def check_outputs(self, out: Path) -> None:
        """The stage's contract: every required output written, nothing undeclared (a bug otherwise)."""
        written = {p.name for p in out.iterdir() if p.name != RECORD}
        missing = sorted(set(self.outputs) - written)
        extra = sorted(written - set(self.outputs) - set(self.optional_outputs))
        if missing or extra:
            raise RuntimeError(f"stage '{self.name}' broke its declared outputs: missing {missing}, undeclared {extra}")

    def key(self, ctx: RunContext) -> str:
        material = {
            "stage": self.name,
            "revision": self.revision,
            "sections": ctx.recipe.section_json(*self.sections) if self.sections else "",
            "after": {name: ctx.record(name).key for name in self.after},
            "extra": self.extra_key(ctx),
            "versions": library_versions(),
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


@dataclass
class StageOutcome:
    name: str
    record: StageRecord
    cached: bool


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on a run folder: a second process converting the same recipe waits its turn."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / ".lock", "a+")
    except OSError as err:  # a parent is a file, a read-only mount, no permission...
        raise PipelineError(
            f"output folder {run_dir}: cannot write there ({err.strerror or err}); "
            "choose another --out or fix the recipe's output"
        ) from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(run_dir: Path, stage: str) -> None:
    """A killed run's scratch and trash folders of one stage (`.<stage>.<mkdtemp suffix>`, `.<stage>.old.<pid>`).

    Called under the run lock, so no live process is writing them. The pattern is exact because `--out`
    may name a folder that also holds the user's own hidden files. Stage folders themselves are complete
    or absent by construction (see `_swap_into_place`).
    """
    pattern = re.compile(rf"\.{re.escape(stage)}\.(old\.\d+|[a-z0-9_]{{8}})")
    for entry in run_dir.iterdir():
        if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


class Runner:
    """Runs a sequence of stages for one recipe into one run folder."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        *,
        force: bool = False,
        progress: bool = True,
        on_stage: Callable[[StageOutcome], None] | None = None,
    ) -> None:
        self.ctx = RunContext(recipe, run_dir, progress)
        self.force = force
        self.on_stage = on_stage

    def run(self, stages: Sequence[Stage]) -> list[StageOutcome]:
        outcomes = []
        with run_lock(self.ctx.run_dir):
            for stage in stages:
                outcomes.append(self._run_one(stage))
                if self.on_stage is not None:
                    self.on_stage(outcomes[-1])
        return outcomes

    def _run_one(self, stage: Stage) -> StageOutcome:
        _remove_leftovers(self.ctx.run_dir, stage.folder_name())
        final = self.ctx.stage_dir(stage.folder_name())
        key = stage.key(self.ctx)
        existing = StageRecord.load(final)
        if not self.force and existing is not None and existing.key == key:
            return StageOutcome(stage.name, existing, cached=True)
        scratch = Path(tempfile.mkdtemp(dir=self.ctx.run_dir, prefix=f".{stage.folder_name()}."))
        os.chmod(scratch, 0o777 & ~_UMASK)
        try:
            start = time.perf_counter()
            # A PipelineError is the user's (bad input) or the model's (a failed check); anything else is a
            # bug and propagates with its traceback.
            metrics = stage.run(self.ctx, scratch)
            stage.check_outputs(scratch)
            record = StageRecord(stage.name, key, round(time.perf_counter() - start, 3), metrics)
            atomic_write(scratch / RECORD, dump_json(record.__dict__))
            _swap_into_place(scratch, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return StageOutcome(stage.name, record, cached=False)


def _swap_into_place(scratch: Path, final: Path) -> None:
    """Replace `final` by `scratch`. Readers see the old folder, no folder, or the new one, never a mix."""
    trash = None
    if final.exists():
        trash = final.with_name(f".{final.name}.old.{os.getpid()}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(scratch, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
