"""Package: the deployable bundle in `<run>/artifact/`.

    model.onnx            what the NPU runs (QDQ model; for BF16 the float32 model the EP converts)
    model.float.onnx      the float reference it was validated against
    vitisai_ep.json       VitisAI execution provider options for the target chip family
    vitisai_config.json   BF16 compile options (BF16 only)
    placement.json        predicted NPU/CPU placement and readiness (`npu-pipeline inspect`)
    layer_errors.json     per-layer SQNR/cosine, worst first (validate)
    transforms.json       what the accuracy transforms did, per layer (when the recipe asks for any)
    fallback.json         the accuracy-aware fallback's search: every scored config, the chosen one
    manifest.json         recipe, I/O signature, settings, metrics, gates, versions, sha256 of every file,
                          and `manifest_sha256`: the sha256 of the manifest's own canonical JSON without it
    manifest.sig          Ed25519 signature of manifest.json (with `--sign-key`; `pipeline.core.signing`)
    report.md             what a person reads: accuracy, gates, placement, per-stage time
    report.html           the same and the plots (per-layer SQNR, fallback curve, histograms); offline

The artifact is checked against its target's hard rules (`inspect_model`, with the recipe's format); the
verdict is in placement.json and the report, and the stage's metrics carry it (`ready`, `violations`), so
that `run` exits 5 (ReadinessError) after the bundle is written when the pipeline's own model breaks one.

Everything but `report.md` is deterministic (no timestamps, sorted keys; report.html and the Ed25519
signature included), so two clean runs give byte-identical files; `report.md` holds wall-clock stage times
and is therefore not hashed. `verify` (pipeline.bundle) checks the exact file set against `files`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hashlib

from ..core import signing
from ..core.fileio import atomic_write, dump_json, sha256_file
from ..core.onnx_io import load_onnx
from ..gates import evaluate_gates
from ..inspect import inspect_model, write_json
from ..recipe import Recipe
from ..report import render_html, render_markdown, worst_histograms
from ..runner import RunContext, Stage, library_versions

__all__ = ["PackageStage", "STAGE_ORDER", "UNHASHED", "manifest_digest"]

STAGE_ORDER = ("export", "prepare", "calibrate", "quantize", "validate")
UNHASHED = {"report.md", "manifest.json", "stage.json", signing.SIGNATURE_FILE}


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own `manifest_sha256` (what `verify` recomputes)."""
    rest = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(dump_json(rest).encode()).hexdigest()


def _signature(model) -> dict:
    from onnx import helper

    def describe(values):
        return [
            {
                "name": v.name,
                "dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    init = {i.name for i in model.graph.initializer}
    return {"inputs": describe([i for i in model.graph.input if i.name not in init]), "outputs": describe(model.graph.output)}


class PackageStage(Stage):
    name = "package"
    folder = "artifact"
    outputs = ("model.onnx", "model.float.onnx", "vitisai_ep.json", "placement.json", "manifest.json",
               "report.md", "report.html")
    optional_outputs = ("vitisai_config.json", "layer_errors.json", "transforms.json", "fallback.json",
                        signing.SIGNATURE_FILE)
    # The manifest embeds the whole recipe, so every section is part of the key.
    sections = tuple(name for name in Recipe.model_fields if name != "base_dir")
    after = ("prepare", "calibrate", "quantize", "validate")
    # 2: layer_errors/transforms/fallback JSON and report.html; 3: manifest_sha256, signing
    # 4: per-output metrics and gates, the dead-channel gate, range guard
    # 5: MAC shares by kind (int8 x int8 as audited)
    # 6: readiness verdict in the stage metrics
    revision = 6
    disposable = ("vitisai_cache",)  # the VitisAI EP's compile cache, made by `infer` on an NPU

    def __init__(self, sign_key: Path | None = None) -> None:
        # The private key signs manifest.json; loaded here so a bad key fails before any stage runs.
        self.sign_key = signing.load_private_key(sign_key) if sign_key is not None else None

    def extra_key(self, ctx: RunContext) -> dict:
        return {"signing_key": signing.key_id(self.sign_key.public_key()) if self.sign_key else None}

    def run(self, ctx: RunContext, out: Path) -> dict:
        recipe = ctx.recipe
        target, fmt = recipe.target_and_format()
        shutil.copyfile(ctx.require("quantize", "model.onnx"), out / "model.onnx")
        shutil.copyfile(ctx.require("prepare", "model.onnx"), out / "model.float.onnx")
        model_hash = sha256_file(out / "model.onnx")
        options = target.provider_options(model_hash, fmt)
        config = target.vitisai_config(fmt)
        if config is not None:
            atomic_write(out / "vitisai_config.json", dump_json(config))
        atomic_write(out / "vitisai_ep.json", dump_json(options))
        model = load_onnx(out / "model.onnx", where="quantized model")
        inspection = inspect_model(model, target, fmt, unbatched=[i.name for i in recipe.inputs if not i.has_batch])
        write_json(inspection, out / "placement.json")
        metrics = json.loads(ctx.require("validate", "metrics.json").read_text())
        gates = evaluate_gates(list(recipe.gates), metrics, validation=recipe.validation,
                               states={i.from_output: i.name for i in recipe.state_inputs()})
        records = {name: ctx.record(name) for name in STAGE_ORDER}
        quant_record = records["quantize"].metrics
        extras = _copy_reports(ctx, out)
        manifest = {
            "name": recipe.name,
            "description": recipe.description,
            "target": target.name,
            "format": fmt.value,
            "signature": _signature(model),
            "quantization": {
                **recipe.model_dump(mode="json")["quantization"],
                "format": fmt.value,
                "transforms": [step.model_dump(mode="json") for step in recipe.quantization.transform_steps()],
                "calibration_method": recipe.calibration.method,
                # What the quantize stage applied: the recipe's choices, and its preset's where it is silent.
                "applied": quant_record.get("settings", {}),
                "calibration_samples": records["calibrate"].metrics.get("samples"),
                "excluded_nodes": quant_record.get("excluded_nodes", []),
                # int8 x int8 / 16-bit / float MAC shares as an audit of model.onnx counts them
                "mac_shares": quant_record.get("mac_shares"),
            },
            "metrics": metrics,  # every output by name under "outputs"
            "gates": [g.as_dict() for g in gates],
            "gates_passed": all(g.passed for g in gates),
            "range_guard": quant_record.get("range_guard"),
            "placement": inspection.summary(),
            "recipe": recipe.model_dump(mode="json"),
            "versions": library_versions(),
            "stage_keys": {name: rec.key for name, rec in records.items()},
        }
        if extras:
            manifest["accuracy_work"] = _accuracy_summary(extras)
        _write_html(ctx, out, manifest, metrics, extras)
        files = {
            p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file() and p.name not in UNHASHED
        }
        manifest["files"] = files
        if self.sign_key is not None:
            manifest["signing_key"] = signing.key_id(self.sign_key.public_key())
        manifest["manifest_sha256"] = manifest_digest(manifest)
        text = dump_json(manifest)
        atomic_write(out / "manifest.json", text)
        if self.sign_key is not None:
            atomic_write(out / signing.SIGNATURE_FILE, signing.sign(text.encode(), self.sign_key))
        atomic_write(out / "report.md", render_markdown(manifest, metrics, records, inspection, **extras))
        return {
            "gates_passed": manifest["gates_passed"], "gates": manifest["gates"], "files": files,
            "ready": inspection.ok,
            "violations": [f"[{f.rule}] {f.where}: {f.message}" for f in inspection.violations[:_VIOLATIONS_KEPT]],
            "violation_count": len(inspection.violations),
        }


_VIOLATIONS_KEPT = 20  # in the stage metrics; placement.json has them all
_REPORTS = (("layer_errors", "validate"), ("transforms", "quantize"), ("fallback", "quantize"))


def _copy_reports(ctx: RunContext, out: Path) -> dict:
    """Copy the per-layer, transform and fallback JSON into the bundle; returns them by name."""
    found = {}
    for name, stage in _REPORTS:
        source = ctx.optional(stage, f"{name}.json")
        if source is not None:
            shutil.copyfile(source, out / source.name)
            found[name] = json.loads(source.read_text())
    if "transforms" in found:
        found["transforms"] = found["transforms"]["transforms"]
    return found


def _accuracy_summary(extras: dict) -> dict:
    summary = {}
    if "transforms" in extras:
        summary["transforms"] = {name: len(part["applied"]) for name, part in sorted(extras["transforms"].items())}
    if "fallback" in extras:
        fb = extras["fallback"]
        summary["fallback"] = {
            "passed_on_held_out": fb["passed"],
            "promoted_to_16_bits": len(fb["config"]["promoted_to_16_bits"]),
            "a16w8_nodes": len(fb["config"].get("a16w8_nodes", [])),
            "bf16_nodes": len(fb["config"]["bf16_nodes"]),
            "cpu_nodes": len(fb["config"]["cpu_nodes"]),
            "shares": fb["chosen"]["shares"] if fb.get("chosen") else None,
        }
    if "layer_errors" in extras:
        summary["worst_layers"] = [
            {"tensor": l["tensor"], "sqnr_db": l["sqnr_db"]} for l in extras["layer_errors"]["layers"][:5]
        ]
    return summary


def _write_html(ctx: RunContext, out: Path, manifest: dict, metrics: dict, extras: dict) -> None:
    # Statistics recollected after transforms, else calibrate's (none for BF16).
    stats = ctx.optional("quantize", "stats.npz") or ctx.optional("calibrate", "stats.npz")
    ranges = json.loads(ctx.require("quantize", "ranges.json").read_text()).get("tensors", {})
    page = render_html(
        manifest=manifest,
        metrics=metrics,
        layer_errors=extras.get("layer_errors"),
        fallback=extras.get("fallback"),
        transforms=extras.get("transforms"),
        histograms=worst_histograms(extras.get("layer_errors"), stats, ranges),
    )
    atomic_write(out / "report.html", page)
