"""Quantize: the prepared float model to the target's format, from the calibrate stage's statistics.

Reads prepare/model.onnx and calibrate/stats.npz; runs the quantize flow (`pipeline.quant.flow`:
transforms, recollection, fallback, QDQ through onnxruntime with our ranges); writes the files below.
BF16 needs no quantizer: the NPU compiles the float32 model to bfloat16 itself, so the artifact is the
float model, and validation runs a copy that rounds to bfloat16 at every op boundary.
"""

from __future__ import annotations

from pathlib import Path

from ..core.fileio import atomic_write, dump_json
from ..core.formats import Format
from ..core.onnx_io import load_onnx, save_onnx
from ..data import open_dataset
from ..quant.bf16 import emulate_bf16
from ..quant.fallback import HeldOutFallback
from ..quant.flow import QuantizeSettings, run_quantize_flow
from ..quant.histogram import StatsCollector
from ..errors import RecipeError
from ..quant.presets import choose_preset, model_family, preset_steps
from ..recipe import Recipe
from ..runner import RunContext, Stage

__all__ = ["QuantizeStage", "holdout_batches", "resolve_settings"]


class QuantizeStage(Stage):
    name = "quantize"
    sections = ("quantization", "calibration")
    after = ("prepare", "calibrate")
    revision = 11  # 3: transforms registry; 4: range guard; 5: 16-bit values keep int8 MAC readers (requantized), A16W8 fallback rung, output-error ranges; 6: presets by model family, weight ranges, steps after quantization (AdaRound); 7: a fused activation's input takes the activation's quantization, bits included; 8: the CNN preset runs AdaRound on quantized inputs for every 8-bit activation format; 9: residual-stream equalization in the CNN preset; 10: centred depthwise inputs (explicit Pads), a shifted Clip's lower bound on its grid; 11: the CNN preset's 8-bit activation ranges by squared error
    outputs = ("model.onnx", "ranges.json")
    optional_outputs = (
        "emulated.onnx",  # the model validate runs when it differs from model.onnx (BF16, BF16 fallback nodes)
        "float.onnx",  # the float graph that was quantized, when transforms rewrote it
        "transforms.json", "fallback.json",
        "stats.npz",  # statistics recollected after transforms
    )

    def extra_key(self, ctx: RunContext) -> dict:
        recipe = ctx.recipe
        # A preset fills `calibration.method` only where the recipe is silent, and a written-out
        # `method: minmax` dumps the same as the default: whether it was written is part of the key.
        key = {"calibration_method_given": "method" in recipe.calibration.model_fields_set}
        if not recipe.quantization.fallback.enabled:
            return key
        # The fallback searches until the gates hold, scoring held-out data with the validation task's
        # metrics on this output: all three shape its result.
        v = recipe.validation
        return {**key, "gates": recipe.section_json("gates"), "task": v.task, "output": v.output,
                "outputs": {n: s.model_dump(mode="json") for n, s in v.outputs.items()},
                "allow_dead_channels": v.allow_dead_channels}

    def run(self, ctx: RunContext, out: Path) -> dict:
        target, fmt = ctx.recipe.target_and_format()
        model = load_onnx(ctx.require("prepare", "model.onnx"), where="prepared model")
        if fmt is Format.BF16:
            keep = set(ctx.recipe.quantization.exclude_nodes)
            save_onnx(model, out / "model.onnx")
            save_onnx(emulate_bf16(model, keep_float=keep), out / "emulated.onnx")
            atomic_write(out / "ranges.json", dump_json({"format": "bf16", "tensors": {}}))
            return {"format": "bf16", "target": target.name, "float_nodes": sorted(keep)}
        return _qdq(ctx, model, out, target, fmt)


def resolve_settings(recipe: Recipe, model, target, fmt: Format) -> tuple[QuantizeSettings, dict]:
    """The flow's settings: the recipe's, and its preset's where the recipe is silent
    (`pipeline.quant.presets`); plus what was taken from where, for the stage record."""
    q, calibration = recipe.quantization, recipe.calibration
    family = model_family(model)
    preset = choose_preset(q.preset, model, family=family)
    steps = [(s.name, s.settings) for s in q.transform_steps()]
    method_given = "method" in calibration.model_fields_set
    method = calibration.method if method_given else (preset.activation_method_for(fmt.spec.activation_bits)
                                                       or calibration.method)
    # The preset's 8-bit method clips for a tensor's bulk; the graph outputs (the answer) keep its general one.
    output_method = None if method_given or method == preset.activation_method else preset.activation_method
    settings = QuantizeSettings(
        target=target, fmt=fmt, method=method, percentile=calibration.percentile, exclude_nodes=tuple(q.exclude_nodes),
        transforms=steps or preset_steps(preset, power_of_two=fmt.spec.power_of_two, method=method,
                                         percentile=calibration.percentile, activation_bits=fmt.spec.activation_bits),
        transform_samples=min(q.transform_samples, calibration.samples),
        promoted_method=q.fallback.promoted_method,
        weight_method=q.weight_method or preset.weight_method, output_method=output_method,
        guard=q.range_guard, free_16bit=q.free_16bit,
        output_error_ranges=q.mac_input_ranges == "output_error",
        output_error_samples=min(q.output_error_samples, calibration.samples),
    )
    used = {"preset": preset.name, "family": family, "transforms": [n for n, _ in settings.transforms],
            "activation_method": settings.method, "weight_method": settings.weight_method or "minmax",
            **({"output_method": output_method} if output_method else {})}
    return settings, used


def _qdq(ctx: RunContext, model, out: Path, target, fmt: Format) -> dict:
    recipe = ctx.recipe
    q = recipe.quantization
    float_model = ctx.require("prepare", "model.onnx")  # records recurrent states, if the recipe has any
    settings, used = resolve_settings(recipe, model, target, fmt)
    fallback = None
    unknown = sorted(set(q.fallback.gates or ()) - {g.metric for g in recipe.gates})
    if unknown:
        raise RecipeError(f"quantization.fallback.gates: {', '.join(unknown)} is not a gate of this recipe "
                          f"(its gates: {', '.join(g.metric for g in recipe.gates) or 'none'}); list gates by metric")
    if q.fallback.enabled and recipe.gates:
        def fallback(transformed, quantize, guard):
            batches, where = holdout_batches(recipe, q.fallback.holdout, float_model)
            v = recipe.validation
            plan = v.plan_arguments()
            waived = {n for n, s in v.outputs.items() if s.allow_dead_channels} | ({"*"} if v.allow_dead_channels else set())
            waived |= {i.from_output for i in recipe.state_inputs()}  # fed back to the model, judged through it
            return HeldOutFallback(
                transformed, model, quantize, target, fmt, batches, where, recipe.gates,
                plan["task"], plan["output"], q.fallback, priority=guard.tensors, outputs=plan["declared"],
                task_given=plan["task_given"], waived=frozenset(waived),
            ).run()
    outcome = run_quantize_flow(
        model, StatsCollector.load(ctx.require("calibrate", "stats.npz")), settings,
        calibration=lambda limit: open_dataset(recipe, "calibration", limit=limit, state_model=float_model),
        fallback=fallback, progress=ctx.progress,
    )
    save_onnx(outcome.model, out / "model.onnx")
    if outcome.emulated is not None:
        save_onnx(outcome.emulated, out / "emulated.onnx")
    if outcome.fallback is not None:
        atomic_write(out / "fallback.json", dump_json(outcome.fallback.to_json()))
    if outcome.transforms is not None:
        if outcome.histograms is not None:  # the statistics the ranges came from (the report draws them)
            outcome.histograms.save(out / "stats.npz")
        save_onnx(outcome.float_model, out / "float.onnx")
        atomic_write(out / "transforms.json", dump_json(
            {"transforms": outcome.transforms.report, "stale": sorted(outcome.transforms.stale)}))
    atomic_write(out / "ranges.json", dump_json({"format": fmt.value, "tensors": outcome.ranges}))
    return {**outcome.info, "settings": used}


def holdout_batches(recipe: Recipe, holdout: int, float_model: Path | None = None) -> tuple[list[dict], str]:
    """The held-out split: the `holdout` calibration samples after the ones statistics came from.

    When the calibration data holds fewer, the last `holdout` samples are used and overlap the
    statistics' samples (said in the returned note, and so in the report).
    """
    used = recipe.calibration.samples
    batches = list(open_dataset(recipe, "calibration", limit=used + holdout, state_model=float_model))
    if len(batches) >= used + holdout:
        return batches[used:], f"calibration samples {used}..{used + holdout - 1} (not used for the statistics)"
    kept = batches[-holdout:]
    return kept, (f"the calibration data holds {len(batches)} samples, fewer than {used} + {holdout}: the held-out "
                  f"split is its last {len(kept)}, which the statistics also saw (optimistic)")
