"""Verdicts (slower int8 called out, accuracy budget kept) and what report.md and report.html say and escape."""

from __future__ import annotations

import html.parser
from pathlib import Path

import pytest

from edgekit.config import Recipe, load_device
from edgekit.data.tasks import Task
from edgekit.pipeline import Variant, assemble_report
from edgekit.results import Latency
import edgekit.report as report_mod
from edgekit.report import svg_plot, to_html, to_markdown
from edgekit import zoo


def _variant(name, acc, p50, speedup):
    v = Variant(name, "onnx", name, Path(f"model.{name}.onnx"), "baseline", 1000, 2000)
    v.accuracy, v.agreement, v.size_mb, v.speedup = acc, 1.0, 1.0, speedup
    v.latency = Latency(p50, "measured", p90=p50 * 1.1, runs=100)
    return v


def _report(variants, budget=0.5, target=None):
    task = Task("mnist", 10, 3, 64, {"train": [], "calib": [], "eval": []})
    spec = zoo.get_spec("shufflenetv2")
    return assemble_report(spec.name, {"source": spec.source, "paper": spec.paper},
                           Recipe(name="int8", accuracy_budget_pp=budget), load_device("desktop-cpu"), task,
                           {"source": "trained"}, [], variants, [], target, 0)


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
    v.info["quantization"]["search_decision"] = "tie within noise: ratio 1.01 [0.93, 1.35]; kept the most accurate"
    r = _report([_variant("fp32", 0.97, 1.0, 1.0), v])
    assert "layout: tie within noise: ratio 1.01 [0.93, 1.35]" in to_markdown(r)
    assert "tie within noise: ratio 1.01 [0.93, 1.35]" in to_html(r)


# ----------------------------------------------------------------------------- report.html escaping and wording

EVIL_DEVICE = "<img src=x onerror=alert(1)>"
EVIL_MODEL = "<script>alert('model')</script>"
EVIL_NOTE = 'note "quoted" \'single\' <script>alert(1)</script> & <b onmouseover="x()">'
EVIL_ERROR = "<img src=y onerror=\"alert('err')\"> failed"
# every tag the template itself writes; anything else in the page came from data
TEMPLATE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "table", "tr", "th", "td", "ul",
                 "li", "strong", "code", "figure", "figcaption", "svg", "rect", "line", "text", "circle"}


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [name for name, _ in attrs]


def _estimated(name, acc, p50, coefficients=None):
    v = _variant(name, acc, p50, 1.0)
    v.latency = Latency(p50, "estimated", "rpi4", threads=4,
                        method="per-operator roofline: overhead + max(work / (peak x efficiency), bytes / bandwidth)",
                        extra={"coefficients": coefficients})
    return v


def _hostile_report():
    """A report whose device, model, a note, a variant name and an error all carry markup and quotes."""
    fp32, int8 = _variant("fp32", 0.97, 1.0, 1.0), _variant("int8", 0.968, 0.8, 1.25)
    int8.status, int8.error = "failed", EVIL_ERROR
    evil = _variant("a\"b'<i>", 0.969, 0.9, 1.1)
    r = _report([fp32, int8, evil], target=0.95)
    r["device"], r["model"] = EVIL_DEVICE, EVIL_MODEL
    r["notes"].append(EVIL_NOTE)
    return r


def test_html_escapes_user_strings_and_keeps_plot_and_machine_line():
    page = to_html(_hostile_report())
    tags = _Tags()
    tags.feed(page)
    assert set(tags.tags) <= TEMPLATE_TAGS, set(tags.tags) - TEMPLATE_TAGS
    assert not [a for a in tags.attrs if a.startswith("on")]
    for raw in (EVIL_DEVICE, EVIL_MODEL, EVIL_NOTE, EVIL_ERROR, "<script", "<img", "<i>"):
        assert raw not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;script&gt;alert(&#39;model&#39;)&lt;/script&gt;" in page
    assert "note &#34;quoted&#34; &#39;single&#39; &lt;script&gt;alert(1)&lt;/script&gt; &amp; " in page
    assert "&lt;img src=y onerror=&#34;alert(&#39;err&#39;)&#34;&gt; failed" in page
    # the plot: one point per variant with accuracy and latency (the failed one has both here), labels escaped
    assert page.count("<svg") == 1 and page.count("<circle") == 3
    assert "a&#34;b&#39;&lt;i&gt; onnx" in page
    assert "Machine: " in page and "Latency threads: " in page
    assert "✅ ok" in page and "❌ failed" in page and "97.00%" in page
    # the summary's Markdown bold becomes a tag the template writes, around the escaped name
    assert "<strong>a&#34;b&#39;&lt;i&gt;</strong>" in page


def test_standalone_svg_plot_is_escaped():
    r = _hostile_report()
    svg = svg_plot(r)
    assert svg.startswith("<svg") and "<img" not in svg and "&lt;img src=x onerror=alert(1)&gt;" in svg
    r["variants"] = [dict(v, accuracy=None) for v in r["variants"]]
    assert svg_plot(r) == "" and "<svg" not in to_html(r)


@pytest.mark.parametrize("coefficients", [None, {}, {"status": "uncalibrated starting values"}])
def test_uncalibrated_estimates_are_labelled_and_not_called_timed(coefficients):
    """None: a profile without calibration; the status dict: what the shipped rpi4/jetson profiles hold."""
    r = _report([_estimated("fp32", 0.97, 1.0, coefficients), _estimated("int8", 0.968, 0.6, coefficients)])
    md, page = to_markdown(r), to_html(r)
    for text in (md, page):
        assert "estimated, uncalibrated coefficients" in text
        assert "timed runs" not in text
        assert "Latency threads: 4" in text
    assert "0.600 (est.)" in md and "| ✅ ok |" in md
    cal = _report([_estimated("fp32", 0.97, 1.0, {"host": "Cortex-A72", "date": "2026-01-02", "threads": 4})])
    assert "estimated, coefficients calibrated on Cortex-A72 (2026-01-02)" in to_markdown(cal)
    assert "uncalibrated" not in to_markdown(cal)


def test_measured_latency_says_timed_runs_and_threads():
    fp32, int8 = _variant("fp32", 0.97, 1.0, 1.0), _variant("int8", 0.968, 0.6, 1.6)
    for v in (fp32, int8):
        v.latency.threads = 2
    r = _report([fp32, int8])
    md, page = to_markdown(r), to_html(r)
    assert "p50/p90 over 100 timed runs after warm-up" in md and "estimated" not in md.lower()
    assert "Latency threads: 2 (measured on desktop-cpu)" in page
    assert "Machine: " in md and "| ✅ ok |" in md


def test_template_is_a_packaged_file():
    root = Path(report_mod.__file__).parent
    assert (root / "templates" / "report.html.j2").is_file() and (root / "templates" / "plot.svg.j2").is_file()
    pyproject = (root.parent / "pyproject.toml").read_text()
    assert '"templates/*.j2"' in pyproject and '"jinja2>=3.1"' in pyproject
