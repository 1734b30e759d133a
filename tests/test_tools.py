"""bench, parity and compare on real artifacts: the digits CNN through the real pipeline, in four formats.

One `compare` run (session fixture) builds the XINT8, A8W8, A16W8 and BF16 artifacts; bench and parity use
them. Parity's divergence case is the peers' U8S8 model (onnxruntime quantize_static: QUInt8 activations,
QInt8 per-channel weights, no reduce_range): onnxruntime's fused u8s8 kernels saturate on x86 without
VNNI, so on such a CPU parity must name the first saturating node; with VNNI it must pass. The
`qemu` test runs the same command on an emulated AVX2-only CPU, where the saturation is real.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import DataError
from pipeline.tools.common import provider_name
from pipeline.tools.compare import parse_bar

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "digits_cnn.yaml"
VALIDATION = ROOT / "calibration_data" / "digits" / "validation.npz"
CALIBRATION = ROOT / "calibration_data" / "digits" / "calibration.npz"
FORMATS = ("xint8", "a8w8", "a16w8", "bf16")
FIRST_SATURATING = "/features/features.0/Conv"  # the first Conv: u8 input x full-range s8 weights
runner = CliRunner()


def _cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _host_has_vnni() -> bool:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


@pytest.fixture(scope="session")
def compared(tmp_path_factory):
    """(out folder, seconds, stdout, compare.json) of a cold `compare` of the digits recipe in four formats."""
    out = tmp_path_factory.mktemp("compare")
    start = time.perf_counter()
    code, stdout, stderr = _cli("compare", RECIPE, "--formats", ",".join(FORMATS), "--out", out, "--runs", "20")
    assert code == 0, stdout + stderr
    return out, time.perf_counter() - start, stdout, json.loads((out / "compare.json").read_text())


@pytest.fixture(scope="session")
def u8s8_model(compared, tmp_path_factory) -> Path:
    """The peers' U8S8 digits model, quantized from the prepared float model the pipeline exported."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    images = np.load(CALIBRATION)["image"]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"image": x[None]} for x in images])

        def get_next(self):
            return next(self.items, None)

    path = tmp_path_factory.mktemp("u8s8") / "digits_u8s8.onnx"
    prepared = compared[0] / "xdna2-xint8" / "prepare" / "model.onnx"
    quantize_static(str(prepared), str(path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True, reduce_range=False)
    return path


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ compare


def test_compare_runs_each_format_and_picks_the_cheapest_meeting_the_gates(compared):
    out, seconds, stdout, report = compared
    variants = {v["format"]: v for v in report["variants"]}
    assert set(variants) == set(FORMATS)
    for fmt, v in variants.items():
        assert v["status"] == "passed", v
        assert f"xdna2-{fmt}" in stdout
        assert 99.0 <= v["accuracy"] <= 100.0 and v["sqnr_db"] > 25 and v["worst_layer_sqnr_db"] > 15
        assert 0 < v["npu_node_share"] <= 1 and v["npu_mac_share"] == 1.0
        assert v["cpu_p50_ms"] > 0 and v["model_mib"] > 0
        assert (out / f"xdna2-{fmt}" / "artifact" / "manifest.json").is_file()
    # 16-bit activations and bfloat16 are more accurate than int8 here, as they should be
    assert variants["a16w8"]["sqnr_db"] > variants["a8w8"]["sqnr_db"]
    assert variants["bf16"]["sqnr_db"] > variants["a16w8"]["sqnr_db"]
    # the cache is shared: after the first variant, export and prepare were not run again
    first = report["variants"][0]
    assert not any(first["stages_cached"].values())
    for v in report["variants"][1:]:
        assert v["stages_cached"]["export"] and v["stages_cached"]["prepare"], v
        assert v["stages_cached"]["calibrate"] == (v["format"] != "bf16")  # BF16 needs no statistics
    # every variant meets the recipe's gates: the cheapest NPU format wins
    assert report["bar"] == "gates of the recipe" and report["chosen"] == "xdna2-xint8"
    assert "cheapest variant meeting the bar (gates of the recipe): xdna2-xint8" in stdout
    assert "<svg" in (out / "compare.html").read_text()


def test_compare_rerun_reports_every_stage_cached(compared):
    out, cold, _, _ = compared
    start = time.perf_counter()
    code, stdout, stderr = _cli("compare", RECIPE, "--formats", ",".join(FORMATS), "--out", out, "--runs", "20",
                                "--bar", "top1_agreement>=99.5")
    cached = time.perf_counter() - start
    assert code == 0, stdout + stderr
    report = json.loads((out / "compare.json").read_text())
    assert all(all(v["stages_cached"].values()) and len(v["stages_cached"]) == 6 for v in report["variants"])
    assert stderr.count("6/6 stages cached") == len(FORMATS)
    assert report["chosen"] == "xdna2-xint8" and report["bar"] == "top1_agreement >= 99.5"
    assert cached < cold


def test_compare_records_gate_failures_and_formats_a_target_does_not_take(tmp_path: Path):
    """XINT8 recipe with a gate only BF16 reaches: the int8 variants fail their gates, the others go on,
    BF16 is chosen; xdna1 takes XINT8 only, so its BF16 variant is 'not offered'."""
    data = yaml.safe_load((ROOT / "recipes" / "digits_cnn_xint8.yaml").read_text())
    for section in ("calibration", "validation"):
        data[section]["data"]["path"] = str(ROOT / "recipes" / data[section]["data"]["path"])
    data["model"]["args"]["weights"] = str((ROOT / "recipes" / data["model"]["args"]["weights"]).resolve())
    data["gates"] = [{"metric": "sqnr_db", "min": 42.0}]
    recipe = tmp_path / "strict.yaml"
    recipe.write_text(yaml.safe_dump(data))
    code, stdout, stderr = _cli("compare", recipe, "--formats", "xint8,bf16", "--targets", "xdna1,xdna2",
                                "--out", tmp_path / "cmp", "--runs", "10")
    assert code == 0, stdout + stderr
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    status = {v["variant"]: v["status"] for v in report["variants"]}
    assert status["xdna1-xint8"] == "gates failed" and status["xdna2-xint8"] == "gates failed"
    assert status["xdna1-bf16"].startswith("not offered") and "does not take 'bf16'" in status["xdna1-bf16"]
    assert status["xdna2-bf16"] == "passed"
    assert report["chosen"] == "xdna2-bf16"
    # no variant meets a bar out of reach: exit 4, after writing the table
    code, stdout, stderr = _cli("compare", recipe, "--formats", "xint8", "--out", tmp_path / "cmp", "--bar", "sqnr_db>=99")
    assert code == 4 and "no variant" in stderr and "xdna2-xint8" in stdout


@pytest.mark.parametrize("bar", ["accuracy=99", "accuracy>=high", "latency>=3"])
def test_compare_refuses_a_bad_bar_before_running_anything(bar: str, tmp_path: Path):
    code, stdout, stderr = _cli("compare", RECIPE, "--bar", bar, "--out", tmp_path / "cmp")
    assert code == 2 and "--bar" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "cmp").exists()


def test_parse_bar_and_provider_names():
    assert str(parse_bar(" accuracy_drop <= 0.5 ")) == "accuracy_drop <= 0.5"
    assert parse_bar("accuracy>=99").holds(99.0) and not parse_bar("accuracy>=99").holds(98.9)
    assert provider_name("cpu") == provider_name("CPUExecutionProvider") == "CPUExecutionProvider"
    assert provider_name("VitisAI") == "VitisAIExecutionProvider"
    with pytest.raises(DataError, match="unknown execution provider"):
        provider_name("npu9000")


# -------------------------------------------------------------------------------------------- bench


def test_bench_measures_cpu_and_says_what_it_could_not_measure(compared, tmp_path: Path):
    artifact = compared[0] / "xdna2-a8w8" / "artifact"
    before = _tree(artifact)
    code, stdout, stderr = _cli("bench", artifact, "--ep", "cpu", "--ep", "vitisai", "--runs", "100", "--warmup", "5",
                                "--out", tmp_path / "bench")
    assert code == 0, stdout + stderr
    result = json.loads((tmp_path / "bench" / "bench.json").read_text())
    rows = {(r["model"], r["ep"]): r for r in result["rows"]}
    assert set(rows) == {(m, ep) for m in ("quantized", "float") for ep in ("CPUExecutionProvider", "VitisAIExecutionProvider")}
    for model in ("quantized", "float"):
        r = rows[(model, "CPUExecutionProvider")]
        assert r["status"] == "ok"
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["create_ms"] > 0 and r["first_run_ms"] > 0 and r["samples_per_s"] > 0 and r["runs"] == 100
        assert r["peak_rss_mib"] >= r["rss_before_session_mib"] > 10
        assert 0 < r["overhead_pct"] < 5.0  # the bound on the harness
        assert r["threads"] == result["settings"]["threads"] >= 1
        vitis = rows[(model, "VitisAIExecutionProvider")]
        if "VitisAIExecutionProvider" not in result["host"]["available_providers"]:
            assert vitis["status"] == "not available on this machine: not measured" and "p50_ms" not in vitis
    assert result["max_overhead_pct"] < 5.0
    assert "harness overhead: at most" in stdout and "not measured:" in stdout
    assert "<svg" in (tmp_path / "bench" / "bench.html").read_text()
    assert _tree(artifact) == before  # nothing written into the artifact (verify hashes it)
    assert _cli("verify", artifact)[0] == 0


def test_bench_takes_real_inputs_and_says_bf16_files_are_one_model(compared, tmp_path: Path):
    x = np.load(VALIDATION)["image"][:1]
    np.savez(tmp_path / "one.npz", image=x)
    artifact = compared[0] / "xdna2-bf16" / "artifact"
    code, stdout, stderr = _cli("bench", artifact, "--ep", "cpu", "--runs", "20", "--warmup", "2", "--threads", "1",
                                "--input", tmp_path / "one.npz")
    assert code == 0, stdout + stderr
    result = json.loads((compared[0] / "xdna2-bf16" / "bench" / "bench.json").read_text())  # default: beside it
    assert result["settings"]["inputs"].endswith("one.npz") and result["settings"]["threads"] == 1
    status = {r["model"]: r["status"] for r in result["rows"]}
    assert status == {"quantized": "ok", "float": "same file as the quantized model: see that row"}


def test_bench_refuses_bad_input(compared, tmp_path: Path):
    np.savez(tmp_path / "bad.npz", image=np.zeros((1, 3, 32, 32), np.float32))
    code, _, stderr = _cli("bench", compared[0] / "xdna2-a8w8" / "artifact", "--input", tmp_path / "bad.npz")
    assert code == 2 and "'image' is float32[1, 3, 32, 32], the model takes float32[1, 1, 32, 32]" in stderr
    code, _, stderr = _cli("bench", tmp_path, "--runs", "20")
    assert code == 6 and "no manifest.json" in stderr
    code, _, stderr = _cli("bench", compared[0] / "xdna2-a8w8" / "artifact", "--runs", "3")
    assert code == 2 and "--runs 3" in stderr


# ------------------------------------------------------------------------------------------- parity


def test_parity_on_the_u8s8_model_follows_the_cpu(u8s8_model, tmp_path: Path):
    """Without VNNI the fused u8s8 kernels saturate: parity fails (exit 4) and names the first Conv.
    With VNNI they do not: parity passes. Either way the command ran on a real divergence-prone model."""
    code, stdout, stderr = _cli("parity", u8s8_model, "--ep", "cpu", "--data", VALIDATION, "--labels", "label",
                                "--json", tmp_path / "parity.json")
    result = json.loads((tmp_path / "parity.json").read_text())
    assert result["samples"] == 360
    if _host_has_vnni():
        assert code == 0, stdout + stderr
        assert result["passed"] and result["divergence"] is None and "parity passed" in stdout
        assert result["outputs"][0]["top1_agreement"] >= 99.0
        assert result["cpu"]["saturation_expected"] is False
    else:
        assert code == 4, stdout + stderr
        assert f"first diverging node: '{FIRST_SATURATING}' (Conv" in stdout
        assert result["divergence"]["node"] == FIRST_SATURATING and result["divergence"]["max_lsb"] > 1
        assert "parity failed on CPUExecutionProvider" in stderr


def test_parity_localisation_compares_q_outputs_with_the_fusion_kept(u8s8_model):
    """--localize always on the U8S8 model: every activation Q output exposed, the EP's outputs unchanged
    by the exposure, and each tensor's difference measured in LSBs."""
    from pipeline.tools.parity import parity

    result = parity(u8s8_model, "cpu", data=VALIDATION, labels="label", localize="always")
    assert "exposed at once" in result.localisation and "fusion kept" in result.localisation
    tensors = [p["tensor"] for p in result.profile]
    assert len(tensors) == 9 and tensors[0] == "image_QuantizeLinear_Output"
    assert all(p["max_lsb"] is not None and p["max_lsb"] >= 0 for p in result.profile)
    if _host_has_vnni():
        assert all(p["max_lsb"] <= 1 for p in result.profile)  # rounding only
    else:
        assert result.divergence.node == FIRST_SATURATING


def _qemu() -> str | None:
    return os.environ.get("NPU_PIPELINE_QEMU") or shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")


@pytest.mark.slow
@pytest.mark.skipif(_qemu() is None, reason="needs qemu-user (apt install qemu-user-static, or NPU_PIPELINE_QEMU=path) "
                                          "to emulate an AVX2-only CPU")
def test_parity_names_the_saturating_node_on_an_avx2_only_cpu(u8s8_model, tmp_path: Path):
    """The real AVX2 u8s8 kernel (qemu's Haswell has no VNNI): saturation, and parity names its node."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmd = [_qemu(), "-cpu", "Haswell", sys.executable, "-m", "pipeline.cli", "parity", str(u8s8_model), "--ep", "cpu",
           "--data", str(VALIDATION), "--labels", "label", "--json", str(tmp_path / "p.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["cpu"]["saturation_expected"] is True
    d = result["divergence"]
    assert d["node"] == FIRST_SATURATING and d["op_type"] == "Conv" and d["max_lsb"] > 16
    assert f"first diverging node: '{FIRST_SATURATING}' (Conv)" in proc.stdout
    assert result["outputs"][0]["accuracy_ep"] < result["outputs"][0]["accuracy_reference"]


def test_parity_passes_on_pipeline_artifacts(compared):
    """The pipeline's own A8W8 artifact (int8 symmetric: no u8s8 saturation) and BF16 artifact (float32 on
    the CPU against bfloat16 emulation) are within tolerance on the CPU EP."""
    for fmt, reference in (("a8w8", "unfused QDQ"), ("bf16", "bfloat16 rounding")):
        code, stdout, stderr = _cli("parity", compared[0] / f"xdna2-{fmt}" / "artifact", "--ep", "cpu",
                                    "--recipe", RECIPE, "--localize", "always")
        assert code == 0, stdout + stderr
        assert reference in stdout and "parity passed" in stdout
        assert ("Q outputs (integers)" if fmt == "a8w8" else "float node outputs") in stdout


def test_parity_refuses_a_missing_ep_and_missing_samples(compared):
    artifact = compared[0] / "xdna2-a8w8" / "artifact"
    code, _, stderr = _cli("parity", artifact, "--ep", "vitisai", "--recipe", RECIPE)
    if "VitisAIExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        assert code == 2 and "not available on this machine" in stderr
    code, _, stderr = _cli("parity", artifact, "--ep", "cpu")
    assert code == 2 and "--recipe RECIPE" in stderr and "--data FILE.npz" in stderr


# ------------------------------------------------------------------------------------------ make bench


def test_make_bench_reports_every_stage_and_the_floor_of_each_ratio_target(tmp_path: Path):
    """`python -m pipeline.bench` (what `make bench` runs) on the digits recipe: every stage timed in a fresh
    child, each ratio target with the floor the stage cannot go below (data + float model, + the emulated
    model for validate), measured in the same run."""
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "pipeline.bench", "--recipes", "digits_cnn", "--memory-sizes",
                             "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    digits = report["recipes"]["digits_cnn"]
    assert list(digits["stages"]) == ["export", "prepare", "calibrate", "quantize", "validate", "package"]
    floats = digits["float_inference"]
    assert floats["calibration"]["samples"] == digits["stages"]["calibrate"]["samples"]
    assert floats["emulated_validation"]["samples"] == floats["validation"]["samples"]
    for stage, parts in (("calibrate", {"data", "float model"}), ("validate", {"data", "float model", "emulated model"})):
        floor = digits["floors"][stage]
        assert set(floor["parts"]) == parts and all(v >= 0 for v in floor["parts"].values())
        # The float model alone is 1x: a floor is never under it.
        assert floor["ratio"] >= 1.0 and floor["seconds"] == pytest.approx(sum(floor["parts"].values()), abs=2e-3)
    ratios = {v["target"]: v for v in report["targets"] if "floor" in v}
    assert set(ratios) == {"digits_cnn validate <= 2.5x float", "digits_cnn calibrate <= 1.3x float"}
    for verdict in ratios.values():
        assert verdict["holds"] == (verdict["value"] <= float(verdict["target"].split("<= ")[1].rstrip("x float")))
    assert f"targets: {report['targets_held']}/{report['targets_total']} hold" in result.stdout
    assert "validate floor: data" in result.stdout
