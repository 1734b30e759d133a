"""Prepare: make the float model NPU-ready: static shapes, opset 17, folded constants and BatchNorm.

Steps, in order: fix dynamic input dims to the recipe's static shapes (ONNX sources; a dim stored as a
name, as -1 or as 0 is dynamic, and stale shapes of outputs and intermediates are dropped so inference
rebuilds them); fold constant inputs (`inputs[].value`) into the graph as initializers; convert the opset to
the recipe's (17 by default); clamp additive attention-mask constants (float32 min) to -1e4, which
changes no float result but gives the mask path a range an integer format can represent; drop graph
inputs that are initializers (old exporters list every weight as an input; onnxruntime then treats the
weights as overridable and folds nothing); shape inference; onnxruntime's basic graph optimizations
(constant folding, Conv+BatchNorm and Conv+Add fusion, redundant node removal), which emit standard ONNX
ops only; then `fold_batchnorm` for the BatchNormalization nodes onnxruntime leaves; then fewer
quantization points (`pipeline.core.fusions`): a decomposed hardswish/hardsigmoid becomes the one op when
the recipe's target runs that op in its format, and constant Mul/Add/Sub/Div beside a Conv go into its
weights and bias (nodes named in `quantization.exclude_nodes` are left as they are). The result is run
against the exported model on one calibration sample, so a broken rewrite fails here, not three stages
later.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.fusions import fold_conv_affine, fuse_hard_activations, has_decomposed_hard_activations
from ..core.masks import MASK_FLOOR
from ..core.names import NameAllocator
from ..core.onnx_io import load_onnx, make_session, model_opset, save_onnx, static_input_shapes
from ..core.signature import onnx_signature, signature_problems
from ..data import open_dataset
from ..errors import DataError, ModelError, StageError
from ..recipe import Recipe
from ..runner import RunContext, Stage

__all__ = ["PrepareStage", "MASK_FLOOR", "fold_batchnorm", "drop_initializer_inputs", "fix_input_shapes", "fold_constant_inputs"]


def fix_input_shapes(model, recipe: Recipe) -> list[str]:
    """Set every graph input's dims to the recipe's static shape; returns what changed."""
    problems = signature_problems(*onnx_signature(model), recipe.inputs, where="the exported model")
    if problems:
        raise ModelError(problems[0] if len(problems) == 1 else "; ".join(problems))
    declared = {s.name: s for s in recipe.inputs}
    changed = []
    for name in static_input_shapes(model):
        spec = declared[name]
        value = next(v for v in model.graph.input if v.name == name)
        shape = value.type.tensor_type.shape
        if len(shape.dim) != len(spec.shape):  # the file stated no shape: give it the declared one
            del shape.dim[:]
            shape.dim.extend(type(shape).Dimension() for _ in spec.shape)
        for dim, want in zip(shape.dim, spec.shape):
            if not dim.HasField("dim_value") or dim.dim_value != want:
                was = dim.dim_param or (str(dim.dim_value) if dim.HasField("dim_value") else "?")
                changed.append(f"{name}: {was} -> {want}")
                dim.Clear()
                dim.dim_value = want
    # Stale shapes of intermediates and outputs (dynamic names, or -1/0 as some exporters store "any")
    # would contradict the new static dims; inference rebuilds them.
    del model.graph.value_info[:]
    for value in model.graph.output:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                dim.Clear()
    return changed


def fold_constant_inputs(model, recipe: Recipe) -> list[str]:
    """Turn each constant input (`inputs[].value`) into an initializer of that value; returns their names.
    onnxruntime's constant folding then propagates it through the graph."""
    from onnx import numpy_helper

    constants = {s.name: s.constant_array() for s in recipe.constant_inputs()}
    if not constants:
        return []
    kept = [v for v in model.graph.input if v.name not in constants]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    for name, array in constants.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    return sorted(constants)


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


def drop_initializer_inputs(model):
    """(model without graph inputs that name an initializer, how many were dropped), by onnx_ir's
    RemoveInitializersFromInputsPass; the IR version is raised to what the opset needs (IR < 4 required
    initializers to be listed as inputs). A model with none is returned as it is."""
    import onnx_ir as ir
    from onnx import helper
    from onnx_ir.passes.common import RemoveInitializersFromInputsPass

    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(list(model.opset_import), True))
    init = {t.name for t in model.graph.initializer}
    dropped = sum(v.name in init for v in model.graph.input)
    if not dropped:
        return model, 0
    ir_model = ir.serde.deserialize_model(model)
    RemoveInitializersFromInputsPass()(ir_model)
    return ir.serde.serialize_model(ir_model), dropped


def name_nodes(model) -> int:
    """Give every unnamed node, and every node whose name an earlier one took, a unique name
    (`<op>_<index>`): recipes (exclude_nodes), the fallback, placement and the transforms address nodes by
    name, and an exporter may leave them all empty. Returns how many were (re)named."""
    names = NameAllocator(taken=(n.name for n in model.graph.node))
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = names.fresh(f"{node.op_type}_{index}")
            renamed += 1
        seen.add(node.name)
    return renamed


def fold_batchnorm(model) -> dict[str, int]:
    """Remove the inference BatchNormalization nodes onnxruntime's basic level leaves; returns counts.

    onnxruntime fuses a BN into the Conv/ConvTranspose before it only when the BN alone reads that
    node's output (and, as for any folding, when no parameter is also a graph input): a BN after an Add
    or after a Conv with a second reader survives it. Here, with s = scale / sqrt(var + eps) and
    t = bias - mean * s:
    - BN after a Conv/ConvTranspose whose output only it reads: folded into the weights (x s per output
      channel) and the bias (b * s + t);
    - any other BN on a rank >= 3 tensor: a depthwise 1x1 Conv (group = channels, weight s, bias t), as
      AMD Quark's ConvertBNToConv does, so it is quantized and placed like any Conv.
    BNs with non-constant parameters, training mode, or a rank-2 input are left (`left` in the counts).
    Needs shape inference's value_info for the input ranks.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.input, *g.value_info, *g.output]
             if v.type.tensor_type.HasField("shape")}
    consumers: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    graph_outputs = {o.name for o in g.output}
    producer = {o: node for node in g.node for o in node.output}
    used = set(inits)

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        return name

    def add_init(base: str, array: np.ndarray) -> str:
        name = fresh(base)
        g.initializer.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    counts = {"folded": 0, "to_depthwise_conv": 0, "left": 0}
    nodes = []
    removed: set[int] = set()
    for node in g.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        params = [inits.get(name) for name in node.input[1:5]]
        extra_outputs = [o for o in node.output[1:] if o and (consumers.get(o) or o in graph_outputs)]
        if attrs.get("training_mode", 0) or extra_outputs or any(p is None for p in params):
            counts["left"] += 1
            nodes.append(node)
            continue
        scale, bias, mean, var = (numpy_helper.to_array(p).astype(np.float64) for p in params)
        s = scale / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
        t = bias - mean * s
        x, y = node.input[0], node.output[0]
        conv = producer.get(x)
        if (
            conv is not None and conv.op_type in ("Conv", "ConvTranspose") and conv.domain in ("", "ai.onnx")
            and consumers.get(x) == 1 and x not in graph_outputs and conv.input[1] in inits
            and (len(conv.input) < 3 or not conv.input[2] or conv.input[2] in inits)
        ):
            w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
            if conv.op_type == "Conv":
                w = w * s.reshape(-1, *[1] * (w.ndim - 1))
            else:  # ConvTranspose weight: [C_in, C_out / group, k...]
                group = next((a.i for a in conv.attribute if a.name == "group"), 1)
                shape = w.shape
                w = w.reshape(group, shape[0] // group, shape[1], *shape[2:])
                w = (w * s.reshape(group, 1, shape[1], *[1] * (len(shape) - 2))).reshape(shape)
            b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
            new_inputs = [conv.input[0], add_init(f"{conv.input[1]}_bn", w), add_init(f"{y}_bias", b * s + t)]
            del conv.input[:]
            conv.input.extend(new_inputs)
            conv.output[0] = y
            counts["folded"] += 1
            continue
        rank = ranks.get(x)
        if rank is None or rank < 3:
            counts["left"] += 1
            nodes.append(node)
            continue
        weight = add_init(f"{y}_dw_weight", s.reshape(-1, 1, *[1] * (rank - 2)))
        shift = add_init(f"{y}_dw_bias", t)
        nodes.append(helper.make_node(
            "Conv", [x, weight, shift], [y], name=node.name or fresh(f"{y}_dwconv"),
            group=len(s), kernel_shape=[1] * (rank - 2),
        ))
        counts["to_depthwise_conv"] += 1
    if counts["folded"] or counts["to_depthwise_conv"]:
        kept_nodes = [n.SerializeToString() for n in nodes]  # copies: the list holds messages of g.node
        del g.node[:]
        for data in kept_nodes:
            g.node.add().ParseFromString(data)
        needed = {name for node in g.node for name in node.input} | graph_outputs
        kept = [t for t in g.initializer if t.name in needed]
        del g.initializer[:]
        g.initializer.extend(kept)
    return counts


class PrepareStage(Stage):
    name = "prepare"
    sections = ("inputs", "export")
    after = ("export",)
    revision = 5  # 2: initializer inputs dropped, leftover BatchNorm folded; 3: constant inputs folded, -1 dims; 4: every node named; 5: hard activations fused, affine ops folded into Convs
    outputs = ("model.onnx",)

    def extra_key(self, ctx: RunContext) -> dict:
        # The format matters only through the hard activations it fuses, and only to a model that has
        # some: formats share one prepared model (and calibration) otherwise (`compare`'s shared cache).
        exported = ctx.stage_dir("export") / "model.onnx"
        fused = _fused_hard_activations(ctx.recipe)
        if fused and exported.is_file() and not has_decomposed_hard_activations(load_onnx(exported, where="exported model")):
            fused = []
        return {"fused_hard_activations": fused, "keep_nodes": sorted(ctx.recipe.quantization.exclude_nodes)}

    def run(self, ctx: RunContext, out: Path) -> dict:
        import onnx

        recipe = ctx.recipe
        source = ctx.require("export", "model.onnx")
        model = load_onnx(source, where="exported model")
        nodes_before = len(model.graph.node)
        changed = fix_input_shapes(model, recipe)
        folded = fold_constant_inputs(model, recipe)
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
        model, init_inputs = drop_initializer_inputs(model)
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
        batchnorm = fold_batchnorm(final)
        keep = recipe.quantization.exclude_nodes
        hard = fuse_hard_activations(final, keep, ops=_fused_hard_activations(recipe))
        affine = fold_conv_affine(final, keep)
        named = name_nodes(final)
        if batchnorm["folded"] or batchnorm["to_depthwise_conv"] or any(hard.values()) or any(affine.values()):
            del final.graph.value_info[:]
            final = onnx.shape_inference.infer_shapes(final, data_prop=True)
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
            "constant_inputs_folded": folded,
            "mask_constants_clamped": masks,
            "nodes_before": nodes_before,
            "nodes_after": len(final.graph.node),
            "initializer_inputs_dropped": init_inputs,
            "batchnorm_folded": batchnorm["folded"],
            "batchnorm_to_depthwise_conv": batchnorm["to_depthwise_conv"],
            "batchnorm_left": leftover_bn,
            "hard_activations_fused": hard,
            "affine_folded_into_conv": affine,
            "nodes_named": named,
            "max_abs_diff_vs_export": max_diff,
            "op_histogram": dict(sorted(ops.items())),
        }


def _fused_hard_activations(recipe: Recipe) -> list[str]:
    """The hard activations the recipe's target runs as one op in its format (XDNA2 A8W8: HardSwish and
    HardSigmoid; XINT8: HardSwish; A16W8 and BF16: neither, and there the decomposed ops stay on the NPU)."""
    target, fmt = recipe.target_and_format()
    return [op for op in ("HardSwish", "HardSigmoid") if target.runs(op, fmt)]


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


def _check_finite_outputs(outputs, session) -> None:
    """Inputs that overflow float32 inside the model (3e38) give inf/NaN: a data problem, named here."""
    for meta, value in zip(session.get_outputs(), outputs):
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise DataError(
                f"calibration data, sample 0: the float model's output '{meta.name}' is NaN/inf on it (values "
                "this large overflow float32 inside the model); scale the data as the model expects"
            )


def _compare_with_export(ctx: RunContext, exported: Path, prepared: Path) -> float:
    """Max abs difference of all outputs between the exported and the prepared model on one sample."""
    recipe = ctx.recipe
    # Recurrent states of the first sample are its initial values: neither model needs to run for them.
    sample = next(iter(open_dataset(recipe, "calibration", limit=1, state_model=exported)))
    constants = {s.name: s.constant_array() for s in recipe.constant_inputs()}
    before = make_session(exported, optimize=False)
    try:
        want = before.run(None, {**constants, **sample})
    except Exception as err:  # a model that rejects the declared inputs
        raise ModelError(f"inputs: the exported model rejects the recipe's inputs: {err}") from None
    _check_finite_outputs(want, before)
    have = make_session(prepared, optimize=False).run(None, sample)
    diff = max(float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0 for a, b in zip(want, have))
    # Optimizations reorder float math; beyond this the rewrite changed what the model computes.
    tolerance = max(1e-3, 10 * recipe.export.atol) * max(1.0, max(float(np.abs(a).max()) if a.size else 0.0 for a in want))
    if diff > tolerance:
        raise StageError(f"prepare: the prepared model differs from the exported one by {diff:.3g} (> {tolerance:.3g})")
    return diff
