"""`npu-pipeline check`: everything `run` would refuse about a recipe, found at once, without running a stage.

In the order `run` meets them: the recipe's schema (all errors at once, as `load_recipe` reports them);
the output folder (can it be created and written, is it a run folder or empty, is each stage folder in it
one npu-pipeline finished); the model (the ONNX file, its external data and its
signature against `inputs`, or the builder: imported, called, its example inputs against `inputs`); the
calibration data, `quantization.exclude_nodes`, the validation data, `validation.output` and the gates'
metrics (are they measured for the task). Each data source is opened and every sample the recipe would
use is read and checked (names, shapes, dtypes, NaN/inf, labels), as calibrate and validate would. The
builder is trusted code, run as `run` runs it; nothing is written. An ONNX model is run on the first
sample of each data source, as prepare and validate run it (inputs it rejects, outputs that overflow).

What only running can tell is not checked: whether the exporter and onnxruntime accept the model, what
prepare makes of it, and the accuracy. Recurrent states are fed their initial value here (recording them
needs the prepared model). A recipe whose model is a builder gets no output or node-name checks (they need
the export).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .api import STAGES, stage_by_name
from .core.onnx_io import load_onnx, make_session
from .core.signature import TensorSig, external_data_files, onnx_signature, signature_problems
from .data import INITIAL_STATES, open_dataset
from .data.labels import check_class_labels
from .errors import DataError, ModelError, OutputError, PipelineError, RecipeError, StageError
from .gates import check_outputs
from .recipe import Recipe, load_recipe
from .runner import MARKER, StageRecord
from .stages.export import builder_problems, check_op_domains, load_builder

__all__ = ["CheckReport", "check_recipe", "LABEL_METRICS"]



@dataclass
class CheckReport:
    """What `check` found: the problems `run` would stop at (in its order), and notes it would accept."""

    path: Path
    recipe: Recipe
    problems: list[PipelineError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)  # what was checked, for the user

    def raise_for_problems(self) -> None:
        """One error listing every problem; its class (so its exit code) is that of the first one `run`
        would meet."""
        if not self.problems:
            return
        first = self.problems[0]
        if len(self.problems) == 1:
            raise type(first)(str(first))
        lines = "\n".join("  - " + str(p).replace("\n", "\n    ") for p in self.problems)
        raise type(first)(f"{self.path}: {len(self.problems)} problems that 'run' would refuse:\n{lines}")


# Metrics only measured against labels (what a gate may not name when the validation data has none).
LABEL_METRICS = frozenset({"accuracy", "accuracy_drop", "accuracy_float"})


def _output_problem(run_dir: Path) -> PipelineError | None:
    """What the runner would refuse about the run folder, found without writing: a parent that is a file or
    not writable, a folder holding the user's files, a stage folder npu-pipeline did not finish."""
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                reason = f"{folder} is a file"
            elif not os.access(folder, os.W_OK | os.X_OK):
                reason = f"no permission to write in {folder}"
            else:
                break
            return OutputError(f"output folder {run_dir}: cannot write there ({reason}); "
                               "choose another --out or fix the recipe's output")
    if not run_dir.is_dir() or (run_dir / MARKER).is_file():
        return _stage_folder_problem(run_dir)
    entries = sorted(run_dir.iterdir())
    stage_folders = {stage_by_name(name).folder_name() for name in STAGES}
    ours = any(e.name == ".lock" for e in entries) and all(
        e.name.startswith(".") or (e.name in stage_folders and StageRecord.load(e) is not None) for e in entries)
    if entries and not ours:
        shown = ", ".join(e.name for e in entries[:5]) + (", ..." if len(entries) > 5 else "")
        return OutputError(f"output folder {run_dir} is not empty ({shown}) and is not an npu-pipeline run folder "
                           f"(no {MARKER}); choose another --out (or the recipe's output)")
    return _stage_folder_problem(run_dir)


def _stage_folder_problem(run_dir: Path) -> PipelineError | None:
    for name in STAGES:
        stage = stage_by_name(name)
        final = run_dir / stage.folder_name()
        if final.exists() or final.is_symlink():
            if final.is_symlink() or not final.is_dir() or StageRecord.load(final) is None:
                return OutputError(f"{final} exists but is not a finished '{stage.name}' stage (no stage.json): it was "
                                   "not written by npu-pipeline, so it is left alone; move it away or choose another --out")
    return None


def _first_sample_runs(recipe: Recipe, model: Path, section: str, source, report: CheckReport) -> None:
    """Run the ONNX source on the section's first sample, as prepare (calibration) and validate do."""
    import numpy as np

    try:
        sample = next(iter(source))
        session = make_session(model, optimize=False)
        constants = {s.name: s.constant_array() for s in recipe.constant_inputs()}
        outputs = session.run(None, {**constants, **sample})
    except PipelineError:
        return  # the data check above reported it
    except Exception as err:  # onnxruntime's own error classes: inputs the model rejects
        report.problems.append(ModelError(f"inputs: the model rejects the recipe's inputs: {err}"))
        return
    for meta, value in zip(session.get_outputs(), outputs):
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            where = "calibration data" if section == "calibration" else f"validation data ({source.description})"
            report.problems.append(DataError(
                f"{where}, sample 0: the float model's output '{meta.name}' is NaN/inf on it (values this large "
                "overflow float32 inside the model); scale the data as the model expects"))
            return


def _check_onnx(recipe: Recipe, report: CheckReport) -> tuple[list[TensorSig], set[str]] | None:
    """The ONNX source's outputs and node names, or None when it cannot be read."""
    source = recipe.resolve(recipe.model.onnx)
    if not source.is_file():
        report.problems.append(ModelError(f"model.onnx: {source} does not exist (fix the path in the recipe)"))
        return None
    missing = [f for f in external_data_files(source) if not f.is_file()]
    if missing:
        report.problems.append(ModelError(
            f"model.onnx: {source} keeps its weights in external data file(s) {', '.join(f.name for f in missing)}, "
            f"missing beside it in {source.parent} (copy them next to the model)"))
        return None
    try:
        model = load_onnx(source, where="model.onnx")
    except ModelError as err:
        report.problems.append(err)
        return None
    try:
        check_op_domains(model, source)
    except ModelError as err:
        report.problems.append(err)
        return None
    inputs, outputs = onnx_signature(model)
    report.problems += [ModelError(p) for p in signature_problems(inputs, outputs, recipe.inputs, where=str(source))]
    report.facts.append(f"model {source.name}: inputs " + ", ".join(f"{i.name} {list(i.dims or [])} {i.dtype}" for i in inputs)
                        + "; outputs " + ", ".join(f"{o.name} {list(o.dims or [])}" for o in outputs))
    return outputs, {n.name for n in model.graph.node}


def _check_builder(recipe: Recipe, report: CheckReport) -> None:
    try:
        module, example = load_builder(recipe)  # trusted code, called as export calls it
    except (ModelError, StageError) as err:
        report.problems.append(err)
        return
    import torch

    if not isinstance(module, torch.nn.Module):
        report.problems.append(ModelError(
            f"model.builder: {recipe.model.builder} returned {type(module).__name__}, not a torch module"))
        return
    report.problems += [ModelError(p) for p in builder_problems(recipe, example)]
    report.facts.append(f"model {recipe.model.builder}: example inputs "
                        + ", ".join(f"{list(getattr(t, 'shape', []))}" for t in example))
    report.notes.append("model.builder: outputs and node names are not checked (they need the export)")


def _check_data(recipe: Recipe, section: str, report: CheckReport):
    """Open the section's data and read every sample run would read; returns the source or None."""
    try:
        source = open_dataset(recipe, section, state_model=INITIAL_STATES)
        count, shapes = 0, ""
        for index, batch in enumerate(source):
            if index == 0:
                shapes = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in batch.items())
            count += 1
    except (DataError, RecipeError, ModelError) as err:
        report.problems.append(err)
        return None
    labels = f", {len(source.labels)} labels" if source.labels is not None else ""
    report.facts.append(f"{section}: {source.description}: {count} sample(s) of {shapes}{labels}")
    return source


def _classes(recipe: Recipe, onnx_info) -> int | None:
    """The classifier's class count: the static last dim of the task output, when the ONNX file states it."""
    if onnx_info is None:
        return None
    outputs = {o.name: o for o in onnx_info[0]}
    task = outputs.get(recipe.validation.output) if recipe.validation.output else onnx_info[0][0] if onnx_info[0] else None
    last = task.dims[-1] if task is not None and task.dims else None
    return last if isinstance(last, int) and last > 0 else None


def _same_source(recipe: Recipe) -> bool:
    keys = {"kind", "path", "builder", "args"}
    cal, val = recipe.calibration.data, recipe.validation.data
    return cal.model_dump(include=keys) == val.model_dump(include=keys) and getattr(cal, "split", None) is None


def check_recipe(path: Path | str) -> CheckReport:
    """Everything `run` would refuse about the recipe at `path` (see the module docstring)."""
    path = Path(path)
    recipe = load_recipe(path)  # a schema error ends here: nothing else can be read reliably
    report = CheckReport(path, recipe)
    output = _output_problem(recipe.output_dir())
    if output is not None:
        report.problems.append(output)
    before = len(report.problems)
    onnx_info = _check_onnx(recipe, report) if recipe.model.onnx is not None else _check_builder(recipe, report)
    calibration = _check_data(recipe, "calibration", report)
    # The model runs only when it fits the recipe and the data fits it (else those problems say it all).
    runnable = onnx_info is not None and len(report.problems) == before
    if runnable and calibration is not None:
        _first_sample_runs(recipe, recipe.resolve(recipe.model.onnx), "calibration", calibration, report)
    if onnx_info is not None:
        unknown = sorted(set(recipe.quantization.exclude_nodes) - onnx_info[1])
        if unknown:
            report.problems.append(RecipeError(f"quantization.exclude_nodes: no node named {', '.join(unknown)} in the model"))
    validation = _check_data(recipe, "validation", report)
    if runnable and validation is not None and len(report.problems) == before:
        _first_sample_runs(recipe, recipe.resolve(recipe.model.onnx), "validation", validation, report)
    if onnx_info is not None:  # the outputs the recipe names, and each gate's metric, against the model
        try:
            check_outputs(list(recipe.gates), recipe.validation, [o.name for o in onnx_info[0]], where=str(path))
        except PipelineError as err:
            report.problems.append(err)
    task = recipe.validation.task_of(None)
    if validation is not None and validation.labels is not None and task == "classification":
        try:  # what validate checks before computing an accuracy
            check_class_labels(validation.labels, f"validation.data.labels ({validation.description})",
                               classes=_classes(recipe, onnx_info))
        except DataError as err:
            report.problems.append(err)
    labels = (validation.labels is not None) if validation is not None else (
        getattr(recipe.validation.data, "labels", None) is not None)
    for index, gate in enumerate(recipe.gates):
        if gate.metric in LABEL_METRICS and gate.output is None and not labels:
            report.problems.append(RecipeError(
                f"gates.{index}.metric: '{gate.metric}' needs labels (validation.data.labels), and the validation "
                "data has none; gate on top1_agreement instead, or give labels"))
    if _same_source(recipe):
        report.notes.append("calibration and validation read the same data: validation then measures on calibration "
                            "samples (give both data sections split: {seed: 0, validation: 0.3})")
    if recipe.state_inputs():
        report.notes.append("recurrent states (" + ", ".join(s.name for s in recipe.state_inputs())
                            + ") were fed their initial value here; run records them with the float model")
    return report
