"""report.html (`pipeline.report.html`): self-contained, deterministic, escaped, and in every artifact."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from pipeline.quant.histogram import StatsCollector, TensorStats
from pipeline.report import histogram_series, render_html, svg_bars, svg_scatter, worst_histograms

MANIFEST = {
    "name": "demo", "description": "a <demo> & test", "target": "xdna2", "format": "a8w8",
    "gates": [{"metric": "cosine_mean", "value": 0.95, "min": 0.99, "max": None, "passed": False}],
    "placement": {"nodes_npu": 10, "nodes_cpu": 1, "npu_mac_share": 1.0},
}
METRICS = {"samples": 8, "task": "embedding", "numerics": "npu-emulated", "cosine_mean": 0.95, "sqnr_db": 12.0}
LAYERS = {"samples": 4, "float_model": "prepare/model.onnx", "layers": [
    {"tensor": "a<b>", "producer": "n1", "op_type": "Add", "order": 3, "sqnr_db": 3.5, "cosine": 0.9},
    {"tensor": "scores", "producer": "n2", "op_type": "Add", "order": 1, "sqnr_db": 20.0, "cosine": 0.99,
     "note": "additive attention mask: masked positions excluded"},
    {"tensor": "c", "producer": "n3", "op_type": "MatMul", "order": 2, "sqnr_db": 30.0, "cosine": 0.999},
]}


def _shares(int8):
    return {"mac_share_int8": int8, "mac_share_npu": 1.0, "node_share_npu": 1.0}


FALLBACK = {
    "passed": True,
    "config": {"promoted_to_16_bits": ["a<b>"], "bf16_nodes": [], "cpu_nodes": []},
    "points": [
        {"rung": "baseline", "units": 0, "metrics": {"cosine_mean": 0.95}, "shares": _shares(1.0), "passed": False},
        {"rung": "a16", "units": 2, "metrics": {"cosine_mean": 0.995}, "shares": _shares(0.6), "passed": True},
        {"rung": "a16", "units": 1, "metrics": {"cosine_mean": 0.991}, "shares": _shares(0.8), "passed": True},
    ],
    "notes": ["held-out split: calibration samples 8..15"],
}
FALLBACK["chosen"] = FALLBACK["points"][2]


def _page(**extra) -> str:
    stats = TensorStats("a<b>")
    stats.update(np.linspace(-3, 3, 1000, dtype=np.float32), -3, 3)
    edges, counts = histogram_series(stats)
    hist = [{"tensor": "a<b>", "edges": edges.tolist(), "counts": counts.tolist(), "lo": -2.0, "hi": 2.0,
             "bits": 8, "sqnr_db": 3.5}]
    return render_html(manifest=MANIFEST, metrics=METRICS, layer_errors=LAYERS, fallback=FALLBACK,
                       transforms={"smoothquant": {"applied": [{"tensor": "x", "folded_into": "Mul 'm'",
                                                                 "act_range_before": 10.0, "act_range_after": 2.0,
                                                                 "weight_range_before": 1.0, "weight_range_after": 3.0}],
                                                   "skipped": [{"tensor": "y", "reason": "shared"}], "samples": 4}},
                       histograms=hist, **extra)


def test_page_is_self_contained_and_has_every_plot():
    page = _page()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page and "src=" not in page and "href=" not in page and "@import" not in page
    # The only URL is the SVG namespace, which browsers never fetch.
    assert set(re.findall(r"https?://[^\"' ]+", page)) == {"http://www.w3.org/2000/svg"}
    for plot in ("per-layer SQNR", "worst layers", "fallback curve", "a&lt;b&gt;"):
        assert plot in page
    assert page.count("<svg") == 4  # SQNR scatter, worst bars, fallback curve, one histogram
    assert "Accuracy transforms" in page and "masked positions excluded" in page


def test_page_escapes_names_and_is_deterministic():
    page = _page()
    assert "a<b>" not in page and "&lt;demo&gt; &amp; test" in page
    assert page == _page()


def test_fallback_curve_marks_threshold_and_chosen_point():
    page = _page()
    svg = page[page.index('aria-label="fallback curve a16"'):]
    svg = svg[: svg.index("</svg>")]
    assert 'stroke-dasharray="5,4"' in svg  # the 0.99 gate
    assert svg.count('r="8"') == 1  # one ring: the chosen configuration


def test_empty_inputs_give_a_page_without_plots():
    page = render_html(manifest=MANIFEST, metrics=METRICS)
    assert "<svg" not in page and "Accuracy" in page
    assert svg_scatter([], xlabel="x", ylabel="y", title="t") == "" and svg_bars([], xlabel="x", title="t") == ""


def test_histogram_series_keeps_every_count():
    stats = TensorStats("t")
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.standard_normal(4096).astype(np.float32) * 3
        stats.update(x, x.min(), x.max())
    edges, counts = histogram_series(stats, bins=40)
    assert len(edges) == 41 and counts.sum() == pytest.approx(stats.hist.sum())
    assert edges[0] <= stats.min and edges[-1] >= stats.max


def test_worst_histograms_reads_saved_statistics(tmp_path):
    collector = StatsCollector(["a<b>", "c"])
    for name in collector.names:
        x = np.arange(-50, 50, dtype=np.float32)
        collector.update(name, x, x.min(), x.max())
    collector.save(tmp_path / "stats.npz")
    ranges = {"a<b>": {"lo": -10.0, "hi": 10.0, "bits": 8}, "c": {"lo": -50.0, "hi": 50.0, "bits": 16}}
    found = worst_histograms(LAYERS, tmp_path / "stats.npz", ranges, count=5)
    assert [h["tensor"] for h in found] == ["a<b>", "c"]  # "scores" has no statistics: skipped
    assert worst_histograms(LAYERS, tmp_path / "missing.npz", ranges) == []


def test_every_artifact_has_a_hashed_deterministic_report(tiny_cnn_recipe, tmp_path):
    from pipeline.api import run_recipe
    from pipeline.recipe import load_recipe
    from pipeline.core.fileio import sha256_file

    recipe = load_recipe(tiny_cnn_recipe(quantization={"target": "xdna2", "format": "a8w8",
                                                       "cross_layer_equalization": True}))
    pages = []
    for name in ("one", "two"):
        result = run_recipe(recipe, out=tmp_path / name, progress=False, check_gates=False)
        manifest = json.loads((result.artifact / "manifest.json").read_text())
        assert manifest["files"]["report.html"] == sha256_file(result.artifact / "report.html")
        assert {"layer_errors.json", "transforms.json"} <= set(manifest["files"])
        pages.append((result.artifact / "report.html").read_bytes())
        assert "worst_layers" in manifest["accuracy_work"]
    assert pages[0] == pages[1]
    page = pages[0].decode()
    assert "per-layer SQNR" in page and "Activations of the worst layers" in page
