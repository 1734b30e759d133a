"""Runs stages in order over a run folder, with a content-addressed cache and atomic outputs.

Layout of a run folder (`build/<recipe name>/` unless the recipe or `--out` says otherwise):

    .npu-pipeline-run   marks the folder as a run folder (see below)
    timings.json        seconds each stage took when it last ran (kept out of stage.json: see below)
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

A run replaces its stage folders, so it writes only into a folder that is new, empty, or marked as a run
folder (`.npu-pipeline-run`, written first); a non-empty folder without the mark is the user's and is
refused (OutputError, exit 2) before anything is written there. A stage folder is replaced only when it
holds nothing but what that stage writes. `stage.json` holds no wall-clock time, so every file of a stage
folder (the artifact's included) is the same in two clean runs; the times go to `timings.json`. A full
disk or a read-only folder while a stage writes is an OutputError naming the file, not a traceback.
"""

from __future__ import annotations

import contextlib
import errno
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
from .errors import OutputError, StageError
from .recipe import Recipe

__all__ = ["Stage", "RunContext", "StageRecord", "Runner", "library_versions"]

RECORD = "stage.json"
MARKER = ".npu-pipeline-run"
TIMINGS = "timings.json"
_MARKER_TEXT = (
    "This folder is an npu-pipeline run folder: each run replaces the stage folders here.\n"
    "Keep no files of your own in it.\n"
)
# OSErrors that say where the output goes is unusable (not a bug): full, over quota, too big, read-only,
# not permitted, name too long.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                  errno.ENAMETOOLONG}


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
    """What `stage.json` holds (provenance for the cache, the manifest and the report), and the seconds the
    stage took, which live in the run folder's `timings.json` (0.0 when unknown)."""

    stage: str
    key: str
    seconds: float
    metrics: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return dump_json({"stage": self.stage, "key": self.key, "metrics": self.metrics})

    @classmethod
    def load(cls, folder: Path) -> "StageRecord | None":
        try:
            data = json.loads((folder / RECORD).read_text())
            seconds = data.get("seconds")  # written by versions before timings.json
            if seconds is None:
                seconds = _read_timings(folder.parent).get(folder.name, 0.0)
            return cls(data["stage"], data["key"], float(seconds), data.get("metrics", {}))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


def _read_timings(run_dir: Path) -> dict:
    try:
        data = json.loads((run_dir / TIMINGS).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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
    # Folders inside the stage folder that tools write later and a rerun may discard (a compile cache).
    disposable: ClassVar[tuple[str, ...]] = ()

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


def _unusable(run_dir: Path, err: OSError) -> OutputError:
    return OutputError(
        f"output folder {run_dir}: cannot write there ({err.strerror or err}); "
        "choose another --out or fix the recipe's output"
    )


def _ours(run_dir: Path, entries: list[Path]) -> bool:
    """A folder an earlier version made: its lock, and only folders holding a stage record or leftovers."""
    names = {entry.name for entry in entries}
    if ".lock" not in names:
        return False
    for entry in entries:
        if entry.name in (".lock", TIMINGS) or re.fullmatch(r"\.[a-z_]+\.(old\.\d+|[a-z0-9_]{8})", entry.name):
            continue
        if not (entry.is_dir() and StageRecord.load(entry) is not None):
            return False
    return True


def claim_run_dir(run_dir: Path) -> None:
    """Make `run_dir` a run folder, or refuse one that holds the user's own files (nothing is written)."""
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise OutputError(f"output folder {run_dir} is a file; choose another --out or fix the recipe's output")
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / MARKER).is_file():
            return
        entries = list(run_dir.iterdir())
    except OSError as err:  # a parent is a file, a read-only mount, no permission...
        raise _unusable(run_dir, err) from None
    if entries and not _ours(run_dir, entries):
        shown = ", ".join(sorted(e.name for e in entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputError(
            f"output folder {run_dir} is not empty ({shown}) and is not an npu-pipeline run folder (no {MARKER}); "
            "a run replaces its export/ prepare/ calibrate/ quantize/ validate/ artifact/ folders, so it writes "
            "only into a new or empty folder: choose another --out (or the recipe's output)"
        )
    try:
        with open(run_dir / MARKER, "w") as handle:  # the same text from any racing process
            handle.write(_MARKER_TEXT)
    except OSError as err:
        raise _unusable(run_dir, err) from None


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on a run folder: a second process converting the same recipe waits its turn."""
    claim_run_dir(run_dir)
    try:
        handle = open(run_dir / ".lock", "a+")
    except OSError as err:
        raise _unusable(run_dir, err) from None
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
    temporary = re.compile(rf"\.{re.escape(TIMINGS)}\.[a-z0-9_]{{8}}\.tmp")  # atomic_write's, if killed
    for entry in run_dir.iterdir():
        if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif temporary.fullmatch(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)


def _check_replaceable(stage: "Stage", final: Path) -> None:
    """Refuse to replace a stage folder that holds anything the stage does not write (the user's files)."""
    if not final.exists():
        return
    if final.is_symlink() or not final.is_dir() or StageRecord.load(final) is None:
        raise OutputError(
            f"{final} exists but is not a finished '{stage.name}' stage (no stage.json): it was not written by "
            "npu-pipeline, so it is left alone; move it away or choose another --out"
        )
    known = {RECORD, *stage.outputs, *stage.optional_outputs}
    foreign = sorted(
        entry.name for entry in final.iterdir()
        if not (entry.name in known and entry.is_file() and not entry.is_symlink())
        and not (entry.name in stage.disposable and entry.is_dir() and not entry.is_symlink())
    )
    if foreign:
        raise OutputError(
            f"{final} holds files npu-pipeline did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); a rerun of '{stage.name}' replaces the folder, so move them away"
        )


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
            for stage in stages:  # before any stage runs: a folder holding the user's files stops the run
                _check_replaceable(stage, self.ctx.stage_dir(stage.folder_name()))
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
        _check_replaceable(stage, final)
        scratch = None
        try:
            scratch = Path(tempfile.mkdtemp(dir=self.ctx.run_dir, prefix=f".{stage.folder_name()}."))
            os.chmod(scratch, 0o777 & ~_UMASK)
            start = time.perf_counter()
            # A PipelineError is the user's (bad input) or the model's (a failed check); anything else is a
            # bug and propagates with its traceback.
            metrics = stage.run(self.ctx, scratch)
            stage.check_outputs(scratch)
            record = StageRecord(stage.name, key, round(time.perf_counter() - start, 3), metrics)
            atomic_write(scratch / RECORD, record.to_json())
            _swap_into_place(scratch, final)
            timings = _read_timings(self.ctx.run_dir)
            timings[final.name] = record.seconds
            atomic_write(self.ctx.run_dir / TIMINGS, dump_json(timings))
        except OSError as err:
            if err.errno not in _OUTPUT_ERRNOS:
                raise
            what = f" ({Path(err.filename).name})" if err.filename else ""
            raise OutputError(
                f"{stage.name}: writing into {self.ctx.run_dir} failed{what}: {err.strerror} "
                "(free disk space, fix the folder's permissions, or choose another --out)"
            ) from None
        finally:
            if scratch is not None:
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
