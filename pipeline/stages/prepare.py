"""Prepare: make the float model NPU-ready: static shapes, opset 17, folded constants and BatchNorm.

Steps, in order: fix dynamic input dims to the recipe's static shapes (ONNX sources); convert the opset to
the recipe's (17 by default); clamp additive attention-mask constants (float32 min) to -1e4, which
changes no float result but gives the mask path a range an integer format can represent; shape
inference; onnxruntime's basic graph optimizations (constant folding, Conv+BatchNorm and Conv+Add
fusion, redundant node removal), which emit standard ONNX ops only. The result is run against the
exported model on one calibration sample, so a broken rewrite fails here, not three stages later.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import open_dataset
from ..errors import ModelError, StageError
from ..onnx_utils import load_onnx, make_session, model_opset, save_onnx, static_input_shapes
from ..recipe import Recipe
from ..runner import RunContext, Stage

__all__ = ["PrepareStage", "MASK_FLOOR"]

# Additive masks written as float32 min (-3.4e38) are clamped to this; exp(-1e4) is 0 in float32 anyway.
MASK_FLOOR = -1.0e4


def fix_input_shapes(model, recipe: Recipe) -> list[str]:
    """Set every graph input's dims to the recipe's static shape; returns what changed."""
    declared = {s.name: s for s in recipe.inputs}
    changed = []
    for name, dims in static_input_shapes(model).items():
        spec = declared.get(name)
        if spec is None:
            raise ModelError(f"inputs: the model has an input '{name}' that the recipe does not declare")
        if len(dims) != len(spec.shape):
            raise ModelError(
                f"inputs.{name}.shape: the recipe gives rank {len(spec.shape)} {spec.shape}, "
                f"the model's input has rank {len(dims)} {dims}"
            )
        for d, (have, want) in enumerate(zip(dims, spec.shape)):
            if isinstance(have, int) and have != 0 and have != want:
                raise ModelError(
                    f"inputs.{name}.shape[{d}]: the recipe says {want}, the model fixes it to {have}"
                )
        value = next(v for v in model.graph.input if v.name == name)
        for dim, want in zip(value.type.tensor_type.shape.dim, spec.shape):
            if not dim.HasField("dim_value") or dim.dim_value != want:
                changed.append(f"{name}: {dim.dim_param or '?'} -> {want}")
                dim.Clear()
                dim.dim_value = want
    # Stale value_info of dynamic shapes would contradict the new static dims; inference rebuilds it.
    del model.graph.value_info[:]
    for value in model.graph.output:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()
    return changed


def clamp_mask_constants(model) -> int:
    """Clamp float constants at or below -1e30 (additive-mask fill values) to MASK_FLOOR."""
    from onnx import numpy_helper

    count = 0
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for tensor in tensors:
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind == "f" and array.size and (array <= -1e30).any():
            clamped = np.where(array <= -1e30, np.asarray(MASK_FLOOR, array.dtype), array)
            tensor.CopyFrom(numpy_helper.from_array(clamped, tensor.name))
            count += 1
    return count


class PrepareStage(Stage):
    name = "prepare"
    sections = ("inputs", "export")
    after = ("export",)

    def run(self, ctx: RunContext, out: Path) -> dict:
        import onnx

        recipe = ctx.recipe
        source = ctx.require("export", "model.onnx")
        model = load_onnx(source, where="exported model")
        changed = fix_input_shapes(model, recipe)
        opset_before = model_opset(model)
        if opset_before != recipe.export.opset:
            from onnx import version_converter

            try:
                model = version_converter.convert_version(model, recipe.export.opset)
            except Exception as err:  # the converter raises bare RuntimeErrors per unsupported op
                raise StageError(
                    f"prepare: cannot convert opset {opset_before} to {recipe.export.opset}: {err}"
                ) from None
        masks = clamp_mask_constants(model)
        try:
            model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        except Exception as err:
            raise StageError(f"prepare: shape inference failed on {source}: {err}") from None
        staged = out / "staged.onnx"
        save_onnx(model, staged)
        optimized = out / "model.onnx"
        _ort_basic_optimize(staged, optimized)
        staged.unlink()
        final = onnx.shape_inference.infer_shapes(onnx.load(str(optimized)), data_prop=True)
        save_onnx(final, optimized)
        dynamic = {k: v for k, v in static_input_shapes(final).items() if not all(isinstance(d, int) for d in v)}
        if dynamic:
            raise StageError(f"prepare: inputs still have dynamic dims: {dynamic}")
        leftover_bn = sum(1 for n in final.graph.node if n.op_type == "BatchNormalization")
        max_diff = _compare_with_export(ctx, source, optimized)
        ops: dict[str, int] = {}
        for node in final.graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        return {
            "opset": model_opset(final),
            "opset_before": opset_before,
            "fixed_dims": changed,
            "mask_constants_clamped": masks,
            "nodes_before": len(load_onnx(source).graph.node),
            "nodes_after": len(final.graph.node),
            "batchnorm_left": leftover_bn,
            "max_abs_diff_vs_export": max_diff,
            "op_histogram": dict(sorted(ops.items())),
        }


def _ort_basic_optimize(source: Path, target: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Basic level: EP-independent rewrites only (constant folding, Conv+BN fusion); the file stays portable.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise StageError(f"prepare: onnxruntime cannot optimise the model: {err}") from None


def _compare_with_export(ctx: RunContext, exported: Path, prepared: Path) -> float:
    """Max abs difference of all outputs between the exported and the prepared model on one sample."""
    sample = next(iter(open_dataset(ctx.recipe, "calibration", limit=1)))
    before = make_session(exported, optimize=False)
    feeds = {k: v for k, v in sample.items()}
    try:
        want = before.run(None, feeds)
    except Exception as err:  # a model that rejects the declared inputs
        raise ModelError(f"inputs: the exported model rejects the recipe's inputs: {err}") from None
    have = make_session(prepared, optimize=False).run(None, feeds)
    diff = max(float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0 for a, b in zip(want, have))
    # Optimizations reorder float math; beyond this the rewrite changed what the model computes.
    tolerance = max(1e-3, 10 * ctx.recipe.export.atol) * max(1.0, max(float(np.abs(a).max()) for a in want))
    if diff > tolerance:
        raise StageError(f"prepare: the prepared model differs from the exported one by {diff:.3g} (> {tolerance:.3g})")
    return diff
