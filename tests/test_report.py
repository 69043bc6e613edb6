"""The verdict logic: slower int8 is called out, the recommendation respects the accuracy budget."""

from __future__ import annotations

from pathlib import Path

from edgekit.config import Recipe, load_device
from edgekit.data.tasks import Task
from edgekit.pipeline import Variant, _assemble
from edgekit.report import to_html, to_markdown
from edgekit import zoo


def _variant(name, acc, p50, speedup):
    v = Variant(name, "onnx", name, Path(f"model.{name}.onnx"), "baseline", 1000, 2000)
    v.accuracy, v.agreement, v.size_mb, v.speedup = acc, 1.0, 1.0, speedup
    v.latency_ms = {"p50": p50, "p90": p50 * 1.1, "source": "measured", "runs": 100}
    return v


def _report(variants, budget=0.5, target=None):
    task = Task("mnist", 10, 3, 64, {"train": [], "calib": [], "eval": []})
    return _assemble(zoo.get_spec("shufflenetv2"), Recipe(name="int8", accuracy_budget_pp=budget),
                     load_device("desktop-cpu"), task, {"source": "trained"}, [], variants, [], target, 0, Path("."))


def test_slower_int8_is_called_out_and_fp32_recommended():
    r = _report([_variant("fp32", 0.97, 1.0, 1.0), _variant("int8", 0.968, 1.4, 0.71)])
    assert r["recommended"] == {"name": "fp32", "format": "onnx", "latency_source": "measured"}
    assert any("SLOWER than fp32" in n and "use fp32" in n for n in r["notes"])
    md = to_markdown(r)
    assert "SLOWER than fp32" in md and "Recommended for desktop-cpu: **fp32**" in md
    assert "<svg" in to_html(r)


def test_faster_int8_within_budget_is_recommended():
    r = _report([_variant("fp32", 0.97, 1.0, 1.0), _variant("int8", 0.966, 0.7, 1.43)])
    assert r["recommended"]["name"] == "int8"
    assert not any("SLOWER" in n for n in r["notes"])


def test_accuracy_budget_excludes_a_fast_but_worse_variant():
    r = _report([_variant("fp32", 0.97, 1.0, 1.0), _variant("int8", 0.95, 0.5, 2.0)], budget=0.5)
    assert r["recommended"]["name"] == "fp32"
    assert any("loses 2.00 points" in n for n in r["notes"])


def test_target_met_and_missed():
    vs = [_variant("fp32", 0.97, 1.0, 1.0), _variant("int8", 0.969, 0.6, 1.6)]
    assert _report(vs, target=0.8)["target"]["met"] is True
    vs = [_variant("fp32", 0.97, 1.0, 1.0), _variant("int8", 0.969, 0.6, 1.6)]
    missed = _report(vs, target=0.5)["target"]
    assert missed["met"] is False and missed["variant"] == "int8" and missed["source"] == "measured"


def test_quantization_search_is_shown_in_markdown_and_html():
    v = _variant("int8", 0.969, 0.6, 1.6)
    rows = [{"config": "QDQ U8S8 per-channel minmax", "sqnr_db": 30.0, "calib_agreement": 1.0, "p50_ms": 0.5,
             "eligible": True, "chosen": True, "final_p50_ms": 0.45},
            {"config": "QDQ S8S8 per-tensor minmax", "sqnr_db": 20.0, "calib_agreement": 0.98, "p50_ms": 0.4,
             "eligible": False, "chosen": False}]
    v.info = {"quantization": {"config": "QDQ U8S8 per-channel minmax", "tool": "onnxruntime",
                                  "calibration_sqnr_db": {"minmax": 30.0, "percentile": 29.0}, "search": rows}}
    r = _report([_variant("fp32", 0.97, 1.0, 1.0), v])
    md = to_markdown(r)
    assert "## Quantization" in md and "minmax 30.0 dB, percentile 29.0 dB" in md
    assert "| QDQ U8S8 per-channel minmax | 30.0 | 100.0% | 0.500 | 0.450 | chosen |" in md
    assert "| QDQ S8S8 per-tensor minmax | 20.0 | 98.0% | 0.400 |  | not accurate enough |" in md
    assert "<h2>Quantization</h2>" in to_html(r)
    v.info["quantization"]["failed"] = {"percentile conv-only": "Too many bins for data range."}
    assert "skipped (ONNX Runtime failed): percentile conv-only (Too many bins for data range.)" in to_markdown(r)
    assert "## Quantization" not in to_markdown(_report([_variant("fp32", 0.97, 1.0, 1.0)]))
