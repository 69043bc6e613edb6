"""The pipeline's commands: compress, benchmark, compare, profile."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .. import progress
from .base import app, check_inputs, check_names, handle_errors, out
from .tables import fit_table, show_benchmark, show_report

DEVICE_TRAIN_HELP = "Where training runs: auto (a CUDA GPU when torch sees one, else the CPU), cpu, or cuda."


@app.command()
@handle_errors
def compress(
    model: str = typer.Argument(..., help="Zoo name (`edgekit zoo list`), timm:<name>, torchvision:<name>, "
                               "path/to/file.py:Factory, package.module:Factory, or model.onnx."),
    recipe: str = typer.Option("int8", "--recipe", "-r", help="Built-in recipe name or path to a recipe YAML."),
    device: str = typer.Option("desktop-cpu", "--device", "-d", help="Device profile name or YAML path."),
    data: Optional[Path] = typer.Option(None, "--data", help="ImageFolder tree, or a folder of images without "
                                        "classes (judged by agreement with fp32; default: embedded MNIST task)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="'pretrained' or a state-dict .pth file."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default export/<model>-<recipe>"
                                         "[-<device>][-<data folder>])."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    target_ms: Optional[float] = typer.Option(None, "--target-ms", help="Latency target (default: the device's)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Square input size (default: the task's)."),
    seed: int = typer.Option(0, "--seed"),
    runs: int = typer.Option(100, "--runs", min=10, help="Timed runs per variant."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Leave unreadable images of --data out "
                                         "(counted in report.json) instead of stopping."),
    device_train: str = typer.Option("auto", "--device-train", help=DEVICE_TRAIN_HELP),
):
    """Compress MODEL with a recipe, export, evaluate and measure every variant (under torchrun: every process
    trains, rank 0 alone exports, measures and writes)."""
    check_names(model, recipe, device)  # a typo is answered before torch is imported
    check_inputs(data, weights)
    from ..distributed import is_main_process
    from ..pipeline import run

    if is_main_process():  # under torchrun only rank 0 speaks
        progress.enable_for(sys.stderr)
    report = run(model, recipe, device, data=str(data) if data else None, weights=weights, out=out_dir,
                 force=force, seed=seed, target_ms=target_ms, input_size=input_size, runs=runs,
                 skip_bad_images=skip_bad_images, train_device=device_train)
    if not is_main_process():
        return
    show_report(report)
    if report["task"].get("skipped_images"):
        out.print(f"[bold yellow]! [/]skipped {report['task']['skipped_images']} unreadable image(s) of --data "
                  "(listed in report.json under task.skipped)", highlight=False)
    out.print(f"Wrote {report['out_dir']}/ (report.md, report.html, report.json) in {report['seconds']} s")


@app.command()
@handle_errors
def benchmark(
    model: str = typer.Argument(..., help="Zoo name (`edgekit zoo list`), timm:<name>, torchvision:<name>, "
                               "path/to/file.py:Factory, package.module:Factory, or model.onnx."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe whose steps compress the model first."),
    device: str = typer.Option("desktop-cpu", "--device", "-d", help="Device profile name or YAML path."),
    data: Optional[Path] = typer.Option(None, "--data", help="ImageFolder tree, or a folder of images without "
                                        "classes (judged by agreement with fp32; default: embedded MNIST task)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="'pretrained' or a state-dict .pth file."),
    formats: Optional[List[str]] = typer.Option(None, "--format", "-f", help="Only these formats (repeatable)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Keep the artifacts in this folder."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Runtime threads (default: the device's)."),
    runs: int = typer.Option(50, "--runs", min=5, help="Timed rounds (all formats interleaved)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Square input size (default: the task's)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the rows as JSON."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Leave unreadable images of --data out "
                                         "instead of stopping."),
    device_train: str = typer.Option("auto", "--device-train", help=DEVICE_TRAIN_HELP),
):
    """Export MODEL to every format x precision, evaluate and time them side by side (ok / unavailable / failed)."""
    check_names(model, recipe, device)
    from ..distributed import is_main_process
    from ..pipeline.benchmark import benchmark as run_benchmark, benchmark_table

    check_inputs(data, weights)
    if is_main_process():  # under torchrun only rank 0 speaks
        progress.enable_for(sys.stderr)
    result = run_benchmark(model, recipe=recipe, device=device, data=str(data) if data else None, weights=weights,
                           formats=formats or None, out_dir=out_dir, threads=threads, runs=runs,
                           input_size=input_size, skip_bad_images=skip_bad_images, train_device=device_train)
    if not is_main_process():
        return
    show_benchmark(result, benchmark_table(result, title=f"{model} on {device}"), device)
    if result.skipped_images:
        out.print(f"[bold yellow]! [/]skipped {result.skipped_images} unreadable image(s) of --data", highlight=False)
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_json(), indent=2, default=str))


@app.command()
@handle_errors
def compare(
    a: Path = typer.Argument(..., help="First artifact: .pt/.pth (with --model), .onnx or .tflite."),
    b: Path = typer.Argument(..., help="Second artifact."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Architecture of a .pt/.pth checkpoint: zoo "
                                        "name, timm:<name>, file.py:Factory."),
    data: Optional[Path] = typer.Option(None, "--data", help="ImageFolder tree, or a folder of images without "
                                        "classes (judged by agreement with fp32; default: embedded MNIST task)."),
    limit: int = typer.Option(500, "--limit", min=1, help="Inputs to compare on."),
    per_layer: bool = typer.Option(True, "--per-layer/--no-per-layer", help="Per-layer table (two ONNX models)."),
    threshold_db: float = typer.Option(20.0, "--threshold-db", help="SQNR below which a layer has diverged."),
    max_layers: int = typer.Option(40, "--max-layers", min=1, help="Layer rows to show around the divergence."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the full result as JSON."),
):
    """Run two artifacts of one model on the same inputs; name the first layer where they diverge."""
    from ..comparison import compare_artifacts, render_comparison

    check_inputs(data)
    result = compare_artifacts(a, b, data=str(data) if data else None, per_layer=per_layer, model=model,
                               limit=limit, threshold_db=threshold_db)
    for table in render_comparison(result, max_layers=max_layers):
        out.print(table if isinstance(table, str) else fit_table(table), highlight=False)
    first = result.get("first_divergence")
    if result.get("layers") is not None:
        out.print(f"first layer below {threshold_db} dB: " + (f"{first['node']} ({first['op']}, "
                  f"{first['sqnr_db']:.1f} dB)" if first else "none"))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2, default=str))


@app.command()
@handle_errors
def profile(
    artifact: str = typer.Argument(..., help="Exported model (.onnx, .tflite, .engine), or any model source "
                                   "(zoo name, timm:<name>, file.py:Factory), exported to fp32 ONNX first."),
    device: str = typer.Option("desktop-cpu", "--device", "-d", help="Device profile name or YAML path."),
    host: Optional[str] = typer.Option(None, "--host", help="Measure on user@address[:port] over SSH "
                                                            "(system OpenSSH, host keys checked)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Default: the profile's threads."),
    runs: int = typer.Option(100, "--runs", min=1, help="Timed runs after warm-up."),
    warmup: int = typer.Option(10, "--warmup", min=0),
    as_json: bool = typer.Option(False, "--json", help="Print the whole result as JSON."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Input size of a model source "
                                             "(default: the model's own)."),
):
    """Latency of ARTIFACT on a device: measured here (local profiles), over SSH (--host or the profile's
    ssh: block), or estimated from the ONNX graph (every other profile)."""
    from ..results import ESTIMATED, MEASURED, MEASURED_SSH

    if not artifact.lower().endswith((".onnx", ".tflite", ".engine")):
        check_names(artifact)  # a model source: a typo is answered before torch is imported
    from ..pipeline.source import profile_model

    progress.enable_for(sys.stderr)
    lat = profile_model(artifact, device, input_size=input_size, host=host, threads=threads, runs=runs,
                        warmup=warmup)
    if as_json:
        out.print_json(json.dumps(lat.to_json(), default=str))
        return
    e = lat.extra
    how = {MEASURED: "measured here", MEASURED_SSH: f"measured on {e.get('host')} over SSH",
           ESTIMATED: "ESTIMATED by the latency model, not measured"}[lat.source]
    table = Table(title=f"{Path(artifact).name} · {lat.device} · {how}", header_style="bold")
    if lat.source == ESTIMATED:
        for c in ("source", "estimate ms", "threads", "ops", "GMACs", "compute/memory/overhead-bound ops"):
            table.add_column(c, justify="right")
        b = e.get("bound")  # the per-kernel regression has no roofline bounds
        table.add_row(lat.source, f"{lat.p50:.3f}", str(lat.threads), str(e["ops"]), f"{e['gmacs']:.3f}",
                      f"{b['compute']}/{b['memory']}/{b['overhead']}" if b else "-")
        out.print(table)
        top = sorted(e["by_category"].items(), key=lambda kv: -kv[1]["ms"])[:5]
        out.print("where the time goes (estimated): " + ", ".join(f"{k} {v['ms']:.3f} ms ({v['ops']} ops)"
                                                                 for k, v in top), highlight=False)
        cal = e.get("calibration") or {}
        where = f"calibrated on {cal['host']} {cal.get('date')}" if cal.get("host") else \
            "defaults, not calibrated for this device"
        out.print(f"coefficients: {where}", highlight=False)
        for w in e.get("warnings", []):
            out.print(f"[yellow]warning:[/] {w}", highlight=False)
    else:
        for c in ("source", "p50 ms", "p90 ms", "mean ms", "min ms", "runs", "threads", "runtime", "machine"):
            table.add_column(c, justify="right")
        table.add_row(lat.source, f"{lat.p50:.3f}", f"{lat.p90:.3f}", f"{e['mean']:.3f}", f"{e['min']:.3f}",
                      str(lat.runs), str(lat.threads or "default"), f"{lat.runtime} {lat.runtime_version or ''}",
                      f"{e.get('machine')} · Python {e.get('python')}")
        out.print(table)
