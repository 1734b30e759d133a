"""Export: a PyTorch builder (or an existing ONNX file) to `export/model.onnx`, checked against torch.

For a builder, the model is exported with the TorchScript exporter at the recipe's opset and static
shapes, then run with onnxruntime on the builder's example inputs; every output must match torch within
the recipe's `export.atol`, else the stage fails with a per-output table. The written opset is checked:
torch's dynamo exporter has been seen to write opset 18 when asked for 17 without raising. A builder
module next to the recipe is importable (`pipeline.core.entrypoints`).

An ONNX file is checked against the recipe's inputs (every mismatch at once) and written back as one
self-contained file: weights stored in external-data files beside it are loaded and inlined, so later
stages never depend on files outside the run folder, and the cache key covers those files' content.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.entrypoints import entry_point_source, import_entry_point, recipe_folder_on_path
from ..core.fileio import sha256_file
from ..core.onnx_io import load_onnx, model_opset, run_session, save_onnx
from ..core.signature import clear_nonpositive_dims, external_data_files, onnx_signature, signature_problems
from ..errors import ModelError, StageError
from ..recipe import Recipe
from ..runner import RunContext, Stage

__all__ = ["ExportStage", "load_builder", "builder_problems", "load_source_onnx", "check_op_domains"]


def load_builder(recipe: Recipe):
    """Import the recipe's builder `module:function` (trusted code by design) and call it."""
    spec = recipe.model.builder
    func = import_entry_point(spec, recipe.base_dir, where="model.builder", missing=ModelError, failing=StageError)
    # A string argument naming a file next to the recipe is passed as an absolute path, so builders
    # need not know where the recipe lives.
    args = {key: _file_or_value(recipe, value) for key, value in recipe.model.args.items()}
    try:
        with recipe_folder_on_path(recipe.base_dir, spec.partition(":")[0]):
            built = func(**args)
    except (Exception, SystemExit) as err:  # the user's own code failed (or tried to end the process)
        kind = "called sys.exit" if isinstance(err, SystemExit) else f"raised {type(err).__name__}"
        raise StageError(f"export: the model builder {spec} {kind}: {err}") from err
    if not (isinstance(built, tuple) and len(built) == 2):
        raise ModelError(f"model.builder: {spec} must return (torch module, example inputs tuple)")
    module_obj, example = built
    example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    return module_obj, example


def builder_problems(recipe: Recipe, example) -> list[str]:
    """Every way the builder's example inputs disagree with the recipe's inputs (count, shapes, dtypes)."""
    if len(example) != len(recipe.inputs):
        return [f"inputs: the builder gives {len(example)} example input(s), the recipe declares {len(recipe.inputs)}"]
    problems = []
    for spec, tensor in zip(recipe.inputs, example):
        shape, dtype = list(getattr(tensor, "shape", [])), str(getattr(tensor, "dtype", type(tensor).__name__))
        if shape != spec.shape:
            problems.append(f"inputs.{spec.name}.shape: the recipe says {spec.shape}, the builder's example is {shape}")
        if dtype.removeprefix("torch.") != spec.dtype:
            problems.append(f"inputs.{spec.name}.dtype: the recipe says {spec.dtype}, the builder's example is {dtype}")
    return problems


def load_source_onnx(recipe: Recipe):
    """The recipe's ONNX file with its external data loaded, checked against the recipe's inputs."""
    source = recipe.resolve(recipe.model.onnx)
    missing = [f for f in external_data_files(source) if not f.is_file()]
    if missing:
        raise ModelError(
            f"model.onnx: {source} keeps its weights in external data file(s) {', '.join(f.name for f in missing)}, "
            f"missing beside it in {source.parent} (copy them next to the model)"
        )
    model = load_onnx(source, where="model.onnx")
    check_op_domains(model, source)
    problems = signature_problems(*onnx_signature(model), recipe.inputs, where=str(source))
    if problems:
        raise ModelError(problems[0] if len(problems) == 1 else
                         f"{len(problems)} mismatches between the recipe and {source}:\n" + "\n".join(f"  {p}" for p in problems))
    return model


def _file_or_value(recipe: Recipe, value):
    """A string naming an existing file (relative to the recipe) becomes its absolute path."""
    path = recipe.resolve(Path(value)) if isinstance(value, str) else None
    return str(path) if path is not None and path.exists() else value


def _builder_fingerprint(recipe: Recipe) -> dict:
    """What a builder's output depends on: its source file and any file it is given as an argument."""
    source = entry_point_source(recipe.model.builder, recipe.base_dir)
    files = {}
    for name, value in sorted(recipe.model.args.items()):
        path = recipe.resolve(Path(str(value))) if isinstance(value, str) else None
        if path is not None and path.is_file():
            files[name] = sha256_file(path)
    return {
        "source": sha256_file(source) if source is not None else recipe.model.builder.partition(":")[0],
        "files": files,
    }


class ExportStage(Stage):
    name = "export"
    sections = ("model", "inputs", "export")
    outputs = ("model.onnx",)
    revision = 2  # 2: ONNX sources re-serialised (external data inlined, -1/0 dims cleared), not copied

    def extra_key(self, ctx: RunContext) -> dict:
        recipe = ctx.recipe
        if recipe.model.onnx is not None:
            path = recipe.resolve(recipe.model.onnx)
            if not path.is_file():
                raise ModelError(f"model.onnx: {path} does not exist (fix the path in the recipe)")
            external = {f.name: sha256_file(f) for f in external_data_files(path) if f.is_file()}
            return {"onnx": sha256_file(path), **({"external_data": external} if external else {})}
        return _builder_fingerprint(recipe)

    def run(self, ctx: RunContext, out: Path) -> dict:
        recipe = ctx.recipe
        target = out / "model.onnx"
        if recipe.model.onnx is not None:
            model = load_source_onnx(recipe)
            cleared = clear_nonpositive_dims(model)  # -1 / 0 "any" dims, as some exporters (Paddle) store them
            external = external_data_files(recipe.resolve(recipe.model.onnx))
            try:
                save_onnx(model, target)  # external data inlined: the stage's output stands alone
            except ValueError as err:  # protobuf's 2 GiB limit on one serialised message
                raise ModelError(f"model.onnx: the model with its weights is over 2 GiB, which this pipeline "
                                 f"does not handle ({err})") from None
            return {"source": "onnx", "opset": model_opset(model), "external_data_inlined": [f.name for f in external],
                    "nonpositive_dims_cleared": cleared}
        return _export_builder(recipe, target)


# Operator domains onnxruntime's CPU EP implements; anything else is a custom op it cannot load.
_RUNTIME_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


def check_op_domains(model, where: Path) -> None:
    """Custom-domain ops (no kernel here) fail now, naming the user's file, not a scratch copy later."""
    local = {(f.domain, f.name) for f in model.functions}  # model-local functions are inlined: fine
    unknown = [n for n in model.graph.node if n.domain not in _RUNTIME_DOMAINS and (n.domain, n.op_type) not in local]
    if unknown:
        node = unknown[0]
        ops = sorted({f"{n.domain}:{n.op_type}" for n in unknown})
        raise ModelError(
            f"model.onnx: {where}: node '{node.name or node.op_type}' uses {node.domain}:{node.op_type}, a custom "
            f"operator onnxruntime has no kernel for ({len(unknown)} node(s): {', '.join(ops[:5])}); export the "
            "model with standard ONNX operators"
        )


def _export_builder(recipe: Recipe, target: Path) -> dict:
    import torch

    # Weights come from the builder; nothing random may change between runs.
    torch.manual_seed(0)
    module, example = load_builder(recipe)
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"model.builder: {recipe.model.builder} returned {type(module).__name__}, not a torch module")
    problems = builder_problems(recipe, example)
    if problems:
        raise ModelError("; ".join(problems))
    module.eval()
    with torch.no_grad():
        expected = module(*example)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    output_names = ["output"] if len(expected) == 1 else [f"output_{i}" for i in range(len(expected))]
    with torch.no_grad():
        torch.onnx.export(
            module,
            example,
            str(target),
            input_names=[s.name for s in recipe.inputs],
            output_names=output_names,
            opset_version=recipe.export.opset,
            dynamo=False,  # the TorchScript exporter honours the opset; dynamo wrote 18 when asked for 17
            do_constant_folding=True,
        )
    model = load_onnx(target, where="exported model")
    opset = model_opset(model)
    if opset != recipe.export.opset:
        raise StageError(f"export: torch wrote opset {opset}, the recipe asks for {recipe.export.opset}")
    feeds = {s.name: t.numpy() for s, t in zip(recipe.inputs, example)}
    got = run_session(target, feeds, optimize=True)
    rows, failures, diffs = [], [], {}
    for name, want, have in zip(output_names, expected, got):
        want = want.detach().numpy()
        ok = want.shape == have.shape
        diff = float(np.max(np.abs(want.astype(np.float64) - have))) if ok and want.size else float("inf")
        diffs[name] = diff
        ok = ok and diff <= recipe.export.atol
        rows.append(f"  {'ok ' if ok else 'BAD'} {name}: shape {list(have.shape)}, max abs diff {diff:.3g}")
        if not ok:
            failures.append(name)
    if failures:
        table = "\n".join(rows)
        raise StageError(
            f"export: ONNX output differs from torch beyond atol={recipe.export.atol} on "
            f"{', '.join(failures)}:\n{table}\n(raise export.atol if the model is numerically sensitive)"
        )
    return {"source": "builder", "opset": opset, "max_abs_diff": diffs}
