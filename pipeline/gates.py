"""Accuracy gates: the recipe's thresholds, and the default ones, checked against the validate stage's metrics.

A recipe gate reads one metric of one output (`output:`; default: the task output). A metric the output's
task reports but the data could not give (no box detected by the float model, no confident position)
fails its gate with the reason, never passes silently. A metric the output cannot report at all is a
recipe error (exit 2).

Default gate: every float output must have no dead channel (a channel the quantized model holds constant
while the float one varies: a detector's class scores rounded to 0 next to its box coordinates). It fails
the run (exit 4) unless the recipe waives it with a reason (`validation.allow_dead_channels`, or
`validation.outputs.<output>.allow_dead_channels`). A recurrent state output (fed back to an input by
`inputs[].from_output`) is waived by its nature: nobody reads it but the model, which is judged on the
outputs the state feeds; its dead channels are still reported.

Default floor: a CTC, dense or detection output that no recipe gate reads must keep its task above a floor
(`TASK_FLOORS`: half of the float model's non-blank characters, of its thresholded map, of its boxes).
Below it the task is broken whatever its SQNR says (PP-OCR's recognizer read 4.5% of the characters,
with no dead channel and no gate to catch it). A recipe gate on the output, any metric, replaces the floor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .core.tasks import GENERIC_METRICS, gate_holds, known_metrics, plan_outputs
from .errors import GateError, RecipeError
from .recipe import Gate

__all__ = ["GateResult", "TASK_FLOORS", "evaluate_gates", "dead_channel_gates", "task_floor_gates",
           "raise_for_failures", "check_outputs"]

# task -> (metric, minimum): the default floor of an output of that task no recipe gate reads.
TASK_FLOORS = {"ctc": ("nonblank_agreement", 50.0), "dense": ("map_iou", 50.0), "detection": ("boxes_matched", 50.0)}

_DEAD_FIX = ("the tensor feeding this output mixes ranges (e.g. a Concat of box coordinates and scores): keep "
             "the range guard on (quantization.range_guard), exclude the node that mixes them "
             "(quantization.exclude_nodes), or, if these channels do not matter, waive the check with "
             "validation.outputs.{output}.allow_dead_channels: <reason>")


@dataclass(frozen=True)
class GateResult:
    metric: str
    value: float | None
    min: float | None
    max: float | None
    passed: bool
    output: str | None = None  # the output whose metric it reads (None in results of older runs)
    note: str = ""  # why a value is missing, what a default gate found, or the reason it was waived
    default: bool = False  # a gate the pipeline applies unless the recipe waives it (dead channels)

    def describe(self) -> str:
        bounds = " and ".join(
            part for part in (
                f">= {self.min:g}" if self.min is not None else "",
                f"<= {self.max:g}" if self.max is not None else "",
            ) if part
        )
        where = f" of output '{self.output}'" if self.output else ""
        value = f"{self.value:.4g}" if self.value is not None else "not measured"
        text = f"{self.metric}{where} = {value} (needs {bounds})"
        return f"{text}: {self.note}" if self.note and not self.passed else text

    def as_dict(self) -> dict:
        return asdict(self)


def _output_metrics(metrics: dict, output: str | None, where: str) -> tuple[str, dict]:
    outputs = metrics.get("outputs") or {}
    name = output or metrics.get("task_output")
    if name not in outputs:
        raise RecipeError(f"{where}: the model has no output '{name}' (its outputs: {', '.join(outputs)})")
    return name, outputs[name]


def evaluate_gates(gates: list[Gate], metrics: dict, *, validation=None, states: dict[str, str] | None = None) -> list[GateResult]:
    """The recipe's gates, then the default dead-channel gates (`validation`: the recipe's section, for
    the waivers)."""
    results = []
    for index, gate in enumerate(gates):
        name, measured = _output_metrics(metrics, gate.output, f"gates.{index}.output")
        missing = measured.get("not_measured", {})
        if gate.metric in missing:
            results.append(GateResult(gate.metric, None, gate.min, gate.max, False, name, missing[gate.metric]))
            continue
        if gate.metric not in measured:
            available = ", ".join(sorted(k for k, v in measured.items()
                                         if isinstance(v, (int, float)) and not isinstance(v, bool)))
            task = measured.get("task") or "none"
            raise RecipeError(
                f"gates.{index}.metric: '{gate.metric}' is not measured for output '{name}' (task {task}, "
                f"{measured.get('dtype', '?')}; available: {available})"
            )
        value = float(measured[gate.metric])
        results.append(GateResult(gate.metric, value, gate.min, gate.max, gate_holds(value, gate.min, gate.max), name))
    return results + dead_channel_gates(metrics, validation, states) + task_floor_gates(gates, metrics)


def task_floor_gates(gates: list[Gate], metrics: dict) -> list[GateResult]:
    """The default task floor of every CTC, dense and detection output no recipe gate reads (module
    docstring); none where the data cannot measure the metric (a float model that detects no box)."""
    gated = {gate.output or metrics.get("task_output") for gate in gates}
    results = []
    for name, measured in (metrics.get("outputs") or {}).items():
        floor = TASK_FLOORS.get(measured.get("task"))
        if floor is None or name in gated or not isinstance(measured.get(floor[0]), (int, float)):
            continue
        metric, minimum = floor
        value = float(measured[metric])
        passed = value >= minimum
        note = "" if passed else (f"default floor of a {measured['task']} output: below {minimum:g}% its task is "
                                  f"broken; gate the output in the recipe (gates: {{metric: {metric}, output: {name}, "
                                  "min: ...}) to set your own")
        results.append(GateResult(metric, value, minimum, None, passed, name, note, default=True))
    return results


def dead_channel_gates(metrics: dict, validation=None, states: dict[str, str] | None = None) -> list[GateResult]:
    """One default gate per float output with channels: no dead channel, unless waived with a reason.
    `states`: {state output: the input it feeds}, waived (see the module docstring)."""
    results = []
    states = states or {}
    for name, measured in (metrics.get("outputs") or {}).items():
        if "dead_channels" not in measured:
            continue
        dead = int(measured["dead_channels"])
        waiver = _waiver(validation, name) or (
            f"recurrent state fed back to input '{states[name]}', judged through the outputs it feeds"
            if name in states else None)
        if dead == 0:
            results.append(GateResult("dead_channels", 0.0, None, 0.0, True, name, default=True))
            continue
        found = (f"{dead} of {measured['channels']} channels on axis {measured['channel_axis']} "
                 f"({measured['dead_channel_list']}) quantized to a constant while the float ones vary "
                 f"(worst channel SQNR {measured['sqnr_db_worst_channel']:.1f} dB)")
        note = f"{found}; waived: {waiver}" if waiver else f"{found}; fix: {_DEAD_FIX.format(output=name)}"
        results.append(GateResult("dead_channels", float(dead), None, 0.0, bool(waiver), name, note, default=True))
    return results


def _waiver(validation, output: str) -> str | None:
    if validation is None:
        return None
    declared = validation.outputs.get(output)
    if declared is not None and declared.allow_dead_channels:
        return declared.allow_dead_channels
    return validation.allow_dead_channels


def check_outputs(gates: list[Gate], validation, names: list[str], *, where: str = "recipe") -> None:
    """Before anything runs, once the model's output names are known: every output the recipe names
    exists, and every gate's metric is one its output's task reports. Raises one RecipeError listing all."""
    problems = []
    named = [*validation.outputs, *([validation.output] if validation.output else [])]
    problems += [f"validation: the model has no output '{n}'" for n in dict.fromkeys(named) if n not in names]
    problems += [f"gates.{i}.output: the model has no output '{g.output}'"
                 for i, g in enumerate(gates) if g.output is not None and g.output not in names]
    if not problems:
        plan = plan_outputs(names, **validation.plan_arguments())
        for i, gate in enumerate(gates):
            settings = plan.settings[gate.output or plan.task_output]
            allowed = known_metrics(settings.task) if settings is not None else GENERIC_METRICS
            if gate.metric not in allowed:
                task = settings.task if settings is not None else "none (generic metrics)"
                problems.append(f"gates.{i}.metric: '{gate.metric}' is not measured for task '{task}' (output "
                                f"'{gate.output or plan.task_output}')")
    if problems:
        raise RecipeError(f"{where}: " + "; ".join(problems) + f" (the model's outputs: {', '.join(names)})")


def raise_for_failures(recipe_name: str, results: list[GateResult], report: str) -> None:
    failed = [r for r in results if not r.passed]
    if failed:
        detail = "; ".join(r.describe() for r in failed)
        raise GateError(f"{recipe_name}: {len(failed)} accuracy gate(s) failed: {detail} (report: {report})")
