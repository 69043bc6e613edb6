"""Issue 29, item 2: the int8 fallback hands the layers that cost agreement back to float until the budget holds on
the calibration split, prices every step against fp32, stops at the budget, and never has a slower int8 recommended.

The model is made hard to quantize on purpose: a conv's output channel 0 gets 300x the range of the others and the
next conv reads it 300x weaker (fp32 computes the same function; ReLU is positively homogeneous), so per-tensor
activation ranges crush the other channels into a few int8 steps.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgekit.config import Recipe, load_device
from edgekit.data.tasks import Task
from edgekit.errors import EdgekitError
from edgekit.export import ExportContext
from edgekit.export import fallback as fb
from edgekit.export.onnx import export_onnx, export_variant
from edgekit.export.onnx_int8 import CONV_ONLY, OrtQuantConfig, quantize_onnx
from edgekit.formats import FORMATS, OnnxOptions, validate_options
from edgekit.pipeline import Variant, assemble_report
from edgekit.report import fallback_plots, to_html, to_markdown
from edgekit.results import Latency
from edgekit.runtime import load_runner

N = 48


def _hard(spots=(2,)) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)).eval()
    with torch.no_grad():
        for i in spots:  # conv i's channel 0: 300x the range; conv i+2 reads it 300x weaker
            m[i].weight[0] *= 300
            m[i].bias[0] *= 300
            m[i + 2].weight[:, 0] /= 300
    return m


def _task(model: nn.Module, labelled: bool) -> Task:
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(N, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        y = model(x).argmax(1) if labelled else torch.full((N,), -1)
    ds = TensorDataset(x, y)
    return Task("hard", 10 if labelled else None, 3, 32, {"train": ds, "calib": ds, "eval": ds}, labelled=labelled)


def _ctx(tmp_path, task, timer=None, device="desktop-cpu"):
    return ExportContext(out_dir=tmp_path, task=task, device=load_device(device), input_shape=task.input_shape,
                         name="int8", timer=timer)


def _options(**kw) -> OnnxOptions:
    return OnnxOptions(calibration="minmax", search="none", num_calib=N, **kw)


def _float_convs(path: Path) -> set:
    """Conv nodes whose weights are plain initializers (no DequantizeLinear): kept in float."""
    m = onnx.load(str(path))
    inits = {i.name for i in m.graph.initializer}
    return {n.name for n in m.graph.node if n.op_type == "Conv" and n.input[1] in inits}


def _agreement(a: Path, b: Path, x: np.ndarray) -> float:
    ra, rb = load_runner("onnxruntime", a, threads=1).run, load_runner("onnxruntime", b, threads=1).run
    return float(np.mean([ra(x[i:i + 1]).argmax() == rb(x[i:i + 1]).argmax() for i in range(len(x))]))


@pytest.mark.parametrize("device,timed", [("rpi4", False), ("desktop-cpu", True)])
def test_fallback_keeps_the_offending_layers_in_float_and_meets_the_budget(tmp_path, device, timed):
    from edgekit.measure.local import interleaved_latency

    model = _hard()
    task = _task(model, labelled=False)
    ctx = _ctx(tmp_path, task, timer=interleaved_latency if timed else None, device=device)
    out = export_variant(model, "int8", _options(min_agreement=0.97), ctx)
    q = ctx.info["quantization"]
    rec = q["fallback"]
    steps = rec["steps"]
    assert steps[0]["agreement"] < 0.9  # int8 as made loses measurable agreement ...
    assert rec["met"] and rec["met_at_step"] == len(steps) - 1 >= 1  # ... the fallback stops at the first step that holds
    assert all(s["agreement"] < 0.97 for s in steps[:-1]) and steps[-1]["agreement"] >= 0.97
    assert steps[1]["layers"][0]["node"] == "/4/Conv"  # the conv that reads the widened channel goes first ...
    assert {"/2/Conv", "/4/Conv"} <= _float_convs(out)  # ... with the conv whose output it reads: that tensor is float
    assert "/0/Conv" not in _float_convs(out)
    assert q["nodes_to_exclude"] == steps[-1]["float_nodes"] and q["config"].endswith(
        f"+{len(steps[-1]['float_nodes'])} nodes fp32")
    fp32 = tmp_path / "model.int8.fp32-src.onnx"
    x = task.arrays("calib")[0]
    assert _agreement(fp32, out, x) == pytest.approx(steps[-1]["agreement"])  # the shipped file is the step's
    assert rec["latency_source"] == ("measured" if timed else "estimated")
    for s in steps:
        assert s["p50_ms"] > 0 and s["latency_source"] == rec["latency_source"]
        r, lo, hi = s["vs_fp32"]
        assert lo <= r <= hi and (lo < hi) == timed  # timed: an interval from the per-round times
        assert s["faster_than_fp32"] == (lo > 1)
    assert rec["recommend_fp32"] == (not steps[-1]["faster_than_fp32"])
    assert "eval split stays unseen" in rec["judged_on"]


def test_conv_only_scope_hands_back_the_relu_and_the_conv_behind_it(tmp_path):
    """Conv-only quantizes the conv's output and the ReLU's output: both must go for the conv to read float."""
    model = _hard()
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", (1, 3, 32, 32))
    x = _task(model, False).arrays("calib")[0]
    int8 = quantize_onnx(fp32, tmp_path / "int8.onnx", x, OrtQuantConfig(calibration="minmax", op_types=list(CONV_ONLY)))
    assert fb.layer_group(onnx.load(str(int8)), "/4/Conv") == ("/4/Conv", "/3/Relu", "/2/Conv")
    assert fb.quantized_layers(onnx.load(str(int8))) == ["/0/Conv", "/2/Conv", "/4/Conv"]  # not the fp32 logits Gemm


def _fake_pricer(fp32_ms: float, int8_ms: float, per_float_conv_ms: float):
    """Deterministic prices: fp32 as given; an int8 step costs more for each conv it keeps in float."""
    def price(paths):
        out = {k: {"p50": fp32_ms if k == "fp32" else int8_ms + per_float_conv_ms * len(_float_convs(p))}
               for k, p in paths.items()}
        return out, "estimated"
    return price


@pytest.fixture
def two_spots(tmp_path):
    """Runs the fallback on a model with two widened channels, int8 made afresh each time (the fallback writes the
    step it ships over the int8 file): (budget, pricer, max_steps) -> (path, config, record)."""
    model = _hard(spots=(0, 2))
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", (1, 3, 32, 32))
    x = _task(model, False).arrays("calib")[0]
    cfg = OrtQuantConfig(calibration="minmax")

    def run(min_agreement, price, max_steps=None):
        int8 = quantize_onnx(fp32, tmp_path / "int8.onnx", x, cfg)
        return fb.int8_fallback(fp32, int8, x, None, cfg, fb.Budget(min_agreement=min_agreement), price, max_steps)
    return run


def test_a_budget_not_met_within_the_steps_ships_the_closest_and_says_use_fp32(two_spots):
    out, c, rec = two_spots(1.0, _fake_pricer(1.0, 0.5, 0.1), max_steps=1)
    steps = rec["steps"]
    assert len(steps) == 2 and not rec["met"] and rec["met_at_step"] is None
    assert steps[1]["agreement"] > steps[0]["agreement"] and steps[1]["agreement"] < 1.0
    assert rec["shipped_step"] == 1 and c.nodes_to_exclude == tuple(steps[1]["float_nodes"])
    assert rec["recommend_fp32"] and "not met within 1 steps" in rec["outcome"] and "fp32 is recommended" in \
        rec["outcome"]


def test_a_budget_met_only_slower_than_fp32_is_not_recommended(two_spots):
    _, _, rec = two_spots(0.99, _fake_pricer(1.0, 0.8, 0.15))
    chosen = rec["steps"][rec["met_at_step"]]
    assert rec["met"] and chosen["p50_ms"] > 1.0 and not chosen["faster_than_fp32"]
    assert rec["recommend_fp32"] and "not faster than fp32" in rec["outcome"]
    # priced faster: the same fallback ships int8
    _, _, rec = two_spots(0.99, _fake_pricer(1.0, 0.3, 0.15))
    assert rec["met"] and rec["steps"][rec["met_at_step"]]["faster_than_fp32"] and not rec["recommend_fp32"]


def test_max_drop_pp_is_judged_on_the_calibration_labels(tmp_path):
    model = _hard()
    task = _task(model, labelled=True)  # labels: fp32's own top-1, so fp32 scores 100%
    ctx = _ctx(tmp_path, task, device="rpi4")
    export_variant(model, "int8", _options(max_drop_pp=2.0), ctx)
    rec = ctx.info["quantization"]["fallback"]
    assert rec["metric"] == "accuracy" and rec["steps"][0]["drop_pp"] > 2.0
    assert rec["met"] and rec["steps"][-1]["drop_pp"] <= 2.0
    assert rec["steps"][-1]["drop_pp"] == pytest.approx(100 * (1 - rec["steps"][-1]["accuracy"]), abs=0.01)


def test_max_drop_pp_needs_labels_and_options_are_checked(tmp_path):
    model = _hard()
    with pytest.raises(EdgekitError, match="max_drop_pp .* has none: use min_agreement"):
        export_variant(model, "int8", _options(max_drop_pp=1.0), _ctx(tmp_path, _task(model, labelled=False)))
    onnx_fmt = FORMATS.get("onnx")
    for bad, says in (({"min_agreement": 1.5}, "less than or equal to 1"), ({"min_agreement": 0}, "greater than 0"),
                      ({"max_drop_pp": -1}, "greater than or equal to 0"), ({"min_agreement": True}, "valid number")):
        with pytest.raises(EdgekitError, match=says):
            validate_options(onnx_fmt, bad)
    assert validate_options(onnx_fmt, {"min_agreement": 1}).min_agreement == 1.0
    assert OnnxOptions().min_agreement is None and OnnxOptions().max_drop_pp is None  # off by default


def _variant(name, precision, p50, agreement, details=None):
    v = Variant(name, "onnx", precision, Path(f"model.{name}.onnx"), "baseline", 1000, 2000)
    v.agreement, v.top5_overlap, v.size_mb = agreement, 1.0, 1.0
    v.latency = Latency(p50, "measured", p90=p50 * 1.1, runs=100)
    v.info = details or {}
    return v


def _report(rec, int8_ms=0.5):
    """An unlabelled run whose int8 variant carries fallback record ``rec`` and measured ``int8_ms`` (fp32: 1 ms)."""
    task = _task(_hard(), labelled=False)
    variants = [_variant("fp32", "fp32", 1.0, 1.0),
                _variant("int8", "int8", int8_ms, 0.99, {"quantization": {"config": "x", "fallback": rec}})]
    variants[1].speedup = round(1.0 / int8_ms, 3)
    return assemble_report("hard", {"source": "onnx"}, Recipe(name="r", accuracy_budget_pp=2.0),
                           load_device("desktop-cpu"), task, {"source": "onnx file"}, [], variants, [], None, 0)


def test_the_recommendation_is_never_an_int8_the_fallback_calls_slower_or_short(two_spots):
    _, _, slower = two_spots(0.99, _fake_pricer(1.0, 0.8, 0.15))
    # the final benchmark timed it faster than fp32 (noise): still fp32, and the note says why
    r = _report(slower, int8_ms=0.9)
    assert r["recommended"]["name"] == "fp32"
    assert any(n.startswith("Int8 fallback of int8") and "not faster than fp32" in n for n in r["notes"])
    _, _, fine = two_spots(0.99, _fake_pricer(1.0, 0.3, 0.15))
    assert _report(fine)["recommended"]["name"] == "int8"
    assert _report(fine, int8_ms=1.2)["recommended"]["name"] == "fp32"  # measured slower in the end: fp32 still


def test_report_lists_the_layers_kept_in_float_and_plots_the_steps_in_agreement(two_spots):
    _, _, rec = two_spots(0.99, _fake_pricer(1.0, 0.3, 0.15))
    r = _report(rec)
    md = to_markdown(r)
    section = md[md.index("## int8 fallback"):]
    assert "accuracy" not in section.lower()  # an unlabelled run: agreement only
    for st in rec["steps"][1:]:
        row = next(line for line in section.splitlines() if line.startswith(f"| {st['step']} |"))
        assert st["layers"][0]["node"] in row
        prev = rec["steps"][st["step"] - 1]
        assert f"{100 * (st['agreement'] - prev['agreement']):+.2f}" in row  # what the step bought ...
        assert f"{st['p50_ms'] - prev['p50_ms']:+.3f}" in row  # ... and what it cost
    (caption, plot), = fallback_plots(r)
    assert len(plot["points"]) == len(rec["steps"]) and plot["line"].count(",") == len(rec["steps"])
    assert "agreement" in plot["ylabel"] and "accuracy" not in caption
    html = to_html(r)
    assert html.count("<svg") == 2 and "<polyline" in html and ">budget</text>" in html


def test_a_bundle_for_another_device_keeps_the_layers_the_fallback_kept_in_float(tmp_path):
    """deploy re-quantizes a desktop run's int8 for rpi4 (S8S8) from fp32: the fallback's float layers stay float."""
    from edgekit.deployment.retarget import plan_requant, requantize

    export_onnx(_hard(), tmp_path / "model.fp32.onnx", (1, 3, 32, 32))
    kept = ["/4/Conv", "/2/Conv"]
    chosen = {"name": "int8", "format": "onnx", "precision": "int8", "path": "model.int8.onnx",
              "details": {"quantization": {"activation_type": "uint8", "weight_type": "int8", "per_channel": True,
                                           "config": "QDQ U8S8", "num_calib": 16, "nodes_to_exclude": kept}}}
    report = {"device": "desktop-cpu", "recipe_spec": {"variants": []},
              "task": {"name": "mnist", "input_shape": [1, 3, 32, 32], "num_classes": 10},
              "variants": [{"name": "fp32", "format": "onnx", "precision": "fp32", "path": "model.fp32.onnx"}, chosen]}
    dev = load_device("rpi4")
    plan = plan_requant(tmp_path, report, dev, chosen)
    assert plan.target.nodes_to_exclude == tuple(kept) and plan.target.activation_type == "int8"
    info, why = requantize(plan, tmp_path, tmp_path / "rpi4.int8.onnx", dev)
    assert _float_convs(tmp_path / "rpi4.int8.onnx") == set(kept)
    assert info["config"].endswith("+2 nodes fp32") and "+2 nodes fp32" in why


def test_fallback_runs_after_cle_and_bias_correction(tmp_path):
    """The fallback starts from whatever int8 the exporter made: CLE evens out the widened channel, so nothing goes
    back to float; bias correction does not, and the fallback re-quantizes with it on."""
    model = _hard()
    task = _task(model, labelled=False)
    (tmp_path / "cle").mkdir()
    ctx = _ctx(tmp_path / "cle", task, device="rpi4")
    out = export_variant(model, "int8", _options(min_agreement=0.97, equalize=True), ctx)
    rec = ctx.info["quantization"]["fallback"]
    assert rec["met_at_step"] == 0 and len(rec["steps"]) == 1 and not _float_convs(out)
    assert rec["outcome"].startswith("met without fallback")
    ctx = _ctx(tmp_path, task, device="rpi4")
    out = export_variant(model, "int8", _options(min_agreement=0.97, bias_correction=True), ctx)
    q = ctx.info["quantization"]
    assert q["fallback"]["met_at_step"] >= 1 and {"/2/Conv", "/4/Conv"} <= _float_convs(out)
    assert q["config"].endswith("+bias-correction +2 nodes fp32") and q["bias_correction"] is True


def test_fallback_under_adaround_searches_without_it_and_ships_with_it(tmp_path):
    """AdaRound costs minutes on a real model: ranking and steps re-quantize without it, the shipped step with it."""
    from edgekit.export.ptq import QUANT_SUFFIX

    model = _hard()
    task = _task(model, labelled=False)
    ctx = _ctx(tmp_path, task, device="rpi4")
    out = export_variant(model, "int8", _options(min_agreement=0.97, adaround=True), ctx)
    q = ctx.info["quantization"]
    assert q["fallback"]["met_at_step"] >= 1 and {"/2/Conv", "/4/Conv"} <= _float_convs(out)
    assert q["config"].endswith("+AdaRound +2 nodes fp32") and q["adaround"] is True
    cfg = OrtQuantConfig(**{k: q[k] for k in OrtQuantConfig.__dataclass_fields__ if k in q})
    x = task.arrays("calib", limit=N)[0]
    plain = quantize_onnx(tmp_path / "model.int8.fp32-src.onnx", tmp_path / "plain.onnx", x,
                          replace(cfg, adaround=False))

    def weights(path):
        return {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
                if i.name.endswith(QUANT_SUFFIX) and i.data_type == onnx.TensorProto.INT8}
    shipped, nearest = weights(out), weights(plain)
    assert shipped.keys() == nearest.keys() and any((shipped[k] != nearest[k]).any() for k in shipped)
