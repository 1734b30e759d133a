"""The library entry points the CLI (and users' own scripts) call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ReadinessError
from .gates import GateResult, raise_for_failures
from .recipe import Recipe
from .runner import Runner, Stage, StageOutcome

__all__ = ["STAGES", "RunResult", "stage_by_name", "run_recipe", "run_stage", "raise_for_readiness"]


# Stage name -> "module:class"; imported on use so that one stage's heavy imports never slow another.
_STAGE_CLASSES = {
    "export": "export:ExportStage",
    "prepare": "prepare:PrepareStage",
    "calibrate": "calibrate:CalibrateStage",
    "quantize": "quantize:QuantizeStage",
    "validate": "validate:ValidateStage",
    "package": "package:PackageStage",
}
STAGES = tuple(_STAGE_CLASSES)


def stage_by_name(name: str, **settings) -> Stage:
    """A stage by name; `settings` go to its constructor (package: `sign_key`)."""
    import importlib

    module, _, cls = _STAGE_CLASSES[name].partition(":")
    return getattr(importlib.import_module(f"pipeline.stages.{module}"), cls)(**settings)


def _stages(sign_key: Path | None = None) -> list[Stage]:
    return [stage_by_name(name, **({"sign_key": sign_key} if name == "package" and sign_key else {}))
            for name in STAGES]


@dataclass
class RunResult:
    recipe: Recipe
    run_dir: Path
    outcomes: list[StageOutcome]

    @property
    def artifact(self) -> Path:
        return self.run_dir / "artifact"

    # Read from the stage records the runner returned while it held the run lock, not from the files,
    # which a concurrent --force run may be swapping at this moment.
    def _record(self, stage: str) -> dict:
        return next(o.record.metrics for o in self.outcomes if o.name == stage)

    @property
    def metrics(self) -> dict:
        return self._record("validate")

    @property
    def gates(self) -> list[GateResult]:
        return [GateResult(**g) for g in self._record("package")["gates"]]

    @property
    def violations(self) -> list[str]:
        """The hard NPU rules the artifact breaks (the first ones; placement.json lists all)."""
        return list(self._record("package").get("violations", []))


def raise_for_readiness(result: RunResult) -> None:
    """ReadinessError (exit 5) when the artifact the run packaged breaks a hard rule of its target."""
    record = result._record("package")
    if record.get("ready", True):
        return
    count = record.get("violation_count", len(result.violations))
    first = result.violations[0] if result.violations else "see placement.json"
    more = f" (and {count - 1} more; {result.artifact / 'placement.json'} lists them)" if count > 1 else ""
    raise ReadinessError(f"{result.recipe.name}: the artifact breaks a hard rule of its target: {first}{more} "
                         f"(report: {result.artifact / 'report.md'})")


def run_recipe(
    recipe: Recipe,
    *,
    out: Path | None = None,
    force: bool = False,
    progress: bool = True,
    on_stage: Callable[[StageOutcome], None] | None = None,
    check_gates: bool = True,
    sign_key: Path | None = None,
) -> RunResult:
    """Run every stage. With `check_gates`, after the artifact and its report are written: `ReadinessError`
    if the artifact breaks a hard rule of its target, else `GateError` if an accuracy gate failed.
    `sign_key`: a PEM Ed25519 private key that signs the bundle's manifest (manifest.sig)."""
    run_dir = recipe.output_dir(out)
    outcomes = Runner(recipe, run_dir, force=force, progress=progress, on_stage=on_stage).run(_stages(sign_key))
    result = RunResult(recipe, run_dir, outcomes)
    if check_gates:
        raise_for_readiness(result)
        raise_for_failures(recipe.name, result.gates, str(result.artifact / "report.md"))
    return result


def run_stage(recipe: Recipe, stage: str, *, out: Path | None = None, force: bool = True, progress: bool = True,
              sign_key: Path | None = None):
    """Run one stage alone over an existing run folder (earlier stages must have run); `sign_key` signs
    the package stage's manifest."""
    run_dir = recipe.output_dir(out)
    settings = {"sign_key": sign_key} if sign_key is not None else {}
    return Runner(recipe, run_dir, force=force, progress=progress).run([stage_by_name(stage, **settings)])[0]
