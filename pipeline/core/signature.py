"""A model file's signature against what a recipe declares, and the files an ONNX model needs beside it.

Shared by the export and prepare stages (which refuse a mismatch) and by `npu-pipeline check` / `init`
(which report it before anything runs), so all of them say the same thing about the same model.

Dims: a positive `dim_value` is fixed; a `dim_param` (a name), no value, or a stored value <= 0 (Paddle and
some converters write -1 or 0 for "any") are dynamic and take whatever the recipe declares.
Input specs are duck-typed (`name`, `shape`, `dtype`, `value`, `from_output`): this layer does not import
the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["TensorSig", "onnx_signature", "external_data_files", "signature_problems", "is_dynamic", "clear_nonpositive_dims"]


@dataclass(frozen=True)
class TensorSig:
    """One graph input or output: dims are ints where fixed, a name (or '?') where dynamic."""

    name: str
    dims: tuple[int | str, ...] | None  # None: the file states no shape at all
    dtype: str  # numpy dtype name ("float32", "int64", ...), "?" when the file does not say

    @property
    def rank(self) -> int | None:
        return None if self.dims is None else len(self.dims)


def is_dynamic(dim: int | str) -> bool:
    return not isinstance(dim, int) or dim <= 0


def clear_nonpositive_dims(model) -> int:
    """Make dims stored as -1 or 0 plainly dynamic (no value) on the graph's inputs, outputs and value_info,
    as onnxruntime and shape inference understand them; returns how many. (onnxruntime enforces a stored 0.)"""
    count = 0
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.Clear()
                count += 1
    return count


def _describe(value) -> TensorSig:
    from onnx import helper

    tensor = value.type.tensor_type
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "?"
    except (KeyError, TypeError, ValueError):
        dtype = "?"
    if not tensor.HasField("shape"):
        return TensorSig(value.name, None, dtype)
    dims = tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim
    )
    return TensorSig(value.name, dims, dtype)


def onnx_signature(model) -> tuple[list[TensorSig], list[TensorSig]]:
    """(inputs, outputs) of a ModelProto; initializers listed as inputs (old exporters) are not inputs."""
    init = {t.name for t in model.graph.initializer}
    inputs = [_describe(v) for v in model.graph.input if v.name not in init]
    return inputs, [_describe(v) for v in model.graph.output]


def external_data_files(path: Path) -> list[Path]:
    """The external-data files an ONNX file's tensors point at (resolved beside it), in first-use order.

    Reads the graph without the data. Raises nothing: an unreadable file yields [] (loading reports it)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX file: load_onnx gives the user-facing message
        return []
    files: list[Path] = []
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            location = Path(path).parent / ExternalDataInfo(tensor).location
            if location not in files:
                files.append(location)
    return files


def _dtype_name(dtype: str) -> str:
    return "bool" if dtype == "bool_" else dtype


def signature_problems(inputs: list[TensorSig], outputs: list[TensorSig], specs, *, where: str) -> list[str]:
    """Every way the recipe's `inputs` (specs) disagree with the model's signature; [] when they fit.

    Names must match (constants and recurrent states are model inputs too); each declared shape must have
    the model's rank and agree with every fixed dim; the dtype must be the model's; a state's `from_output`
    must name a model output of the state's shape."""
    problems: list[str] = []
    declared = [s.name for s in specs]
    have = [i.name for i in inputs]
    if sorted(declared) != sorted(have):
        problems.append(
            f"inputs: the recipe declares {declared} but {where} takes {have}; "
            "make inputs[].name match the model's input names (constants and recurrent states included)"
        )
    by_name = {i.name: i for i in inputs}
    out_by_name = {o.name: o for o in outputs}
    for spec in specs:
        sig = by_name.get(spec.name)
        if sig is None:
            continue
        if sig.dims is not None:
            if len(sig.dims) != len(spec.shape):
                problems.append(
                    f"inputs.{spec.name}.shape: the recipe gives rank {len(spec.shape)} {list(spec.shape)}, "
                    f"the model's input has rank {len(sig.dims)} {list(sig.dims)}"
                )
            else:
                fixed = [f"dim {d} to {dim}" for d, (dim, want) in enumerate(zip(sig.dims, spec.shape))
                         if not is_dynamic(dim) and dim != want]
                if fixed:
                    problems.append(f"inputs.{spec.name}.shape: the recipe says {list(spec.shape)}, the model's input "
                                    f"{list(sig.dims)} fixes {', '.join(fixed)}")
        if sig.dtype != "?" and _dtype_name(sig.dtype) != spec.dtype:
            problems.append(f"inputs.{spec.name}.dtype: the recipe says {spec.dtype}, the model's input is {sig.dtype}")
        source = getattr(spec, "from_output", None)
        if source is not None:
            out = out_by_name.get(source)
            if out is None:
                problems.append(
                    f"inputs.{spec.name}.from_output: the model has no output '{source}' "
                    f"(it has: {', '.join(out_by_name)})"
                )
            elif out.dims is not None and (
                len(out.dims) != len(spec.shape)
                or any(not is_dynamic(d) and d != w for d, w in zip(out.dims, spec.shape))
            ):
                problems.append(
                    f"inputs.{spec.name}.from_output: output '{source}' has shape {list(out.dims)}, "
                    f"the state input takes {list(spec.shape)}"
                )
    return problems
