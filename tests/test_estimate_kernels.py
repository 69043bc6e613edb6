"""Kernel-level latency regression (edgekit.estimate.kernels): kernel detection, calibration, labelling, speed check."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit import zoo
from edgekit.config import load_device
from edgekit.errors import EdgekitError
from edgekit.export.onnx import export_onnx
from edgekit.estimate import estimate
from edgekit.estimate.check import reference_records, speed_ratios
from edgekit.estimate.host import cpu_name, quantize_for
from edgekit.estimate.kernels.calibrate import calibrate_kernels, cold_probe, cold_rate
from edgekit.estimate.kernels.detect import graph_kernels, middle_mean
from edgekit.estimate.kernels.features import (AGG_EDGES_US, FEATURES, KERNEL_CATEGORIES, Kernel, canonical,
                                               category_counts, cold_curve_rate, cold_mb, predictor_key)
from edgekit.estimate.kernels.fit import fit_overhead
from edgekit.estimate.kernels.model import KernelModel, fit_aggregate
from edgekit.estimate.synthetic import RandomNet
from edgekit.estimate.tables import kernel_table_for, load_table, save_table

pytestmark = pytest.mark.slow  # calibrates and times kernel models for minutes: outside the fast tier


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Three random networks, fp32 and int8, and a zoo model in both."""
    d = tmp_path_factory.mktemp("kern")
    dev = load_device("desktop-cpu")
    out = []
    for seed in (3, 4, 5):
        torch.manual_seed(seed)
        net = RandomNet(seed).eval()
        fp32 = export_onnx(net, d / f"n{seed}.fp32.onnx", net.input_shape)
        out.append((fp32, quantize_for(fp32, d / f"n{seed}.int8.onnx", net.input_shape, dev)))
    torch.manual_seed(0)
    model = zoo.create("mobilenetv2", num_classes=10).eval()
    fp32 = export_onnx(model, d / "mbv2.fp32.onnx", (1, 3, 64, 64))
    return out, (fp32, quantize_for(fp32, d / "mbv2.int8.onnx", (1, 3, 64, 64), dev)), model


def test_kernels_are_what_onnx_runtime_runs(nets):
    """fp32 convs run as ORT's NCHWc convs (the residual adds fused in), one reorder back to NCHW before the head;
    int8 convs as QLinearConv in NHWC between two transposes, whose MACs add up to the torch model's conv
    MACs (int8 convs are not padded to channel blocks)."""
    _, (fp32, int8), model = nets
    k32, p32 = graph_kernels(fp32, 1)
    k8, p8 = graph_kernels(int8, 1)
    assert (p32, p8) == ("fp32", "int8")
    ops32 = collections.Counter(k.op for k in k32)
    assert ops32["nchwc:Conv"] == 52 and ops32["nchwc:ReorderOutput"] == 1  # 52 Conv layers in MobileNetV2
    assert "Add" not in ops32
    ops8 = collections.Counter(k.op for k in k8)
    assert ops8["ms:QLinearAdd"] == 10 and ops8["Transpose"] == 2
    assert {k.key for k in k8 if k.op == "Transpose"} == {"Transpose.u8"}
    q = [k for k in k8 if k.op == "ms:QLinearConv"]
    assert len(q) == 52
    conv_macs = 0
    hooks = []

    def hook(m, i, o):
        nonlocal conv_macs
        conv_macs += o.numel() * m.weight[0].numel()

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert sum(k.desc["macs"] for k in q) == conv_macs
    assert {"ms:QLinearConv/dw", "ms:QLinearConv/pw", "ms:QLinearConv/dense/s2"} <= {k.key for k in q}
    assert len({len(k.features) for k in k32 + k8}) == 1
    assert all(np.isfinite(k.features).all() for k in k32 + k8)


def test_calibrate_fit_and_estimate(nets, tmp_path):
    """Time two random networks kernel by kernel, write the table, read it back, and estimate a third."""
    third = nets[0][2]
    table = calibrate_kernels(load_device("desktop-cpu"), 1, nets=2, out=tmp_path / "t.json.gz", runs=5,
                              progress=False)
    assert len(table["nets"]) == 4 and {r["precision"] for r in table["nets"]} == {"fp32", "int8"}
    assert all(r["kernels"] > 10 and r["wall_ms"] > 0 and r["sum_us"] > 0 for r in table["nets"])
    # the wall-clock label: the median of the pass after profiling and three round-robin passes
    assert all(len(r["wall_passes_ms"]) == 4 and r["wall_ms"] == pytest.approx(np.median(r["wall_passes_ms"]), rel=1e-3)
               for r in table["nets"])
    assert sum(r["samples"] for r in table["nets"]) == len(table["kernels"])
    assert table["aggregate"] is None  # 2 networks per precision: too few for the stacked fit, the plain one serves
    assert table["cold_us_per_mb"] >= 0 and len(table["cold_probe"]) >= 3  # weights past the cache, measured
    back = load_table(tmp_path / "t.json.gz")
    assert back["threads"] == 1 and len(back["kernels"]) == len(table["kernels"])
    assert back["kernels"][0]["desc"].keys() == set(FEATURES) and back["kernels"][0]["us"] >= 0
    km = KernelModel(back)
    kernels, _ = graph_kernels(third[1], 1)
    us = km.predict_us(kernels)
    assert us.shape == (len(kernels),) and (us > 0).all()
    assert km.total_ms(us) > 0
    assert back["seed0"] == 1000


def _power_law_table(n: int = 60) -> dict:
    """A pointwise-conv kernel type whose time is exactly 0.002 * MACs^0.9 µs, on MACs from 2^16 to 2^22."""
    rng = np.random.default_rng(0)
    kernels = []
    for _ in range(n):
        cin, cout, hw = (int(2 ** rng.uniform(3, 7)), int(2 ** rng.uniform(3, 7)), int(2 ** rng.uniform(4, 8)))
        desc = {"out": cout * hw, "in0": cin * hw, "weights": cin * cout, "macs": cin * cout * hw, "depth": cin,
                "cout": cout, "cin": cin, "spatial": hw, "stride": 1, "kernel": 1, "groups": 1, "rank": 4}
        kernels.append({"key": "nchwc:Conv/pw", "us": 0.002 * desc["macs"] ** 0.9, "desc": desc})
    nets = [{"name": f"net{i}.{p}", "precision": p, "kernels": 10 + (7 * i) % 13, "sum_us": 100.0 * (i + 1),
             "wall_ms": (20 + (3 if p == "int8" else 1) * (10 + (7 * i) % 13) + 100.0 * (i + 1)) / 1e3}
            for i in range(25) for p in ("fp32", "int8")]
    return {"version": 1, "threads": 1, "kernels": kernels, "nets": nets,
            "overhead": {"a_us": 0.0, "b_us": 0.0, "c": 1.0}}


def test_model_seed_is_the_forests_random_state():
    """``KernelModel(table, seed)``: one table and seed fit one model; another seed is another draw of the forests
    (``bench/latency_model.py --rescore --model-seeds`` scores each, to tell a draw from an improvement)."""
    rng = np.random.default_rng(5)
    table = _power_law_table()
    table["kernels"] = [{**k, "us": k["us"] * float(np.exp(rng.normal(0, 0.2)))} for k in table["kernels"]]
    ks = [Kernel("k", "nchwc:Conv", k["key"], k["desc"]) for k in _power_law_table(80)["kernels"][60:]]
    shipped, again, other = (KernelModel(table).predict_us(ks), KernelModel(table, seed=0).predict_us(ks),
                             KernelModel(table, seed=1).predict_us(ks))
    assert np.array_equal(shipped, again) and not np.allclose(shipped, other, rtol=1e-3)
    assert np.allclose(shipped, other, rtol=0.3)
    km = KernelModel(table, seed=1)
    assert km.estimate_ms(ks, "fp32") == km.total_ms(km.predict_us(ks), "fp32")


def test_kernel_predictions_scale_past_the_calibration_range():
    """The ridge line under each forest carries a power law past the largest calibrated kernel; a forest alone
    would predict at most the largest time it saw."""
    table = _power_law_table()
    km = KernelModel(table)
    biggest = max(k["desc"]["macs"] for k in table["kernels"])
    d = {"out": 256 * 1024, "in0": 256 * 1024, "weights": 256 * 256, "macs": 256 * 256 * 1024, "depth": 256,
         "cout": 256, "cin": 256, "spatial": 1024, "stride": 1, "kernel": 1, "groups": 1, "rank": 4}
    assert d["macs"] > 4 * biggest
    (pred,) = km.predict_us([Kernel("k", "nchwc:Conv", "nchwc:Conv/pw", d)])
    truth = 0.002 * d["macs"] ** 0.9
    assert abs(pred / truth - 1) < 0.25, (pred, truth)
    assert pred > 2 * max(k["us"] for k in table["kernels"])


def _group_table(rng, fused_every: int = 0) -> dict:
    """Grouped convs that cost 1.5 µs + 0.12 µs a group (one GEMM call each) + 1 µs per 40,000 MACs, 2-128
    groups, 5% noise; every ``fused_every``-th one is ORT's fused form of the same kernel."""
    kernels = []
    for i in range(240):
        g, cin_g, cout_g = int(2 ** rng.uniform(1, 7)), int(2 ** rng.uniform(0, 5)), int(2 ** rng.uniform(0, 5))
        hw = int(4 ** rng.integers(1, 5))
        desc = _group_desc(g, cin_g, cout_g, hw)
        us = (1.5 + 0.12 * g + desc["macs"] / 4e4) * float(rng.lognormal(0, 0.05))
        fused = fused_every and i % fused_every == 0
        kernels.append({"key": "ms:FusedConv/group" if fused else "Conv/group", "us": us,
                        "desc": {**desc, "activation": 1 if fused else 0}})
    nets = [{"name": f"net{i}.{p}", "precision": p, "kernels": 10, "sum_us": 100.0, "wall_ms": 0.12}
            for i in range(25) for p in ("fp32", "int8")]
    return {"version": 1, "threads": 1, "kernels": kernels, "nets": nets,
            "overhead": {"a_us": 0.0, "b_us": 0.0, "c": 1.0}}


def _group_desc(g: int, cin_g: int, cout_g: int, hw: int) -> dict:
    cin, cout = g * cin_g, g * cout_g
    return {"out": cout * hw, "in0": cin * hw, "weights": cout * cin_g, "macs": cout * cin_g * hw, "depth": cin_g,
            "cout": cout, "cin": cin, "spatial": hw, "stride": 1, "kernel": 1, "groups": g, "rank": 4}


def test_grouped_conv_cost_extrapolates_in_the_number_of_groups():
    """MicroNet's 1x1 convs in 384-576 groups of 2 channels at 2x2 cost a GEMM call per group; the calibration's
    grouped convs have at most 128 here. The additive cost prior under each conv predictor carries the per-group
    cost past them (the ridge line and forest alone come out 43-50% low here)."""
    km = KernelModel(_group_table(np.random.default_rng(3)))
    for g in (384, 576):
        (pred,) = km.predict_us([Kernel("k", "Conv", "Conv/group", _group_desc(g, 2, 1, 4))])
        truth = 1.5 + 0.12 * g + 2 * g * 4 / 4e4
        assert abs(pred / truth - 1) < 0.15, (g, pred, truth)


def test_fused_and_plain_convs_share_one_predictor():
    """ORT's ms:FusedConv is its Conv kernel with the activation applied in the same pass: one predictor, trained
    on both, so a fused shape is predicted from the plain samples too."""
    assert predictor_key("ms:FusedConv/group/s2") == "Conv/group/s2"
    assert predictor_key("nchwc:Conv/pw") == "nchwc:Conv/pw" and predictor_key("ms:QLinearConv/dw") == "ms:QLinearConv/dw"
    table = _group_table(np.random.default_rng(4), fused_every=8)
    km = KernelModel(table)
    assert km.trained_on("ms:FusedConv/group") == km.trained_on("Conv/group") == len(table["kernels"])
    d = _group_desc(32, 8, 8, 64)
    fused, plain = km.predict_us([Kernel("a", "ms:FusedConv", "ms:FusedConv/group", d),
                                  Kernel("b", "Conv", "Conv/group", d)])
    assert fused == plain


class _Gate(torch.nn.Module):
    def __init__(self, gate_first: bool):
        super().__init__()
        self.gate_first = gate_first
        self.conv = torch.nn.Conv2d(3, 32, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        g = torch.sigmoid(x.mean((2, 3), keepdim=True))
        return g * x if self.gate_first else x * g


def test_commutative_kernels_are_described_the_same_whatever_the_operand_order(tmp_path):
    """``gate * x`` and ``x * gate`` are one kernel to predict: the larger operand is in0 either way."""
    descs = []
    for first in (True, False):
        path = export_onnx(_Gate(first).eval(), tmp_path / f"gate{first}.onnx", (1, 3, 16, 16))
        kernels, _ = graph_kernels(path, 1)
        (mul,) = [k for k in kernels if k.op == "Mul"]
        descs.append(mul.desc)
    assert descs[0] == descs[1]
    assert descs[0]["in0"] == 32 * 16 * 16 and descs[0]["in_other"] == 32


def test_batchnorm_parameters_count_alike_whether_constant_or_dequantized():
    """A BatchNorm reads its four per-channel vectors whether they are initializers or DequantizeLinear outputs.
    The random networks' BatchNorms have initializers; CondenseNet int8's 37 have dequantized ones, and counted as
    other inputs (none of the 577 samples has them there) they were predicted 0.1 µs each, 12-15 µs measured."""
    dequantized = {"out": 2048, "in0": 2048, "in_other": 2048, "weights": 0, "spatial": 4, "rank": 4}
    assert canonical("BatchNormalization", dict(dequantized)) == {**dequantized, "in_other": 0, "weights": 2048}
    split = {"out": 2048, "in0": 2048, "in_other": 1024, "weights": 1024, "spatial": 4, "rank": 4}
    assert canonical("BatchNormalization", dict(split)) == {**split, "in_other": 0, "weights": 2048}
    assert canonical("Conv", dict(split)) == split


def test_kernel_times_resolve_below_the_profilers_whole_microseconds():
    """A kernel that takes 3 µs in 40% of its runs and 4 µs in 60% is timed about 3.7 µs (a median says 4), and
    a few stalled runs do not move it."""
    runs = [3] * 40 + [4] * 60
    assert 3.5 <= middle_mean(runs) <= 3.75 and np.median(runs) == 4
    assert middle_mean(runs + [400] * 5) < 3.8


def test_executor_overhead_is_fitted_per_precision():
    """fp32 and int8 networks get their own a + b * kernels + c * sum fit when each has enough networks."""
    km = KernelModel(_power_law_table())
    o32, o8 = km.overhead_for("fp32"), km.overhead_for("int8")
    assert o32["b_us"] == pytest.approx(1.0, abs=1e-6) and o8["b_us"] == pytest.approx(3.0, abs=1e-6)
    assert o32["a_us"] == pytest.approx(20.0, abs=1e-4) and o32["c"] == pytest.approx(1.0, abs=1e-6)
    us = np.full(10, 10.0)
    assert km.total_ms(us, "int8") - km.total_ms(us, "fp32") == pytest.approx(0.02, abs=1e-6)
    assert km.overhead_for(None) == km.table["overhead"]
    few = {**_power_law_table(), "nets": _power_law_table()["nets"][:10]}
    assert KernelModel(few).overhead_for("int8") == few["overhead"]


def _pw_sample(rng) -> dict:
    cin, cout, hw = (int(2 ** rng.uniform(2, 6)), int(2 ** rng.uniform(2, 6)), int(2 ** rng.uniform(2, 6)))
    desc = {"out": cout * hw, "in0": cin * hw, "weights": cin * cout, "macs": cin * cout * hw, "depth": cin,
            "cout": cout, "cin": cin, "spatial": hw, "stride": 1, "kernel": 1, "groups": 1, "rank": 4}
    return {"key": "nchwc:Conv/pw", "us": 0.002 * desc["macs"] ** 0.9, "desc": desc}


def _true_wall_us(kernels) -> float:
    """A network's wall-clock that is not linear in its profiled kernel times: a kernel under 5 µs costs a flat
    1 µs (the profiler's own cost is most of it), a longer one its time less 2 µs; 15 µs per run."""
    t = np.array([k["us"] for k in kernels])
    return 15.0 + float(np.where(t < 5, 1.0, t - 2.0).sum())


def test_executor_fit_is_stacked_and_binned_by_kernel_time():
    """The executor fit reads out-of-fold kernel predictions binned by time, so a wall-clock that costs small
    kernels differently from large ones is recovered; one a + b * kernels + c * sum line cannot."""
    rng = np.random.default_rng(1)
    kernels, nets = [], []
    for i in range(30):
        for p in ("fp32", "int8"):
            ks = [_pw_sample(rng) for _ in range(int(rng.integers(8, 30)))]
            kernels += ks
            nets.append({"name": f"net{i}.{p}", "precision": p, "kernels": len(ks), "samples": len(ks),
                         "sum_us": sum(k["us"] for k in ks), "wall_ms": _true_wall_us(ks) / 1e3})
    table = {"version": 1, "threads": 1, "kernels": kernels, "nets": nets, "overhead": fit_overhead(nets)}
    table["aggregate"] = fit_aggregate(table)
    assert set(table["aggregate"]) >= {"fp32", "int8", "edges_us"}
    stacked, plain = KernelModel(table), KernelModel({**table, "aggregate": None})
    err_stacked, err_plain = [], []
    for _ in range(20):
        ks = [_pw_sample(rng) for _ in range(int(rng.integers(8, 30)))]
        truth = _true_wall_us(ks) / 1e3
        kern = [Kernel("k", "nchwc:Conv", k["key"], k["desc"]) for k in ks]
        err_stacked.append(abs(stacked.estimate_ms(kern, "fp32") / truth - 1))
        err_plain.append(abs(plain.estimate_ms(kern, "fp32") / truth - 1))
    assert np.median(err_stacked) < 0.03 and np.median(err_plain) > 3 * np.median(err_stacked)
    # a table that cannot say which samples are whose network gets no stacked fit (and keeps the plain one)
    assert fit_aggregate({**table, "kernels": kernels[:-1]}) is None


def test_executor_fit_counts_kernels_by_category():
    """Two kernel types with the same profiled times, one of which costs the executor 4 µs more per kernel than its
    profiled time says (a data-movement kernel against a convolution): the bins cannot tell them apart, the
    category columns can, and a model whose fit has them refuses to total kernel times without their keys."""
    rng = np.random.default_rng(3)

    def net():
        ks = [_pw_sample(rng) for _ in range(int(rng.integers(8, 30)))]
        for k in ks[: int(rng.integers(0, len(ks)))]:
            k["key"] = "Transpose"
        wall = _true_wall_us(ks) + 4.0 * sum(k["key"] == "Transpose" for k in ks)
        return ks, wall

    kernels, nets = [], []
    for i in range(40):
        for p in ("fp32", "int8"):
            ks, wall = net()
            kernels += ks
            nets.append({"name": f"net{i}.{p}", "precision": p, "kernels": len(ks), "samples": len(ks),
                         "sum_us": sum(k["us"] for k in ks), "wall_ms": wall / 1e3})
    table = {"version": 1, "threads": 1, "kernels": kernels, "nets": nets, "overhead": fit_overhead(nets)}
    table["aggregate"] = fit_aggregate(table)
    assert table["aggregate"]["categories"] == list(KERNEL_CATEGORIES)
    coef = dict(zip(KERNEL_CATEGORIES, table["aggregate"]["fp32"][2 * len(AGG_EDGES_US) + 3:]))
    assert coef["movement"] - coef["conv"] == pytest.approx(4.0, abs=1.0)
    km = KernelModel(table)
    errs = []
    for _ in range(20):
        ks, wall = net()
        kern = [Kernel("k", k["key"], k["key"], k["desc"]) for k in ks]
        errs.append(abs(km.estimate_ms(kern, "fp32") / (wall / 1e3) - 1))
    assert np.median(errs) < 0.03
    assert list(category_counts(["nchwc:Conv/pw", "Transpose", "Transpose.u8", "ms:FusedConv/group", "Gemm"])) == \
        [2.0, 0.0, 0.0, 0.0, 0.0, 2.0]  # FusedConv is a Conv (``predictor_key``); Gemm is in no category
    with pytest.raises(ValueError, match="kernel_keys"):
        km.total_ms(km.predict_us(kern), "fp32")


def test_cold_mb_ramps_in_past_the_cache():
    assert [cold_mb(mb * 1e6, 8.0) for mb in (2, 8, 12, 16, 24, 40)] == [0.0, 0.0, 3.0, 8.0, 24.0, 40.0]


def test_weights_beyond_the_cache_are_a_cost_of_their_own():
    """Networks whose weights outgrow the cache run their kernels slower and pay a per-MB cost: the kernel
    models learn from the networks that fit (their predictions are the in-cache times) and the executor fit's
    cold-MB column carries the rest, for networks of any size."""
    rng = np.random.default_rng(2)

    def net(mb):
        ks = [_pw_sample(rng) for _ in range(int(rng.integers(8, 30)))]
        for k in ks:
            k["desc"]["model_weight_bytes"] = int(mb * 1e6)
        wall = _true_wall_us(ks) + 30.0 * mb * min(1.0, max(0.0, (mb - 8.0) / 16.0))  # 30 µs per MB read cold
        profiled = [{**k, "us": k["us"] * (1.6 if mb >= 8 else 1.0)} for k in ks]
        return ks, profiled, wall

    kernels, nets = [], []
    for i in range(60):
        for p in ("fp32", "int8"):
            _, ks, wall = net(float(2 ** rng.uniform(0, 5.3)))
            kernels += ks
            nets.append({"name": f"net{i}.{p}", "precision": p, "kernels": len(ks), "samples": len(ks),
                         "sum_us": sum(k["us"] for k in ks), "wall_ms": wall / 1e3})
    table = {"version": 1, "threads": 1, "kernels": kernels, "nets": nets, "overhead": fit_overhead(nets),
             "cold_mb": 8.0}
    table["aggregate"] = fit_aggregate(table)
    assert table["aggregate"]["cold_mb"] == 8.0
    probed = {**table, "cold_us_per_mb": 30.0}  # the rate a cold_probe() measured: used, not fitted
    probed["aggregate"] = fit_aggregate(probed)
    assert probed["aggregate"]["fp32"][-1] == probed["aggregate"]["int8"][-1] == 30.0
    for km in (KernelModel(table), KernelModel(probed)):
        for mb in (2.0, 30.0):
            errs, kern_errs = [], []
            for _ in range(15):
                warm, _, wall = net(mb)
                kern = [Kernel("k", "nchwc:Conv", k["key"], k["desc"]) for k in warm]
                us = km.predict_us(kern)
                kern_errs += list(us / np.array([k["us"] for k in warm]) - 1)
                errs.append(km.estimate_ms(kern, "fp32", us) / (wall / 1e3) - 1)
            assert np.median(np.abs(kern_errs)) < 0.05, mb  # in-cache kernel times, whatever the model's size
            assert np.median(np.abs(errs)) < 0.05, mb


def test_cold_rate_is_the_time_past_the_in_cache_rate_per_cold_mb():
    """A probe that reads weights at 24 µs per MB in cache and pays 15 µs more per cold MB past 8 MB."""
    mbs = (2.0, 4.0, 7.0, 16.0, 24.0, 33.0, 40.0)
    points = [(m, 24.0 * m + 15.0 * cold_mb(m * 1e6, 8.0)) for m in mbs]
    assert cold_rate(points, 8.0) == pytest.approx(15.0)
    assert cold_rate([(m, 24.0 * m) for m in mbs], 8.0) == pytest.approx(0.0, abs=1e-9)
    assert cold_rate([(m, 24.0 * m) for m in mbs], 64.0) == 0.0  # nothing past the threshold: no rate


def test_cold_probe_times_each_kernel_size_from_below_to_past_the_threshold():
    probe = cold_probe(1, threshold_mb=0.25, widths=(16, 32), rounds=1, runs=20)
    for c in (16, 32):
        mb = [m for m, _, w in probe["points"] if w == c]
        assert mb == sorted(mb) and mb[0] <= 0.25 < 4 * 0.25 <= mb[-1]
    assert all(us > 0 for _, us, _ in probe["points"])
    sizes = [k for k, _ in probe["cold_curve"]]
    assert sizes == sorted(sizes) and len(sizes) == 2 and all(r >= 0 for _, r in probe["cold_curve"])
    assert probe["cold_us_per_mb"] == probe["cold_curve"][-1][1]  # the largest kernels' rate is the reference


def _cold_model(curve=None) -> KernelModel:
    """A kernel model whose executor fit is only its cold column (20 µs per cold MB at the reference)."""
    table = {**_power_law_table(), "cold_mb": 8.0, "cold_us_per_mb": 20.0}
    table["aggregate"] = {"edges_us": list(AGG_EDGES_US), "folds": 4, "cold_mb": 8.0,
                          "fp32": [0.0] * (2 * len(AGG_EDGES_US) + 3) + [20.0]}
    if curve:
        table["cold_curve"] = curve
    return KernelModel(table)


def test_weights_in_small_kernels_cost_more_past_the_cache():
    """The same 24 MB past the cache cost more in many small 1x1 convs than in a few large ones, by the probe's curve
    (each kernel restarts the stream from memory); a table without a curve prices every MB alike."""
    curve = [[0.1, 60.0], [0.4, 30.0], [1.6, 20.0]]
    assert cold_curve_rate(curve, [0.05, 0.1, 0.2, 0.4, 1.6, 5.0]) == pytest.approx([60, 60, 45, 30, 20, 20])
    km, flat = _cold_model(curve), _cold_model()
    us = np.full(4, 10.0)
    small, large = [1.0] * 240, [1.0] * 15  # weight counts: 24 MB in 0.1 MB kernels, 24 MB in 1.6 MB kernels
    assert km.total_ms(us, "fp32", 24e6, small) == pytest.approx(24 * 60 / 1e3)
    assert km.total_ms(us, "fp32", 24e6, large) == pytest.approx(24 * 20 / 1e3)
    mixed = [1.0] * 8 + [8.0]  # half the weights in eight 1.5 MB kernels, half in one of 12 MB
    assert km.total_ms(us, "fp32", 24e6, mixed) == pytest.approx(24 * (0.5 * cold_curve_rate(curve, 1.5) + 0.5 * 20) / 1e3)
    assert flat.total_ms(us, "fp32", 24e6, small) == flat.total_ms(us, "fp32", 24e6, large) == pytest.approx(0.48)
    assert km.cold_column(6e6, small) == 0.0  # weights in cache: no cold cost whatever their kernels


def test_desktop_cpu_estimates_by_kernel_and_says_so(nets):
    """The shipped desktop-cpu profile has kernel tables; the estimate is labelled, with its method."""
    _, (fp32, int8), _ = nets
    dev = load_device("desktop-cpu")
    for threads in dev.latency_model.kernel_tables:
        assert kernel_table_for(dev.latency_model, threads) is not None
        for path in (fp32, int8):
            r = estimate(path, dev, threads=threads, per_op=True).to_json()
            assert r["source"] == "estimated" and r["method"].startswith("per-kernel regression")
            assert r["p50"] > 0 and r["calibration"]["kernel_samples"] > 1000
            assert all(row["source"] == "estimated" for row in r["by_category"].values())
            assert all(op["source"] == "estimated" and op["time_us"] > 0 for op in r["per_op"])
    # threads without a table: the roofline, still labelled
    r = estimate(fp32, dev, threads=7).to_json()
    assert r["source"] == "estimated" and r["method"].startswith("per-operator roofline")


def test_missing_or_corrupt_kernel_tables_are_clear_errors(nets, tmp_path):
    _, (fp32, _), _ = nets
    dev = load_device("desktop-cpu")
    lm = dev.latency_model.model_copy(update={"kernel_tables": {1: str(tmp_path / "none.json.gz")}})
    with pytest.raises(EdgekitError, match="not found"):
        estimate(fp32, dev, threads=1, lm=lm)
    bad = tmp_path / "bad.json.gz"
    bad.write_bytes(b"\x1f\x8bnot gzip")
    lm = lm.model_copy(update={"kernel_tables": {1: str(bad)}})
    with pytest.raises(EdgekitError, match="unreadable"):
        estimate(fp32, dev, threads=1, lm=lm)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"version": 0, "kernels": []}))
    with pytest.raises(EdgekitError, match="unreadable"):
        load_table(old)


def test_table_round_trip_keeps_every_sample(tmp_path):
    table = {"version": 1, "threads": 2, "nets": [], "overhead": {"a_us": 1.0, "b_us": 0.5, "c": 1.0},
             "kernels": [{"key": "nchwc:Conv/pw", "us": 3.5, "desc": {f: i for i, f in enumerate(FEATURES)}},
                         {"key": "Transpose.u8", "us": 1.0, "desc": {"out": 64, "in0": 64}}]}
    for name in ("t.json", "t.json.gz"):
        save_table(table, tmp_path / name)
        back = load_table(tmp_path / name)
        assert [k["key"] for k in back["kernels"]] == ["nchwc:Conv/pw", "Transpose.u8"]
        assert back["kernels"][0]["desc"] == {f: i for i, f in enumerate(FEATURES)}
        assert back["kernels"][1]["desc"]["out"] == 64 and back["kernels"][1]["desc"]["cout"] == 0


def test_random_networks_cover_the_blocks_of_the_zoo():
    """Across a few seeds the generator produces every block kind, and each network runs."""
    kinds = collections.Counter()
    for seed in range(12):
        net = RandomNet(seed).eval()
        kinds.update(type(m).__name__ for m in net.modules())
        with torch.no_grad():
            assert net(torch.zeros(net.input_shape)).shape == (1, 10)
    assert {"MB", "ShuffleV2", "ShuffleV1", "Fire", "Ghost", "SqNext", "DenseLayer", "GroupPair", "SE",
            "Micro", "ChannelConv"} <= set(kinds)


def test_long_random_networks_are_deeper_and_narrower():
    """A long network has 3-8 blocks a stage (the others 1-3) at half the width: many small convs."""
    convs = {False: 0, True: 0}
    for seed in range(4):
        short, long = RandomNet(seed).eval(), RandomNet(seed, long=True).eval()
        assert all(1 <= b <= 3 for b in short.blocks) and all(3 <= b <= 8 for b in long.blocks)
        assert long.width == short.width / 2
        for n in (short, long):
            convs[n.long] += sum(isinstance(m, torch.nn.Conv2d) for m in n.modules())
        with torch.no_grad():
            assert long(torch.zeros(long.input_shape)).shape == (1, 10)
    assert convs[True] > 2 * convs[False]


def test_an_estimate_from_a_table_timed_on_another_cpu_says_so(nets, tmp_path):
    _, (fp32, _), _ = nets
    dev = load_device("desktop-cpu")
    for host, warned in (("Some Other CPU @ 1.0GHz", True), (cpu_name(), False)):
        path = tmp_path / f"t{int(warned)}.json.gz"
        save_table({**_power_law_table(), "host": host, "date": "2026-01-01"}, path)
        r = estimate(fp32, dev, threads=1, lm=dev.latency_model.model_copy(update={"kernel_tables": {1: str(path)}})).to_json()
        assert r["source"] == "estimated" and r["p50"] > 0
        assert bool(r.get("warnings")) is warned
        if warned:
            assert "Some Other CPU" in r["warnings"][0] and cpu_name() in r["warnings"][0]
            assert "edgekit devices calibrate" in r["warnings"][0]


def test_speed_check_picks_networks_across_the_range_and_takes_median_ratios():
    """The reference networks span each group's wall times inside the quick range (ends included): fp32 and int8 with
    weights in cache, fp32 with weights past it. Speeds are medians of now / then per group."""
    walls = (0.1, 0.5, 1.0, 2.0, 2.5, 5.0)
    nets = [{"name": f"net{i}.{p}", "precision": p, "wall_ms": w, "kernels": 10, "samples": 1}
            for i, w in enumerate(walls) for p in ("fp32", "int8")]
    big = [{"name": f"net{10 + i}.fp32", "precision": "fp32", "wall_ms": w, "kernels": 10, "samples": 1}
           for i, w in enumerate(walls)]
    table = {"cold_mb": 8.0, "nets": nets + big,
             "kernels": [{"key": "Conv", "desc": {"model_weight_bytes": 1e6}} for _ in nets] +
                        [{"key": "Conv", "desc": {"model_weight_bytes": 9e6}} for _ in big]}
    picked = reference_records(table, count=4, past_cache=2)
    assert [(r["name"], r["past_cache"]) for r in picked] == [("net1.fp32", False), ("net4.fp32", False),
                                                               ("net1.int8", False), ("net4.int8", False),
                                                               ("net11.fp32", True), ("net14.fp32", True)]
    assert picked[-1]["weights_mb"] == 9.0 and "weights_mb" not in table["nets"][0]  # copies, not the table's
    assert len(reference_records(table, count=12, past_cache=0)) == 8  # no more than there are in range
    only_slow = {"nets": [n for n in nets if n["wall_ms"] > 3]}
    assert len(reference_records(only_slow, count=4, past_cache=0)) == 2  # none in range: the ones there are
    r = {n["name"]: n for n in reference_records(table, count=12, past_cache=4)}
    s = speed_ratios([(r["net1.fp32"], 1.5), (r["net2.fp32"], 3.0), (r["net3.fp32"], 3.0), (r["net1.int8"], 0.5),
                      (r["net11.fp32"], 0.5), (r["net13.fp32"], 2.5)])
    assert s == {"ratio": 2.25, "fp32": 3.0, "int8": 1.0, "past_cache": 1.125}


def test_cli_calibrate_writes_the_table_beside_a_user_profile(nets, tmp_path, monkeypatch):
    """`edgekit devices calibrate my.yaml` times random networks here and points the user's profile at the table."""
    import shutil

    from typer.testing import CliRunner

    from edgekit.cli import app
    from edgekit.config import _resolve
    from edgekit.estimate.kernels import calibrate

    # a small cache threshold keeps the calibration's cold probe to graphs of a few MB instead of 2-40 MB (30-50 s
    # here); the probe itself is test_cold_probe_times_each_kernel_size_from_below_to_past_the_threshold's
    monkeypatch.setattr(calibrate, "cache_threshold_mb", lambda: 0.25)
    _, (fp32, _), _ = nets
    prof = tmp_path / "my-pc.yaml"
    shutil.copy(_resolve("devices", "desktop-cpu"), prof)
    res = CliRunner().invoke(app, ["devices", "calibrate", str(prof), "--threads", "3", "--nets", "2"])
    assert res.exit_code == 0, res.output
    table = tmp_path / "my-pc.kernels-t3.json.gz"
    assert table.is_file() and "random networks" in res.output
    assert not list(tmp_path.glob(".tmp-*"))
    dev = load_device(str(prof))
    assert Path(dev.latency_model.kernel_tables[3]) == table.resolve()
    assert dev.latency_model.kernel_tables[1] == load_device("desktop-cpu").latency_model.kernel_tables[1]
    r = estimate(fp32, dev, threads=3).to_json()
    assert r["method"].startswith("per-kernel regression") and r["calibration"]["table"] == table.name
    assert "warnings" not in r
    # --cold-only re-measures the cold curve of that table and keeps its samples (a small cache threshold: quick)
    t = load_table(table)
    save_table({**t, "cold_mb": 0.25, "cold_curve": [[1.0, -1.0]]}, table)
    res = CliRunner().invoke(app, ["devices", "calibrate", str(prof), "--threads", "3", "--cold-only"])
    assert res.exit_code == 0, res.output
    back = load_table(table)
    assert "cold curve" in res.output and len(back["kernels"]) == len(t["kernels"]) and back["nets"] == t["nets"]
    assert len(back["cold_curve"]) == 3 and all(r >= 0 for _, r in back["cold_curve"])
    assert back["cold_us_per_mb"] == back["cold_curve"][-1][1] and back["cold_probe_date"]
    assert not list(tmp_path.glob(".tmp-*"))
    # `devices check` rebuilds the table's own networks from their seeds and re-times them: a table timed minutes ago
    # runs at about its times; networks that no longer rebuild into the graphs timed are refused, not compared
    res = CliRunner().invoke(app, ["devices", "check", str(prof), "--threads", "3", "--nets", "2"])
    assert res.exit_code == 0, res.output
    ratio = float(re.search(r"runs at ([0-9.]+)x the table's times", res.output).group(1))
    assert 1 / 3 < ratio < 3, res.output  # 3 threads on this 2-core machine: timings swing, not by 3x
    assert len(re.findall(r"net[01]\.(?:fp32|int8)", res.output)) >= 2, res.output
    save_table({**load_table(table), "seed0": 7}, table)
    res = CliRunner().invoke(app, ["devices", "check", str(prof), "--threads", "3", "--nets", "2"])
    assert res.exit_code == 2 and "rebuilds into the graph" in res.output
    # a profile that is not this machine cannot be calibrated or checked here: one clear message, exit 2
    res = CliRunner().invoke(app, ["devices", "check", "rpi4"])
    assert res.exit_code == 2 and "not local" in res.output
    for extra in ([], ["--cold-only"]):
        res = CliRunner().invoke(app, ["devices", "calibrate", "rpi4", "--nets", "2", *extra])
        assert res.exit_code == 2 and "not local" in res.output
