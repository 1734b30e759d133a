"""What bench, parity and compare share: an artifact opened once, execution providers named and sessions
created as a user would create them, inputs of the model's signature, and the CPU's int8 features.

An "artifact" is the `artifact/` folder a run wrote (manifest, model.onnx, model.float.onnx, VitisAI EP
options) or, for models made elsewhere, a bare `.onnx` file.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import VITISAI, load_manifest
from ..errors import ArtifactError, DataError, ModelError

__all__ = [
    "CPU",
    "VITISAI",
    "Artifact",
    "open_artifact",
    "provider_name",
    "providers_for",
    "session_options",
    "ep_session",
    "default_threads",
    "random_feeds",
    "open_samples",
    "int8_dot_product",
    "default_out",
]

CPU = "CPUExecutionProvider"
# Short names users type; any full "...ExecutionProvider" name is accepted as well.
_SHORT = {
    "cpu": CPU, "vitisai": VITISAI, "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider", "migraphx": "MIGraphXExecutionProvider", "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider", "directml": "DmlExecutionProvider", "qnn": "QNNExecutionProvider",
    "coreml": "CoreMLExecutionProvider", "xnnpack": "XnnpackExecutionProvider", "azure": "AzureExecutionProvider",
    "webgpu": "WebGpuExecutionProvider", "nnapi": "NnapiExecutionProvider",
}


def provider_name(name: str) -> str:
    """'cpu', 'VitisAI', 'CPUExecutionProvider'... -> onnxruntime's provider name; anything else: DataError."""
    key = name.strip().lower().removesuffix("executionprovider")
    if key in _SHORT:
        return _SHORT[key]
    for full in _SHORT.values():
        if full.lower() == name.strip().lower():
            return full
    raise DataError(f"--ep: unknown execution provider '{name}' (use 'all' or one of: {', '.join(sorted(set(_SHORT)))})")


@dataclass(frozen=True)
class Artifact:
    path: Path
    name: str
    manifest: dict | None  # None for a bare ONNX file
    models: dict[str, Path]  # role ("quantized", "float"; "model" for a bare file) -> file

    @property
    def format(self) -> str | None:
        return self.manifest["format"] if self.manifest else None

    @property
    def bundle(self) -> Path | None:
        return self.path if self.manifest else None

    def signature(self) -> list[dict]:
        """[{name, dtype, shape}] of the model inputs (manifest.json "signature", else the ONNX graph)."""
        if self.manifest:
            return self.manifest["signature"]["inputs"]
        import onnx
        from onnx import helper

        model = onnx.load(str(next(iter(self.models.values()))), load_external_data=False)
        init = {i.name for i in model.graph.initializer}
        inputs = []
        for value in model.graph.input:
            if value.name in init:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]
            inputs.append({"name": value.name, "shape": dims,
                           "dtype": helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name})
        return inputs


def open_artifact(path: Path) -> Artifact:
    """An artifact folder (its manifest read and checked for the model files) or a bare .onnx file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".onnx":
        return Artifact(path, path.stem, None, {"model": path})
    if not path.is_dir():
        raise DataError(f"{path}: not an artifact folder nor an .onnx file (point at <run>/artifact)")
    manifest = load_manifest(path)
    models = {"quantized": path / "model.onnx", "float": path / "model.float.onnx"}
    missing = [p.name for p in models.values() if not p.is_file()]
    if missing:
        raise ArtifactError(f"{path}: {', '.join(missing)} missing (rebuild the bundle with 'npu-pipeline run')")
    return Artifact(path, manifest.get("name", path.name), manifest, models)


def providers_for(ep: str, artifact: Artifact, *, cache_dir: Path | None = None) -> list:
    """The providers list a user would pass: the EP first (VitisAI with the artifact's options), CPU last
    for whatever the EP does not take."""
    if ep == CPU:
        return [CPU]
    if ep == VITISAI and artifact.bundle is not None:
        from ..bundle import vitisai_options

        return [(VITISAI, vitisai_options(artifact.bundle, cache_dir=cache_dir)), CPU]
    return [ep, CPU]


def session_options(*, threads: int = 0, optimize: bool = True, cores: list[int] | None = None):
    """onnxruntime SessionOptions: `threads` intra-op threads (0: onnxruntime's default), one inter-op
    thread, sequential; `cores` pins pool thread i to cores[i + 1] (the caller pins itself to cores[0])."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if cores and threads > 1:
        if len(cores) < threads:
            raise DataError(f"--threads {threads}: only {len(cores)} cores usable here; pinning needs one per thread")
        # onnxruntime numbers processors from 1 and pins pool threads only (threads - 1 of them).
        options.add_session_config_entry(
            "session.intra_op_thread_affinities", ";".join(str(c + 1) for c in cores[1:threads]))
    return options


def ep_session(model: bytes, providers: list, *, optimize: bool):
    """A session on `providers` with every usable core; onnxruntime's errors become one ModelError."""
    import onnxruntime as ort

    first = providers[0] if isinstance(providers[0], str) else providers[0][0]
    try:
        return ort.InferenceSession(model, session_options(threads=default_threads(), optimize=optimize),
                                    providers=providers)
    except Exception as err:  # onnxruntime's own exception classes
        raise ModelError(f"onnxruntime cannot create the session on {first}: {str(err).strip().splitlines()[0]}") from None


def random_feeds(signature: list[dict], *, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the signature: float standard normal; integers 0/1 (valid as token ids, masks, types)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in signature:
        shape = spec["shape"]
        if not all(isinstance(d, int) and d > 0 for d in shape):
            raise DataError(f"input '{spec['name']}' has dynamic dims {shape}: give --input x.npz with real shapes")
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec["name"]] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[spec["name"]] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def open_samples(artifact: Artifact, *, recipe: Path | None = None, data: Path | None = None,
                 labels: str | None = None, limit: int | None = None):
    """The samples to judge numerics on: a recipe's validation set, or an .npz (sample axis first, one
    array per input, `labels` naming a label array). Returns a `pipeline.data.DataSource`."""
    from ..data import open_dataset
    from ..recipe import load_recipe, recipe_from_dict

    if (recipe is None) == (data is None):
        raise DataError("give the samples: --recipe RECIPE (its validation set) or --data FILE.npz, one of them")
    if recipe is not None:
        spec = load_recipe(recipe)
        # Recurrent states are recorded with the artifact's float model, as validate recorded them.
        return open_dataset(spec, "validation", limit=limit, state_model=artifact.models.get("float") or next(iter(artifact.models.values())))
    inputs = [{"name": s["name"], "shape": s["shape"], "dtype": s["dtype"]} for s in artifact.signature()]
    npz = {"kind": "npz", "path": str(Path(data).resolve()), **({"labels": labels} if labels else {})}
    # A recipe around the file, so the data goes through the pipeline's own checks (shapes, dtypes, NaN).
    spec = recipe_from_dict({
        "name": "samples", "model": {"onnx": str(next(iter(artifact.models.values())))}, "inputs": inputs,
        "calibration": {"data": npz}, "validation": {"data": npz, "samples": limit or 1 << 30},
    }, source=f"--data {data}")
    return open_dataset(spec, "validation")


def int8_dot_product() -> dict:
    """Which int8 dot-product instructions this CPU has, and so whether onnxruntime's u8s8 kernels can
    saturate here. x86 without VNNI multiplies u8 x s8 pairs with vpmaddubsw, whose int16 pair sum
    saturates (255 x 127 x 2 > 32767); VNNI (AVX512-VNNI, AVX-VNNI) and AMX accumulate in int32.

    /proc/cpuinfo lists the host's flags; numpy reads CPUID itself, which an emulator or a VM can mask,
    so where they disagree on AVX-512 the CPUID view (numpy) is the one the kernels also see.
    """
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return {"arch": machine, "vnni": None, "saturation_expected": False, "source": "not x86"}
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as cpuid
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as cpuid
    masked = "avx512f" in flags and not cpuid.get("AVX512F", False)
    if masked:
        found = ["avx512_vnni"] if cpuid.get("AVX512VNNI") else []
        source = "CPUID (numpy); /proc/cpuinfo disagrees on avx512f, so it is not what the kernels see"
    else:
        found = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}) or (["avx512_vnni"] if cpuid.get("AVX512VNNI") else [])
        source = "/proc/cpuinfo"
    return {"arch": machine, "vnni": found, "saturation_expected": not found, "source": source}


def default_out(artifact: Path, folder: str) -> Path:
    """`<artifact>/../<folder>`: beside the artifact, never inside it (verify hashes its files)."""
    artifact = Path(artifact).resolve()
    return (artifact.parent if artifact.is_file() else artifact.parent) / folder


def default_threads() -> int:
    """Every core this process may use, unless NPU_PIPELINE_THREADS says otherwise (batch sets it so that
    parallel workers share the cores)."""
    env = int(os.environ.get("NPU_PIPELINE_THREADS", "0") or 0)
    return env or len(os.sched_getaffinity(0))
