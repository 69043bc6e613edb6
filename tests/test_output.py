"""Output a person can read: plain progress lines in a log, per-batch training progress with images/s, results that
fit an 80-column terminal with every number whole, estimates labelled, and the small traps answered with a hint."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from edgekit import progress, zoo
from edgekit.cli import app, fit_table, show_benchmark, show_report
from edgekit.config import Recipe, load_device
from edgekit.data.tasks import Task
from edgekit.pipeline import Variant, assemble_report, default_out_dir
from edgekit.report import variant_rows
from edgekit.results import Latency
from edgekit.train import FitConfig, fit

runner = CliRunner()
TINY = dict(epochs=0.25, lr=1e-3)  # 15 steps of 64 images at 32 px


@pytest.fixture(autouse=True)
def _progress_off():
    yield
    progress.enable(False)


class _Tty(io.StringIO):
    def isatty(self):
        return True


# ----------------------------------------------------------------------------- progress


def test_progress_mode_follows_the_stream_and_the_environment(monkeypatch):
    monkeypatch.delenv("EDGEKIT_PROGRESS", raising=False)
    assert progress.enable_for(io.StringIO()) == progress.LINES  # a log or a pipe: plain lines
    assert progress.enable_for(_Tty()) == progress.BARS
    monkeypatch.setenv("EDGEKIT_PROGRESS", "off")
    assert progress.enable_for(_Tty()) == progress.OFF
    assert progress.clock(35) == "0:35" and progress.clock(3723) == "1:02:03"


def test_training_off_a_terminal_prints_periodic_plain_lines(small_task, monkeypatch, capsys):
    monkeypatch.setenv("EDGEKIT_PROGRESS_PERIOD", "0.2")
    monkeypatch.delenv("EDGEKIT_PROGRESS", raising=False)
    progress.enable_for(io.StringIO())
    torch.manual_seed(0)
    fit(zoo.create("shufflenetv2-x0.5", num_classes=10), small_task, FitConfig(**TINY), description="train tiny")
    lines = capsys.readouterr().err.splitlines()
    periodic = [ln for ln in lines if re.fullmatch(r"train tiny: \d+/15 batches, [\d,.]+ img/s, eta \d+:\d\d", ln)]
    assert periodic, lines  # e.g. "train tiny: 7/15 batches, 1,530 img/s, eta 0:01"
    assert re.fullmatch(r"train tiny: 15/15 batches, [\d,.]+ img/s, done in \d+:\d\d", lines[-1]), lines
    assert not any("\x1b" in ln for ln in lines)  # no terminal control codes in a log


def test_training_bar_advances_per_batch_with_images_per_second(small_task, monkeypatch):
    term = Console(file=_Tty(), force_terminal=True, width=160, record=True)
    monkeypatch.setattr(progress, "console", term)
    progress.enable(True)
    advances = []
    real = progress._Bars.advance
    monkeypatch.setattr(progress._Bars, "advance", lambda self, steps=1, amount=None: (
        advances.append((steps, amount)), real(self, steps, amount))[-1])
    fit(zoo.create("shufflenetv2-x0.5", num_classes=10), small_task, FitConfig(**TINY), description="train tiny")
    assert advances == [(1, 64)] * 15  # one step per batch, its images counted
    shown = term.export_text()
    assert "train tiny" in shown and "/15" in shown and "img/s" in shown


def test_a_command_leaves_progress_as_it_found_it():
    progress.enable(False)
    res = runner.invoke(app, ["devices", "check", "rpi4"])  # turns progress on, then refuses: rpi4 is not local
    assert res.exit_code == 2 and "not local" in res.output, res.output
    assert progress.mode() == progress.OFF


def test_a_short_step_off_a_terminal_stays_quiet(monkeypatch, capsys):
    monkeypatch.setenv("EDGEKIT_PROGRESS_PERIOD", "10")
    progress.enable(progress.LINES)
    assert list(progress.track(range(3), "evaluate")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- the results in a narrow terminal


def _variant(name, fmt, acc, p50, speedup, status="ok", error=None, estimated=False):
    v = Variant(name, fmt, name.split("-")[0], Path(f"model.{name}.{fmt}"), "baseline", 1_262_354, 11_837_000)
    v.accuracy, v.agreement, v.size_mb, v.speedup = acc, 0.9987, 4.8374, speedup
    v.status, v.error = status, error
    v.latency = Latency(p50, "estimated", "rpi4", threads=4, method="kernel-regression",
                        extra={"coefficients": {"status": "uncalibrated starting values"}}) if estimated else \
        Latency(p50, "measured", p90=p50 * 1.137, runs=100)
    return v


def _report(estimated=False):
    task = Task("mnist", 10, 3, 64, {"train": [], "calib": [], "eval": []})
    spec = zoo.get_spec("shufflenetv2")
    vs = [_variant("fp32", "onnx", 0.9634, 12.3456, 1.0, estimated=estimated),
          _variant("int8-per-channel", "onnx", 0.9621, 9.8765, 1.25, estimated=estimated),
          _variant("int8", "tflite", None, 10.5, None, status="failed", error="converter said: unsupported op",
                   estimated=estimated)]
    return assemble_report(spec.name, {"source": spec.source, "paper": spec.paper}, Recipe(name="int8"),
                           load_device("rpi4" if estimated else "desktop-cpu"), task,
                           {"source": "trained"}, [], vs, [], None, 0)


def _numbers(cells):
    return {tok for c in cells for tok in c.split() if re.search(r"\d", tok)}


@pytest.mark.parametrize("width", [80, 60])
def test_narrow_terminal_shows_every_number_of_the_report_whole(width):
    report = _report()
    con = Console(width=width, record=True, file=io.StringIO())
    show_report(report, con)
    text = con.export_text()
    assert "…" not in text
    for tok in _numbers(c for row in variant_rows(report) for c in row):
        assert tok in text, (tok, text)
    assert max(len(line) for line in text.splitlines()) <= width


def test_wide_terminal_keeps_the_table():
    con = Console(width=200, record=True, file=io.StringIO())
    show_report(_report(), con)
    text = con.export_text()
    assert "┃ variant" in text and "96.34%" in text and "99.87%" in text


def test_narrow_benchmark_table_keeps_every_number_whole_and_labels_estimates():
    from edgekit.pipeline.benchmark import benchmark_table

    rows = [_variant("fp32", "onnx", 0.9634, 12.3456, 1.0), _variant("int8", "onnx", 0.9621, 9.8765, 1.25),
            _variant("int8", "tflite", 0.9612, 10.5, 1.1758, estimated=True)]
    con = Console(width=80, record=True, file=io.StringIO())
    show_benchmark(rows, benchmark_table(rows, title="shufflenetv2 on desktop-cpu"), "desktop-cpu", con)
    text = con.export_text()
    assert "…" not in text and "estimated, uncalibrated coefficients" in " ".join(text.split())
    for tok in ("96.34", "96.21", "96.12", "99.87", "12.346", "9.877", "14.037", "1.25x", "1.18x", "4.84"):
        assert re.search(rf"(?<![\d.]){re.escape(tok)}(?![\d])", text), (tok, text)


def test_a_table_a_little_too_wide_wraps_its_words_and_stays_a_table():
    from edgekit.pipeline.benchmark import benchmark_table

    rows = [_variant("fp32", "onnx", 0.9634, 12.3456, 1.0), _variant("int8", "tflite", 0.9612, 10.5, 1.1758,
                                                                     estimated=True)]
    con = Console(width=105, record=True, file=io.StringIO())
    con.print(fit_table(benchmark_table(rows), con))
    text = con.export_text()
    assert "┃ format" in text and "…" not in text and max(len(line) for line in text.splitlines()) <= 105
    for tok in ("96.34", "96.12", "99.87", "12.346", "14.037", "10.500", "1.18x", "estimated"):
        assert tok in text, (tok, text)


def test_estimates_are_labelled_uncalibrated_in_the_terminal():
    con = Console(width=80, record=True, file=io.StringIO())
    show_report(_report(estimated=True), con)
    text = " ".join(con.export_text().split())
    assert "estimated, uncalibrated coefficients" in text and "(est.)" in text
    assert "96.34%" in text  # accuracy as a percentage


# ----------------------------------------------------------------------------- small traps


def _trap(*args):
    res = runner.invoke(app, [*map(str, args)])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    return " ".join(res.output.split())


def test_weights_imagenet_suggests_pretrained(tmp_path):
    for cmd in ("compress", "benchmark"):
        msg = _trap(cmd, "shufflenetv2", "--weights", "imagenet", "--out", tmp_path / "never")
        assert "Weights file not found: imagenet" in msg and "--weights pretrained" in msg
    assert not (tmp_path / "never").exists()


def test_data_file_says_it_must_be_a_folder(tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff")
    for cmd in ("compress", "benchmark"):
        msg = _trap(cmd, "shufflenetv2", "--data", photo)
        assert "must be a folder of class sub-folders" in msg and "photo.jpg" in msg
    assert "Data folder not found" in _trap("compress", "shufflenetv2", "--data", tmp_path / "nope")


@pytest.mark.parametrize("typed, suggested", [("raspberrypi", "rpi4, rpi5"), ("pi4", "rpi4"), ("raspberry-pi-5", "rpi5"),
                                              ("orin", "jetson-orin-nano")])
def test_unknown_device_suggests_by_alias(typed, suggested):
    msg = _trap("compress", "shufflenetv2", "--device", typed)
    assert f"Unknown device '{typed}'. Did you mean: {suggested}?" in msg
    with pytest.raises(Exception, match="Unknown device"):
        load_device(typed)  # suggested, never resolved silently


def test_default_out_folder_names_the_data_folder(tmp_path):
    assert default_out_dir("shufflenetv2-x1.0", "int8", "desktop-cpu") == Path("export/shufflenetv2-x1.0-int8")
    flowers = tmp_path / "my flowers"
    assert default_out_dir("shufflenetv2-x1.0", "int8", "rpi4", str(flowers) + "/") == \
        Path("export/shufflenetv2-x1.0-int8-rpi4-my-flowers")
    assert "aliases" not in load_device("rpi4").model_dump()  # report.json's device_profile is unchanged
