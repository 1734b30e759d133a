"""Export: a PyTorch builder (or an existing ONNX file) to `export/model.onnx`, checked against torch.

For a builder, the model is exported with the TorchScript exporter at the recipe's opset and static
shapes, then run with onnxruntime on the builder's example inputs; every output must match torch within
the recipe's `export.atol`, else the stage fails with a per-output table. The written opset is checked:
torch's dynamo exporter has been seen to write opset 18 when asked for 17 without raising.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from pathlib import Path

import numpy as np

from ..core.fileio import sha256_file
from ..core.onnx_io import load_onnx, model_opset, run_session
from ..errors import ModelError, StageError
from ..recipe import Recipe
from ..runner import RunContext, Stage

__all__ = ["ExportStage", "load_builder"]


def load_builder(recipe: Recipe):
    """Import the recipe's builder `module:function` (trusted code by design) and call it."""
    module_name, _, func_name = recipe.model.builder.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelError(f"model.builder: cannot import module '{module_name}' ({err})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ModelError(f"model.builder: module '{module_name}' has no function '{func_name}'")
    # A string argument naming a file next to the recipe is passed as an absolute path, so builders
    # need not know where the recipe lives.
    args = {key: _file_or_value(recipe, value) for key, value in recipe.model.args.items()}
    try:
        built = func(**args)
    except (Exception, SystemExit) as err:  # the user's own code failed (or tried to end the process)
        kind = "called sys.exit" if isinstance(err, SystemExit) else f"raised {type(err).__name__}"
        raise StageError(f"export: the model builder {recipe.model.builder} {kind}: {err}") from err
    if not (isinstance(built, tuple) and len(built) == 2):
        raise ModelError(f"model.builder: {recipe.model.builder} must return (torch module, example inputs tuple)")
    module_obj, example = built
    example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    return module_obj, example


def _file_or_value(recipe: Recipe, value):
    """A string naming an existing file (relative to the recipe) becomes its absolute path."""
    path = recipe.resolve(Path(value)) if isinstance(value, str) else None
    return str(path) if path is not None and path.exists() else value


def _builder_fingerprint(recipe: Recipe) -> dict:
    """What a builder's output depends on: its source file and any file it is given as an argument."""
    module_name = recipe.model.builder.partition(":")[0]
    found = importlib.util.find_spec(module_name)
    source = Path(found.origin) if found and found.origin else None
    files = {}
    for name, value in sorted(recipe.model.args.items()):
        path = recipe.resolve(Path(str(value))) if isinstance(value, str) else None
        if path is not None and path.is_file():
            files[name] = sha256_file(path)
    return {
        "source": sha256_file(source) if source and source.is_file() else module_name,
        "files": files,
    }


class ExportStage(Stage):
    name = "export"
    sections = ("model", "inputs", "export")
    outputs = ("model.onnx",)

    def extra_key(self, ctx: RunContext) -> dict:
        recipe = ctx.recipe
        if recipe.model.onnx is not None:
            path = recipe.resolve(recipe.model.onnx)
            if not path.is_file():
                raise ModelError(f"model.onnx: {path} does not exist (fix the path in the recipe)")
            return {"onnx": sha256_file(path)}
        return _builder_fingerprint(recipe)

    def run(self, ctx: RunContext, out: Path) -> dict:
        recipe = ctx.recipe
        target = out / "model.onnx"
        if recipe.model.onnx is not None:
            source = recipe.resolve(recipe.model.onnx)
            model = load_onnx(source, where="model.onnx")
            _check_input_names(model, recipe, source)
            _check_op_domains(model, source)
            shutil.copyfile(source, target)
            return {"source": "onnx", "opset": model_opset(model)}
        return _export_builder(recipe, target)


# Operator domains onnxruntime's CPU EP implements; anything else is a custom op it cannot load.
_RUNTIME_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


def _check_op_domains(model, where: Path) -> None:
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


def _check_input_names(model, recipe: Recipe, where: Path) -> None:
    init_names = {i.name for i in model.graph.initializer}
    model_inputs = [i.name for i in model.graph.input if i.name not in init_names]
    declared = [i.name for i in recipe.inputs]
    if sorted(model_inputs) != sorted(declared):
        raise ModelError(
            f"inputs: the recipe declares {declared} but {where} takes {model_inputs}; "
            "make inputs[].name match the model's input names"
        )


def _export_builder(recipe: Recipe, target: Path) -> dict:
    import torch

    # Weights come from the builder; nothing random may change between runs.
    torch.manual_seed(0)
    module, example = load_builder(recipe)
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"model.builder: {recipe.model.builder} returned {type(module).__name__}, not a torch module")
    if len(example) != len(recipe.inputs):
        raise ModelError(
            f"inputs: the builder gives {len(example)} example input(s), the recipe declares {len(recipe.inputs)}"
        )
    for spec, tensor in zip(recipe.inputs, example):
        if list(tensor.shape) != spec.shape:
            raise ModelError(
                f"inputs.{spec.name}.shape: the recipe says {spec.shape}, the builder's example is {list(tensor.shape)}"
            )
        if str(tensor.dtype).removeprefix("torch.") != spec.dtype:
            raise ModelError(
                f"inputs.{spec.name}.dtype: the recipe says {spec.dtype}, the builder's example is {tensor.dtype}"
            )
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
