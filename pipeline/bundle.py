"""Use a packaged bundle: verify it (hashes and NPU rules) and run it (VitisAI EP where present, else CPU).

A bundle is the `artifact/` folder the package stage writes; its `manifest.json` says which target and
format it was built for and the sha256 of every file that matters.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ArtifactError, DataError

__all__ = ["load_manifest", "verify_bundle", "infer_bundle", "read_inputs", "vitisai_options", "VerifyResult", "VITISAI"]

VITISAI = "VitisAIExecutionProvider"


def load_manifest(bundle: Path) -> dict:
    path = Path(bundle) / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"{bundle}: no manifest.json; point at the 'artifact' folder a run wrote")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ArtifactError(f"{path}: not valid JSON ({err}); repackage with 'npu-pipeline package'") from None


@dataclass
class VerifyResult:
    files_checked: int
    inspection: object  # pipeline.inspect.Inspection


def verify_bundle(bundle: Path) -> VerifyResult:
    """Re-hash every file the manifest lists and re-run the readiness rules on the model."""
    from .core.fileio import sha256_file
    from .inspect import inspect_model

    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    problems = []
    for name, digest in sorted(manifest.get("files", {}).items()):
        path = bundle / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name} does not match its sha256 in manifest.json")
    if problems:
        raise ArtifactError(f"{bundle}: {'; '.join(problems)} (rebuild the bundle; do not edit it by hand)")
    inspection = inspect_model(bundle / "model.onnx", manifest["target"], manifest["format"])
    inspection.raise_for_violations()
    return VerifyResult(len(manifest.get("files", {})), inspection)


def read_inputs(path: Path, signature: list[dict]) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
        arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"--input: {path} is not a readable .npz file without pickle ({err})") from None
    feeds = {}
    for spec in signature:
        name = spec["name"]
        if name not in arrays:
            raise DataError(f"--input: {path} has no array '{name}' (it has: {', '.join(sorted(arrays))})")
        array = arrays[name]
        if list(array.shape) != spec["shape"] or array.dtype.name != spec["dtype"]:
            raise DataError(
                f"--input: '{name}' is {array.dtype.name}{list(array.shape)}, the model takes "
                f"{spec['dtype']}{spec['shape']}"
            )
        feeds[name] = array
    return feeds


def vitisai_options(bundle: Path, *, cache_dir: Path | None = None) -> dict[str, str]:
    """The bundle's VitisAI EP options with its paths made absolute; `cache_dir` moves the compile cache
    (tools that must not write into the bundle, whose files `verify` hashes, put it elsewhere)."""
    bundle = Path(bundle)
    options = json.loads((bundle / "vitisai_ep.json").read_text())
    if "config_file" in options:
        options["config_file"] = str(bundle / options["config_file"])
    options["cache_dir"] = str(cache_dir if cache_dir is not None else bundle / options.get("cache_dir", "vitisai_cache"))
    return options


def infer_bundle(bundle: Path, inputs: Path, *, npu_numerics: bool = False) -> tuple[dict[str, np.ndarray], str]:
    """Run the bundle's model on the arrays of `inputs`; returns (outputs by name, provider used)."""
    import onnxruntime as ort

    from .core.onnx_io import make_session

    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    feeds = read_inputs(Path(inputs), manifest["signature"]["inputs"])
    model = bundle / "model.onnx"
    if VITISAI in ort.get_available_providers() and manifest["target"] != "cpu":
        session = ort.InferenceSession(str(model), providers=[(VITISAI, vitisai_options(bundle)), "CPUExecutionProvider"])
        provider = VITISAI
    elif npu_numerics and manifest["format"] == "bf16":
        from .quant.bf16 import emulate_bf16
        from .core.onnx_io import load_onnx

        session = make_session(emulate_bf16(load_onnx(model)).SerializeToString(), npu_emulation=True)
        provider = "CPUExecutionProvider (NPU numerics: bfloat16 rounding at every op)"
    else:
        session = make_session(model, npu_emulation=npu_numerics)
        provider = "CPUExecutionProvider" + (" (NPU numerics: unfused QDQ)" if npu_numerics else "")
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds))), provider
