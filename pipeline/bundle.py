"""Use a packaged bundle: verify it (hashes, file set, signature, NPU rules) and run it (VitisAI EP where
present, else CPU).

A bundle is the `artifact/` folder the package stage writes; its `manifest.json` says which target and
format it was built for, the sha256 of every file that matters, and a digest of itself. `verify` checks
that the manifest is well-formed and unmodified, that the folder holds exactly the files it lists (plus
manifest.json, manifest.sig, report.md, stage.json and the VitisAI compile cache folder), each a plain
file inside the bundle with its stated hash, and with `key`, the Ed25519 signature (`pipeline.core.signing`).
Every finding is an ArtifactError (exit 6) naming the file.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .core import signing
from .core.limits import exceeded, limit
from .data.limits import npz_member_sizes
from .errors import ArtifactError, DataError

__all__ = ["load_manifest", "check_files", "verify_bundle", "infer_bundle", "read_inputs", "vitisai_options",
           "VerifyResult", "VITISAI"]

VITISAI = "VitisAIExecutionProvider"
# In the folder but not in `files`: the manifest itself, its signature, the report (wall-clock times) and
# the runner's stage record. The compile cache folder (vitisai_ep.json's cache_dir) may be there too.
UNLISTED = ("manifest.json", signing.SIGNATURE_FILE, "report.md", "stage.json")
REQUIRED = ("model.onnx", "model.float.onnx", "vitisai_ep.json", "placement.json")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REPACKAGE = "rebuild the bundle with 'npu-pipeline run' or 'package'; do not edit it by hand"


def _plain_name(name: object) -> bool:
    """A file name directly inside the bundle: no folder part, no '..', nothing hidden."""
    return (isinstance(name, str) and bool(name) and name == Path(name).name and "\\" not in name
            and not name.startswith(".") and "\0" not in name)


def load_manifest(bundle: Path) -> dict:
    """The bundle's manifest.json, checked to be a well-formed manifest (ArtifactError otherwise)."""
    bundle = Path(bundle)
    path = bundle / "manifest.json"
    if not bundle.is_dir():
        raise ArtifactError(f"{bundle}: not a folder; point at the 'artifact' folder a run wrote")
    if path.is_symlink() or not path.is_file():
        raise ArtifactError(f"{bundle}: no manifest.json; point at the 'artifact' folder a run wrote")
    size = path.stat().st_size
    if size > limit("manifest_bytes"):
        raise ArtifactError(exceeded("manifest_bytes", str(path), size))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise ArtifactError(f"{path}: not valid JSON ({reason}); {_REPACKAGE}") from None
    problems = _manifest_problems(manifest)
    if problems:
        raise ArtifactError(f"{path}: malformed manifest: {'; '.join(problems)}; {_REPACKAGE}")
    return manifest


def _manifest_problems(manifest: object) -> list[str]:
    from .core.formats import Format
    from .targets import get_target

    if not isinstance(manifest, dict):
        return [f"it is a JSON {type(manifest).__name__}, not an object"]
    problems = []
    for key, kind in (("name", str), ("target", str), ("format", str), ("files", dict), ("signature", dict),
                      ("manifest_sha256", str)):
        if key not in manifest:
            problems.append(f"'{key}' is missing" + (" (packaged by an older version?)" if key == "manifest_sha256" else ""))
        elif not isinstance(manifest[key], kind):
            problems.append(f"'{key}' is a {type(manifest[key]).__name__}, not a {kind.__name__}")
    if problems:
        return problems
    try:
        get_target(manifest["target"]).resolve_format(Format(manifest["format"]))
    except ValueError as err:  # TargetError is one
        problems.append(f"target/format: {err}")
    for name, digest in manifest["files"].items():
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            problems.append(f"files.{name}: {digest!r} is not a sha256 (64 lowercase hex digits)")
    for side in ("inputs", "outputs"):
        entries = manifest["signature"].get(side)
        if not isinstance(entries, list) or not entries or not all(_tensor_entry(e) for e in entries):
            problems.append(f"signature.{side}: not a list of {{name, dtype, shape}} tensors")
    return problems


def _tensor_entry(entry: object) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in entry["shape"]))


def _cache_dir(bundle: Path) -> str:
    """The compile cache folder vitisai_ep.json names (a plain name inside the bundle), else the default."""
    options = bundle / "vitisai_ep.json"
    if not options.is_file() or options.is_symlink():  # never open a FIFO or a link out of the bundle
        return "vitisai_cache"
    try:
        name = json.loads(options.read_text()).get("cache_dir", "vitisai_cache")
    except (OSError, ValueError, AttributeError):
        name = "vitisai_cache"
    return name if _plain_name(name) else "vitisai_cache"


def check_files(bundle: Path, manifest: dict) -> list[str]:
    """Every way the bundle differs from what its manifest states: its own digest, the exact file set,
    each file's sha256. Empty when the bundle is intact."""
    from .core.fileio import sha256_file
    from .stages.package import manifest_digest

    bundle = Path(bundle)
    problems = []
    if manifest_digest(manifest) != manifest["manifest_sha256"]:
        problems.append("manifest.json was modified after packaging (its manifest_sha256 does not match)")
    listed = manifest["files"]
    for name in sorted(listed):
        path = bundle / name if _plain_name(name) else None
        if path is None:
            problems.append(f"manifest.json lists {name!r}, which is not a file name inside the bundle")
        elif path.is_symlink():
            problems.append(f"{name} is a symbolic link (a bundle holds its own files)")
        elif not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != listed[name]:
            problems.append(f"{name} does not match its sha256 in manifest.json")
    problems += [f"manifest.json does not list {name}" for name in REQUIRED if name not in listed]
    cache = _cache_dir(bundle)
    for entry in sorted(bundle.iterdir()):
        if entry.name in listed:
            continue
        if entry.name in UNLISTED and entry.is_file() and not entry.is_symlink():
            continue
        if entry.name == cache and entry.is_dir() and not entry.is_symlink():
            continue
        problems.append(f"{entry.name} is not listed in manifest.json (added after packaging?)")
    return problems


@dataclass
class VerifyResult:
    files_checked: int
    inspection: object  # pipeline.inspect.Inspection
    signature: str  # "verified (key <id>)", "present, not checked (pass --key)" or "none"


def verify_bundle(bundle: Path, *, key: Path | None = None) -> VerifyResult:
    """Check the manifest, the exact file set and every hash; with `key` (a PEM Ed25519 public key) the
    signature; then re-run the readiness rules on the model. ArtifactError lists every finding."""
    from .inspect import inspect_model

    bundle = Path(bundle)
    public = signing.load_public_key(key) if key is not None else None
    manifest = load_manifest(bundle)
    problems = check_files(bundle, manifest)
    sig_path = bundle / signing.SIGNATURE_FILE
    signature = "present, not checked (pass --key)" if sig_path.is_file() else "none"
    if public is not None:
        if not sig_path.is_file() or sig_path.is_symlink():
            problems.append(f"it is not signed (no {signing.SIGNATURE_FILE}; package it with --sign-key)")
        else:
            data = (bundle / "manifest.json").read_bytes()
            text = sig_path.read_text(encoding="ascii", errors="replace")
            if signing.verify(data, text, public):
                signature = f"verified (key {signing.key_id(public)})"
            else:
                problems.append(f"{signing.SIGNATURE_FILE} does not verify with {key} (key {signing.key_id(public)}): "
                                "the bundle was changed or signed by another key")
    if problems:
        raise ArtifactError(f"{bundle}: {'; '.join(problems)} ({_REPACKAGE})")
    inspection = inspect_model(bundle / "model.onnx", manifest["target"], manifest["format"],
                               unbatched=_unbatched_inputs(manifest))
    inspection.raise_for_violations()
    return VerifyResult(len(manifest["files"]), inspection, signature)


def _unbatched_inputs(manifest: dict) -> list[str]:
    """The recipe's inputs without a batch axis (`InputSpec.has_batch`, the rule the package stage gave
    the batch-one check); inputs the manifest's recipe does not describe validly count as batched."""
    from pydantic import ValidationError

    from .modelspec import InputSpec

    recipe = manifest.get("recipe")
    inputs = recipe.get("inputs") if isinstance(recipe, dict) else None
    found = []
    for entry in inputs if isinstance(inputs, list) else ():
        try:
            spec = InputSpec.model_validate(entry)
        except ValidationError:
            continue
        if not spec.has_batch:
            found.append(spec.name)
    return found


def read_inputs(path: Path, signature: list[dict]) -> dict[str, np.ndarray]:
    """The arrays of an .npz (one per model input, named like it), checked against the signature."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--input: {path} does not exist")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            npy = handle.read(6) == b"\x93NUMPY"
        kind = "a .npy file (one array)" if npy else "not an .npz file"
        raise DataError(f"--input: {path} is {kind}; give an .npz with one array per model input, named like it "
                        "(numpy.savez(path, **{input_name: array}))")
    try:
        npz_member_sizes(path, f"--input: {path}")
        archive = np.load(path, allow_pickle=False)
        arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"--input: {path} is not a readable .npz file without pickle ({err})") from None
    feeds = {}
    for spec in signature:
        name = spec["name"]
        if name not in arrays:
            raise DataError(f"--input: {path} has no array '{name}' (it has: {', '.join(sorted(arrays)) or 'none'})")
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
    problems = check_files(bundle, manifest)  # the signature and the model must be what was packaged
    if problems:
        raise ArtifactError(f"{bundle}: {'; '.join(problems)} ({_REPACKAGE})")
    feeds = read_inputs(Path(inputs), manifest["signature"]["inputs"])
    model = bundle / "model.onnx"
    if VITISAI in ort.get_available_providers() and manifest["target"] != "cpu":
        session = ort.InferenceSession(str(model), providers=[(VITISAI, vitisai_options(bundle)), "CPUExecutionProvider"])
        provider = VITISAI
    elif npu_numerics and manifest["format"] == "bf16":
        from .quant.bf16 import emulate_bf16
        from .core.onnx_io import load_onnx

        session = make_session(emulate_bf16(load_onnx(model)), npu_emulation=True, may_edit=True)
        provider = "CPUExecutionProvider (NPU numerics: bfloat16 rounding at every op)"
    else:
        session = make_session(model, npu_emulation=npu_numerics)
        provider = "CPUExecutionProvider" + (" (NPU numerics: unfused QDQ)" if npu_numerics else "")
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds))), provider
