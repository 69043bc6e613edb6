"""Issue 28: a run on unlabelled images is judged against fp32 (top-1 agreement, top-5 overlap, logits SQNR) and its
report never speaks of accuracy: report.md, report.html and the terminal say "agreement with fp32 on N unlabelled
images"; the recommendation keeps the budget on agreement.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch.utils.data import TensorDataset

from edgekit.config import Recipe, load_device
from edgekit.data.tasks import Task
from edgekit.evaluate import topk_overlap
from edgekit.pipeline import Variant, assemble_report, evaluate
from edgekit.results import Latency

PHRASE = "agreement with fp32 on {n} unlabelled images"


def _task(n=40, labelled=False):
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    y = torch.full((n,), -1, dtype=torch.int64) if not labelled else torch.arange(n) % 7
    ds = TensorDataset(x, y)
    return Task("unlabelled-test", None if not labelled else 7, 3, 4, {"train": ds, "calib": ds, "eval": ds},
                labelled=labelled)


class _Runner:
    """A runtime stand-in: fixed logits per input (indexed by the input's value), with noise of its own."""

    runtime, version, threads, input_shape = "fake", "0", 1, (1, 3, 4, 4)

    def __init__(self, logits):
        self.logits = logits

    def run(self, x):
        return self.logits[x[:, 0, 0, 0].astype(int)]


def _expected(ref, test):
    """The three figures, written out independently of edgekit.evaluate."""
    agree = np.mean(ref.argmax(1) == test.argmax(1))
    top5 = np.mean([len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) / 5 for a, b in zip(ref, test)])
    sqnr = 10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - test).astype(np.float64) ** 2).sum())
    return agree, top5, sqnr


def test_topk_overlap_counts_shared_classes_whatever_their_order():
    a = np.array([[9, 8, 7, 6, 5, 0, 0, 0], [0, 0, 0, 5, 6, 7, 8, 9]], dtype=np.float32)
    b = np.array([[5, 6, 7, 8, 9, 0, 0, 0], [9, 8, 7, 0, 0, 0, 6, 5]], dtype=np.float32)
    assert topk_overlap(a, b) == pytest.approx((5 / 5 + 2 / 5) / 2)
    assert topk_overlap(a[:, :5], b[:, :5]) is None  # five classes: every top 5 is all of them


def test_unlabelled_evaluation_has_no_accuracy_and_three_fidelity_figures(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, 20)).astype(np.float32)
    noisy = ref + 0.6 * rng.standard_normal(ref.shape).astype(np.float32)
    variants = [Variant(n, "onnx", n, tmp_path / f"{n}.onnx", "baseline", 0, 0) for n in ("fp32", "int8")]
    runners = {variants[0].key: _Runner(ref), variants[1].key: _Runner(noisy)}
    evaluate(variants, runners, _task())
    fp32, int8 = variants
    assert fp32.accuracy is None and int8.accuracy is None
    assert (fp32.agreement, fp32.top5_overlap, fp32.sqnr_db) == (1.0, 1.0, None)  # the reference itself
    agree, top5, sqnr = _expected(ref, noisy)
    assert 0 < agree < 1 and 0 < top5 < 1  # the noise moves some classes: the figures can tell
    assert (int8.agreement, int8.top5_overlap, int8.sqnr_db) == (round(agree, 4), round(top5, 4), round(sqnr, 2))
    assert json.loads(json.dumps(int8.to_json()))["top5_overlap"] == round(top5, 4)
    # with labels, accuracy is back
    labelled = [Variant("fp32", "onnx", "fp32", tmp_path / "a.onnx")]
    evaluate(labelled, {labelled[0].key: _Runner(ref)}, _task(labelled=True))
    assert labelled[0].accuracy == round(float(np.mean(ref.argmax(1) == np.arange(40) % 7)), 4)


def _variant(name, agreement, p50, top5=None, sqnr=None, source="measured"):
    v = Variant(name, "onnx", name, Path(f"model.{name}.onnx"), "baseline", 1000, 2000)
    v.agreement, v.top5_overlap, v.sqnr_db, v.size_mb, v.speedup = agreement, top5, sqnr, 1.0, 1.0 / p50
    v.latency = Latency(p50, source, "rpi4" if source == "estimated" else None, p90=p50 * 1.1, runs=100, threads=4)
    return v


def _unlabelled_report(budget=0.5, source="measured"):
    from edgekit.data import load_task

    task = load_task("photos", input_size=32)
    variants = [_variant("fp32", 1.0, 1.0, 1.0, None, source), _variant("int8", 0.9875, 0.5, 0.9575, 23.4, source),
                _variant("fp16", 0.9975, 0.8, 0.995, 51.2, source)]
    rec = Recipe(name="int8", accuracy_budget_pp=budget)
    return task, assemble_report("shufflenetv2", {"source": "x", "paper": "y"}, rec, load_device("desktop-cpu"),
                                 task, {"source": "pretrained"}, [], variants, [], 2.0, 0)


def _terminal(report, width):
    from edgekit.cli import show_report

    buf = io.StringIO()
    show_report(report, Console(file=buf, width=width, force_terminal=False, color_system=None))
    return buf.getvalue()


@pytest.mark.parametrize("source", ["measured", "estimated"])
def test_unlabelled_report_says_agreement_never_accuracy(source):
    from edgekit.report import to_html, to_markdown

    task, r = _unlabelled_report(source=source)
    n = task.size("eval")
    assert r["task"]["labelled"] is False and r["task"]["num_eval"] == n
    # agreement stands in for accuracy: int8 disagrees on 1.25% (> 0.5 points), fp16 on 0.25%: fp16 is chosen
    assert r["recommended"]["name"] == "fp16"
    assert any("int8 (onnx) disagrees with fp32 on 1.25% of the" in line for line in r["notes"])
    md, page = to_markdown(r), to_html(r)
    outputs = {"md": md, "html": page, "terminal": _terminal(r, 200), "narrow terminal": _terminal(r, 70)}
    for where, text in outputs.items():
        flat = " ".join(text.split())
        assert "accuracy" not in flat.lower(), (where, text)
        assert PHRASE.format(n=n) in flat, (where, text)
    assert "| agreement | top-5 overlap | SQNR dB |" in md
    assert "| int8 | onnx | int8 | 1.00 | 0.00M | 0.0 | 98.75% | 95.75% | 23.4 |" in md
    assert "<svg" in page and "top-1 agreement with fp32" in page  # the plot shows agreement instead


def test_a_labelled_report_still_says_accuracy_and_its_split_sizes():
    """The control: the same rendering with labels speaks of accuracy, as before."""
    from edgekit.report import to_markdown

    task = Task("mnist", 10, 3, 64, {"train": list(range(30)), "calib": list(range(5)), "eval": list(range(8))})
    v = _variant("fp32", 1.0, 1.0)
    v.accuracy = 0.9
    r = assemble_report("shufflenetv2", {"source": "x", "paper": "y"}, Recipe(name="int8"),
                        load_device("desktop-cpu"), task, {"source": "trained"}, [], [v], [], None, 0)
    md = to_markdown(r)
    assert "| accuracy | agreement |" in md and "unlabelled" not in md and r["recommended"]["name"] == "fp32"
    assert "8 eval images; 5 calibration and 30 training images, none of them evaluated" in md


def test_unlabelled_benchmark_table_says_agreement(tmp_path):
    from edgekit.pipeline.benchmark import BenchmarkResult, benchmark_table

    rows = [_variant("fp32", 0.999, 1.0, 0.998, 61.0), _variant("int8", 0.97, 0.5, 0.95, 24.0)]
    result = BenchmarkResult("m", "desktop-cpu", rows, labelled=False, num_eval=80)
    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None).print(benchmark_table(result, title="m on desktop-cpu"))
    text = " ".join(buf.getvalue().split())
    assert "accuracy" not in text.lower() and "agreement with fp32 (the torch model) on 80 unlabelled images" in text
    assert "top-5 overlap %" in text and "SQNR dB" in text and "24.0" in text
    assert result.to_json()["labelled"] is False


def test_benchmark_on_the_photos_judges_every_row_against_the_torch_model():
    """End to end on real photos: ONNX fp32 and int8 of a 1000-class network keep its head, get no accuracy, and
    are compared with the torch model (fp32 ONNX far closer to it than int8)."""
    from edgekit import zoo
    from edgekit.data import load_task
    from edgekit.pipeline.benchmark import benchmark

    torch.manual_seed(0)
    model = zoo.create("shufflenetv2-x0.5", num_classes=1000).eval()
    task = load_task("photos", input_size=32)
    result = benchmark(model, task=task, formats=["onnx"], runs=5, warmup=1,
                       options={"onnx:int8": {"num_calib": 16, "calibration": "minmax", "search": "none"}})
    fp32, int8 = result.row("onnx", "fp32"), result.row("onnx", "int8")
    assert result.labelled is False and result.num_eval == task.size("eval")
    for v in (fp32, int8):
        assert v.status == "ok" and v.accuracy is None
        assert 0 <= v.agreement <= 1 and 0 <= v.top5_overlap <= 1 and v.sqnr_db is not None
    assert fp32.sqnr_db > int8.sqnr_db + 20


def test_deploy_keeps_the_budget_on_agreement_for_an_unlabelled_run(tmp_path):
    """For another device, deploy picks the lowest precision within the budget: on agreement when there are no
    labels (before, a missing accuracy let every variant through)."""
    from edgekit.deployment.select import select_variants

    for name in ("model.fp32.onnx", "model.int8.onnx"):
        (tmp_path / name).write_bytes(b"onnx")
    variants = [{"name": "fp32", "format": "onnx", "precision": "fp32", "path": "model.fp32.onnx", "accuracy": None,
                 "agreement": 1.0},
                {"name": "int8", "format": "onnx", "precision": "int8", "path": "model.int8.onnx", "accuracy": None,
                 "agreement": 0.97}]
    report = {"device": "desktop-cpu", "variants": variants, "recipe_spec": {"accuracy_budget_pp": 0.5},
              "task": {"labelled": False}}
    chosen, _, why = select_variants(tmp_path, report, load_device("rpi4"))
    assert chosen["name"] == "fp32" and "agreement budget" in why
    variants[1]["agreement"] = 0.998
    assert select_variants(tmp_path, report, load_device("rpi4"))[0]["name"] == "int8"
