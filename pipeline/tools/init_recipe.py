"""`npu-pipeline init MODEL [--data PATH]`: a commented recipe written from a model's own signature.

MODEL is an ONNX file or a builder `module:function` (trusted code: it is called, as `run` would call it,
for its example inputs). The recipe declares every input as the model states it (a dynamic batch dim
becomes 1; other dynamic dims get a default the user must confirm), picks the data kind from `--data` (a
folder of images or WAV files, an .npz, a .txt of sentences), fills the preprocessing from the input's
shape (layout, channels, size; ImageNet mean/std for a 3-channel float input; shorter side + center
crop), splits one data source into calibration and validation (seed 0, 30% validation), guesses the
task from the first output (a [1, K] vector: classification, or embedding when the graph ends in an L2
normalisation; anything else: regression), and sets gates that catch a conversion that silently broke
(a floor on top-1 agreement and on output SQNR), not accuracy targets. Every guess is marked in the file
with `DECIDE` and listed in `InitResult.decisions`. The written recipe is validated by the recipe schema
before it is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.entrypoints import import_entry_point, recipe_folder_on_path
from ..core.onnx_io import load_onnx
from ..core.signature import TensorSig, external_data_files, is_dynamic, onnx_signature
from ..data.images import IMAGE_SUFFIXES
from ..errors import DataError, ModelError, RecipeError, StageError
from ..gates import TASK_FLOORS
from ..recipe import recipe_from_dict
from ..targets import get_target

__all__ = ["InitResult", "init_recipe"]

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
LABEL_KEYS = ("label", "labels", "target", "targets", "y")
# Floors that catch a broken conversion (garbage outputs agree with the float model at chance level and
# have an SQNR near 0 dB); MobileNetV2 in per-tensor A8W8 reaches 40% and 5.9 dB, so they hold for an
# honest, if lossy, conversion.
GATES = {
    "classification": [("top1_agreement", 25.0, "% of samples whose top class stays the float model's; chance is 100/K")],
    "embedding": [("cosine_mean", 0.9, "mean cosine similarity to the float embeddings")],
    # The default task floors (`pipeline.gates.TASK_FLOORS`), written out so the user sees and raises them.
    "ctc": [(*TASK_FLOORS["ctc"], "% of the steps the float model reads a character at that keep it"),
            ("string_agreement", 25.0, "% of decoded strings equal to the float model's")],
    "dense": [(*TASK_FLOORS["dense"], "% IoU of the two models' maps thresholded at 0.3")],
}
SQNR_FLOOR = ("sqnr_db", 3.0, "dB of output signal over quantization error; 0 dB = error as large as the output")


@dataclass
class InitResult:
    path: Path
    text: str
    decisions: list[str] = field(default_factory=list)


@dataclass
class _Input:
    name: str
    shape: list[int]
    dtype: str
    notes: list[str] = field(default_factory=list)
    batch: bool | None = None
    from_output: str | None = None
    value: int | None = None


def _data_kind(data: Path | None) -> str | None:
    """What --data holds: images, audio, npz, text, or None (nothing given or not recognised)."""
    if data is None:
        return None
    data = Path(data)
    if data.is_dir():
        names = [p.suffix.lower() for p in data.iterdir()]
        return "images" if any(n in IMAGE_SUFFIXES for n in names) else "audio" if ".wav" in names else None
    return {".wav": "audio", ".npz": "npz", ".txt": "text"}.get(data.suffix.lower())


def _fill_dims(sig: TensorSig, kind: str | None, batch_names: set, decisions: list[str]) -> _Input:
    """The input with every dynamic dim given a value: the batch dim (dim 0, or a dim named like another
    input's dim 0) 1; an image's height and width 224; audio samples 16000; token ids 128; else 1."""
    dims = list(sig.dims or [])
    notes = []
    image_like = kind == "images" and len(dims) in (3, 4)
    for d, dim in enumerate(dims):
        if not is_dynamic(dim):
            continue
        if (d == 0 and len(dims) > 1) or (isinstance(dim, str) and dim in batch_names):
            dims[d] = 1
            notes.append(f"dim {d} was dynamic ('{dim}'): 1, the batch")
            continue
        if image_like and d >= len(dims) - 3:
            default = 224
        elif kind == "audio" and d == len(dims) - 1 and sig.dtype.startswith("float"):
            default = 16000
        else:
            default = 128 if sig.dtype.startswith("int") else 1
        dims[d] = default
        notes.append(f"dim {d} ('{dim}') was dynamic: {default}, DECIDE")
        decisions.append(f"inputs.{sig.name}.shape[{d}]: dynamic in the model ('{dim}'); set to {default}, use the size you deploy")
    return _Input(sig.name, dims, "bool" if sig.dtype == "bool_" else sig.dtype, notes)


def _states(specs: list[_Input], outputs: list[TensorSig], decisions: list[str]) -> None:
    """A float input of rank >= 2 shaped exactly like one output (not the first) is taken for a recurrent
    state fed back from that output (a GRU/LSTM state, a streaming model's cache)."""
    for spec in specs:
        if len(spec.shape) < 2 or not spec.dtype.startswith("float"):
            continue
        same = [o for o in outputs[1:] if o.dims is not None and len(o.dims) == len(spec.shape)
                and all(is_dynamic(d) or d == w for d, w in zip(o.dims, spec.shape))]
        if len(same) == 1:
            spec.from_output, spec.batch = same[0].name, None
            spec.notes.append(f"a recurrent state fed back from output '{same[0].name}', DECIDE")
            decisions.append(f"inputs.{spec.name}: taken for a recurrent state fed from output '{same[0].name}' "
                             "(same shape); remove from_output if it is not one")


def _image_geometry(shape: list[int]) -> tuple[str, int] | None:
    """(layout, channels) when the shape looks like an image ([N,C,H,W] / [N,H,W,C] / without N), else None."""
    rest = shape[1:] if len(shape) == 4 else shape if len(shape) == 3 else None
    if rest is None:
        return None
    if rest[0] in (1, 3) and rest[1] > 4 and rest[2] > 4:
        return "nchw", rest[0]
    if rest[2] in (1, 3) and rest[0] > 4 and rest[1] > 4:
        return "nhwc", rest[2]
    return None


def _onnx_signature(path: Path) -> tuple[list[TensorSig], list[TensorSig], str | None]:
    missing = [f for f in external_data_files(path) if not f.is_file()]
    if missing:
        raise ModelError(f"{path}: its external data file(s) {', '.join(f.name for f in missing)} are missing beside it")
    model = load_onnx(path, where="MODEL")
    inputs, outputs = onnx_signature(model)
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    last = producer.get(outputs[0].name) if outputs else None
    if last == "Div":  # x / ReduceL2(x) or / Sqrt(ReduceSumSquare): the usual L2 normalisation
        div = next(n for n in model.graph.node if outputs[0].name in n.output)
        last = "L2" if producer.get(div.input[1]) in ("ReduceL2", "Sqrt", "Clip", "Max", "Expand") else last
    return inputs, outputs, last


def _builder_signature(spec: str, folder: Path) -> tuple[list[TensorSig], list[TensorSig], str | None]:
    func = import_entry_point(spec, folder, where="MODEL", missing=ModelError, failing=StageError)
    try:
        with recipe_folder_on_path(folder, spec.partition(":")[0]):
            module, example = func()
    except (Exception, SystemExit) as err:  # trusted user code: its own failure, or a builder needing args
        raise StageError(f"MODEL: {spec}() raised {type(err).__name__}: {err} (init calls it without arguments; "
                         "write the recipe's model.args yourself)") from err
    import torch

    example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    with torch.no_grad():
        out = module.eval()(*example)
    out = out if isinstance(out, (tuple, list)) else (out,)
    names = ["input"] if len(example) == 1 else [f"input_{i}" for i in range(len(example))]
    sig = lambda n, t: TensorSig(n, tuple(t.shape), str(t.dtype).removeprefix("torch."))  # noqa: E731
    return ([sig(n, t) for n, t in zip(names, example)],
            [sig("output" if len(out) == 1 else f"output_{i}", t) for i, t in enumerate(out)], None)


def _task(outputs: list[TensorSig], last_op: str | None, decisions: list[str]) -> tuple[str, str]:
    first = outputs[0]
    dims = list(first.dims or [])
    static_last = bool(dims) and not is_dynamic(dims[-1])
    if len(dims) == 2 and static_last and dims[-1] > 1:
        if last_op in ("LpNormalization", "L2"):
            return "embedding", f"output '{first.name}' {dims} ends in an L2 normalisation: an embedding"
        decisions.append(f"validation.task: classification guessed from output '{first.name}' {dims} "
                         "(embedding if these are features, not class scores)")
        return "classification", f"output '{first.name}' {dims}: one score per class, DECIDE (embedding if features)"
    if len(dims) == 3 and static_last and dims[-1] > 2 and last_op in ("Softmax", "LogSoftmax"):
        decisions.append(f"validation.task: ctc guessed from output '{first.name}' {dims} (a {last_op} per time "
                         "step: a sequence recognizer); set validation.outputs.<output>.blank to your blank index")
        return "ctc", f"output '{first.name}' {dims}: a {last_op} per step, a CTC recognizer, DECIDE (blank: 0)"
    if len(dims) == 4 and dims[1] == 1 and last_op == "Sigmoid":
        decisions.append(f"validation.task: dense guessed from output '{first.name}' {dims} (a probability map); "
                         "set its threshold to the one you deploy with")
        return "dense", f"output '{first.name}' {dims}: a sigmoid map, DECIDE (threshold 0.3)"
    decisions.append(f"validation.task: regression guessed from output '{first.name}' {dims}; gates judge SQNR only")
    return "regression", f"output '{first.name}' {dims}: not a class vector, DECIDE"


def _rel(path: Path, folder: Path) -> str:
    return os.path.relpath(Path(path).resolve(), folder)


def _data_lines(data: Path | None, inputs: list[_Input], folder: Path, decisions: list[str]) -> tuple[list[str], str]:
    """The `data:` mapping lines (indented 4) shared by both sections, and the split line ('' for none)."""
    split = "    split: {seed: 0, validation: 0.3}   # one source, cut into disjoint calibration/validation parts"
    fed = [i for i in inputs if not (i.shape == [] and i.dtype.startswith("int")) and i.from_output is None]
    if data is None:
        decisions.append("calibration.data / validation.data: no --data given; point them at your samples")
        return ["    kind: npz", "    path: CHANGE_ME.npz   # DECIDE: arrays named like the inputs, samples first"], split
    data = Path(data)
    if data.is_dir():
        images = [p for p in data.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        wavs = [p for p in data.iterdir() if p.suffix.lower() == ".wav"]
        if images:
            return _image_lines(data, fed, folder, decisions), split
        if wavs:
            return _audio_lines(data, fed, folder, decisions), split
        raise DataError(f"--data: {data} holds no images (.png/.jpg/.jpeg) and no .wav files")
    if not data.is_file():
        raise DataError(f"--data: {data} does not exist")
    suffix = data.suffix.lower()
    if suffix == ".wav":
        return _audio_lines(data, fed, folder, decisions), split
    if suffix == ".txt":
        decisions.append("calibration.data.tokenizer: the tokenizer.json of your model")
        return ["    kind: text", f"    path: {_rel(data, folder)}",
                "    tokenizer: CHANGE_ME/tokenizer.json   # DECIDE: your model's HuggingFace tokenizer.json"], split
    if suffix == ".npz":
        with np.load(data, allow_pickle=False) as archive:
            keys = list(archive.files)
        lines = ["    kind: npz", f"    path: {_rel(data, folder)}   # arrays: samples first (or stacked on the batch axis)"]
        names = [i.name for i in fed]
        plain = [k for k in keys if k not in LABEL_KEYS]
        if not set(names) <= set(keys) and len(names) == 1 and len(plain) == 1:
            lines.append(f"    arrays: {{{names[0]}: {plain[0]}}}")
        label = next((k for k in keys if k in LABEL_KEYS), None)
        return lines + ([f"    labels: {label}"] if label else []), split
    raise DataError(f"--data: {data}: give a folder of images or .wav files, an .npz, a .wav or a .txt file")


def _image_lines(folder_in: Path, fed: list[_Input], folder: Path, decisions: list[str]) -> list[str]:
    target = next((i for i in fed if _image_geometry(i.shape)), None)
    if target is None:
        raise DataError(f"--data: {folder_in} holds images, but no model input looks like an image "
                        f"({', '.join(f'{i.name} {i.shape}' for i in fed)})")
    layout, channels = _image_geometry(target.shape)
    if len(target.shape) == 3:
        target.batch = False
    h, w = (target.shape[-2:] if layout == "nchw" else target.shape[-3:-1])
    lines = ["    kind: images", f"    path: {_rel(folder_in, folder)}"]
    if len(fed) > 1:
        lines.append(f"    input: {target.name}   # the input the images feed")
    lines += [f"    size: [{h}, {w}]   # [height, width], from the input's shape",
              f"    layout: {layout}   # from the input's shape"]
    if target.dtype != "float32":
        return lines + [f"    channels: {'rgb' if channels == 3 else 'gray'}",
                        f"    scale: 1   # a {target.dtype} input takes raw pixels", "    mean: [0]", "    std: [1]"]
    if channels == 3:
        decisions.append("data preprocessing: ImageNet mean/std, RGB, shorter side + center crop assumed; use your model's")
        return lines + [
            "    resize: center_crop   # DECIDE: stretch | letterbox | center_crop (shorter side to size/0.875, centre cut)",
            "    channels: rgb   # DECIDE: bgr for models trained on OpenCV-loaded images",
            "    scale: 0.00392156862745098   # 1/255: pixels to [0, 1], then (x - mean) / std per channel",
            f"    mean: {IMAGENET_MEAN}   # DECIDE: ImageNet's, the most common; use your model's",
            f"    std: {IMAGENET_STD}",
        ]
    decisions.append("data preprocessing: gray pixels scaled to [0, 1], no mean/std; use your model's")
    return lines + ["    resize: stretch   # DECIDE: stretch | letterbox | center_crop", "    channels: gray",
                    "    scale: 0.00392156862745098   # 1/255: pixels to [0, 1]   DECIDE: mean/std if the model expects them"]


def _audio_lines(path: Path, fed: list[_Input], folder: Path, decisions: list[str]) -> list[str]:
    target = next((i for i in fed if i.dtype.startswith("float") and i.shape), None)
    if target is None:
        raise DataError(f"--data: {path} holds audio, but no model input takes float samples")
    decisions.append("calibration.data.sample_rate: the rate your model was trained at (files are resampled to it)")
    return ["    kind: audio", f"    path: {_rel(path, folder)}",
            f"    window: {target.shape[-1]}   # samples per window: the input's last dim",
            "    sample_rate: 16000   # DECIDE: your model's rate", "    mono: true"]


def init_recipe(model: str, *, data: Path | None = None, target: str = "xdna2", fmt: str | None = None,
                out: Path | None = None, force: bool = False) -> InitResult:
    """Write a recipe for `model` (see the module docstring); returns what was written and what to decide."""
    onnx_path = Path(model) if model.endswith(".onnx") or Path(model).is_file() else None
    stem = onnx_path.stem if onnx_path else model.partition(":")[2] or "model"
    out = Path(out) if out is not None else Path.cwd() / f"{stem}.yaml"
    if out.exists() and not force:
        raise RecipeError(f"-o: {out} exists; choose another path or pass --force to replace it")
    folder = out.resolve().parent
    fmt = fmt or get_target(target).default_format  # xdna2: a8w8
    decisions: list[str] = []
    if onnx_path is not None:
        inputs, outputs, last_op = _onnx_signature(onnx_path)
    elif model.count(":") == 1:
        inputs, outputs, last_op = _builder_signature(model, folder)
    else:
        raise ModelError(f"MODEL: {model} is neither an ONNX file nor a builder 'package.module:function'")
    if not outputs:
        raise ModelError(f"MODEL: {model} has no outputs")
    kind = _data_kind(data)
    batch_names = {sig.dims[0] for sig in inputs if sig.dims and len(sig.dims) > 1 and isinstance(sig.dims[0], str)}
    specs = [_fill_dims(sig, kind, batch_names, decisions) for sig in inputs]
    _states(specs, outputs, decisions)
    data_lines, split = _data_lines(data, specs, folder, decisions)
    for spec in specs:
        if spec.shape == [] and spec.dtype.startswith("int") and kind == "audio":
            spec.value = 16000  # a scalar setting beside audio: its sample rate, as data.sample_rate
            spec.notes.append("taken for the sample rate, folded into the graph; DECIDE with data.sample_rate")
            decisions.append(f"inputs.{spec.name}: taken for the sample rate (value: 16000); set the model's own")
        elif spec.shape == [] and spec.dtype.startswith("int"):
            decisions.append(f"inputs.{spec.name}: a scalar {spec.dtype} (a setting such as a sample rate); "
                             "give it 'value:' to fold it into the model")
    task, why = _task(outputs, last_op, decisions)
    name = "".join(c if c.isalnum() or c in "_.-" else "_" for c in stem).lstrip("_.-") or "model"
    source = f"onnx: {_rel(onnx_path, folder)}" if onnx_path else f"builder: {model}"
    lines = [f"# Written by `npu-pipeline init {model}" + (f" --data {data}`" if data else "`") + " from the model's signature.",
             "# Check, then run:  npu-pipeline check THIS.yaml && npu-pipeline run THIS.yaml",
             "# Lines marked DECIDE are guesses; the recipe runs with them, but they are yours to confirm.",
             "# Every key is in the README's recipe reference.", "#", "# Still to decide:"]
    lines += [f"#   - {d}" for d in decisions] or ["#   - nothing"]
    lines += ["", f"name: {name}", f"description: {stem} for {target}, written by npu-pipeline init", "model:",
              f"  {source}   # relative paths resolve against this recipe's folder",
              "inputs:   # names, static shapes and dtypes the NPU model will have (from the model)"]
    for spec in specs:
        note = f"   # {'; '.join(spec.notes)}" if spec.notes else ""
        extra = ", batch: false" if spec.batch is False else ""
        extra += f", from_output: {spec.from_output}" if spec.from_output else ""
        extra += f", value: {spec.value}" if spec.value is not None else ""
        lines.append(f"  - {{name: {spec.name}, shape: {spec.shape}, dtype: {spec.dtype}{extra}}}{note}")
    section = lambda title, samples: [  # noqa: E731
        f"{title}:", "  data:", *data_lines, *([split] if split else []), f"  samples: {samples}   # at most"]
    # No `method:` line: a written method overrides the model family's preset (README, "Defaults per model
    # family"), and minmax there costs a CNN half its SQNR.
    lines += section("calibration", 100) + ["  # method: the model family's preset (CNN: percentile); minmax | percentile | entropy | mse | auto"]
    lines += section("validation", 200) + [f"  task: {task}   # {why}"]
    lines += ["quantization:", f"  target: {target}   # xdna1 (Phoenix, Hawk Point) | xdna2 (Strix, Krackan) | cpu",
              f"  format: {fmt}   # the NPU's number format; npu-pipeline compare tries the others",
              "gates:   # floors that catch a conversion that silently broke; raise them to what you need"]
    for metric, value, what in GATES.get(task, []) + [SQNR_FLOOR]:
        lines.append(f"  - {{metric: {metric}, min: {value}}}   # {what}")
    text = "\n".join(lines) + "\n"
    import yaml

    recipe_from_dict(yaml.safe_load(text), source=str(out), base_dir=folder)  # a bad guess fails here, not in run
    from ..core.fileio import atomic_write

    atomic_write(out, text.encode())
    return InitResult(out, text, decisions)
