"""What is built in: the zoo, recipes and device profiles (and the latency model's calibration)."""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.table import Table

from .. import progress
from ..errors import EdgekitError
from .base import devices_app, handle_errors, out, recipes_app, zoo_app


@zoo_app.command("list")
@handle_errors
def zoo_list(input_size: int = typer.Option(224, help="Input size for the params/MACs columns."),
             markdown: bool = typer.Option(False, "--markdown", help="Print the zoo matrix as Markdown (the README's table).")):
    """Every zoo model with its source, params, MACs and the formats/recipes the test suite found passing."""
    from ..zoo import matrix as zm
    from ..zoo.index import STATS_SIZE, load_index

    matrix = zm.load_matrix()
    if markdown:
        out.print(zm.to_markdown(matrix, input_size), markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(header_style="bold", caption=f"passing: from the test run of {matrix.get('generated', 'never')} "
                                               "(edgekit/zoo/matrix.py says what each column means)")
    for c in ("model", "aliases", "source", "params", f"MMACs@{input_size}", *zm.COLUMNS, "paper"):
        table.add_column(c)
    detectors = Table(header_style="bold", title="detectors (task detection; sizes at each one's input size)")
    for c in ("model", "aliases", "source", "params", "MMACs", "input", "paper"):
        detectors.add_column(c)
    for name, spec in sorted(load_index().items()):
        if spec.get("task") == "detection":
            detectors.add_row(name, ", ".join(spec["aliases"]), spec["source"], f"{spec['params'] / 1e6:.2f}M",
                              f"{spec['macs'] / 1e6:.1f}", f"{spec['input_size']} px", spec["paper"])
            continue
        if input_size == STATS_SIZE:  # from index.json: no model is built, torch is not imported
            st = spec
        else:
            from .. import zoo

            st = zoo.model_stats(zoo.create(name), (3, input_size, input_size))
        entry = matrix.get("models", {}).get(name, {})
        table.add_row(name, ", ".join(spec["aliases"]), spec["source"], f"{st['params'] / 1e6:.2f}M",
                      f"{st['macs'] / 1e6:.1f}", *(zm.cell(entry.get(c), c) for c in zm.COLUMNS), spec["paper"])
    out.print(table)
    if detectors.row_count:
        out.print(detectors)


@recipes_app.command("list")
@handle_errors
def recipes_list():
    """Built-in recipes (user recipes are YAML files passed by path)."""
    from ..config import builtin_names, load_recipe

    table = Table(header_style="bold")
    for c in ("recipe", "steps", "variants", "budget", "description"):
        table.add_column(c)
    for name in builtin_names("recipes"):
        r = load_recipe(name)
        table.add_row(name, " → ".join(s.kind for s in r.steps) or "—",
                      ", ".join(f"{v.format} {v.precision}" for v in r.variants), f"{r.accuracy_budget_pp} pp",
                      r.description)
    out.print(table)


@devices_app.command("list")
@handle_errors
def devices_list():
    """Built-in device profiles (user profiles are YAML files passed by path)."""
    from ..config import builtin_names, load_device

    table = Table(header_style="bold")
    for c in ("device", "kind", "arch", "precisions", "formats", "target", "description"):
        table.add_column(c)
    for name in builtin_names("devices"):
        d = load_device(name)
        table.add_row(name, d.kind, d.arch, ", ".join(d.precisions), ", ".join(d.formats),
                      f"{d.latency_target_ms} ms" if d.latency_target_ms else "—", d.description)
    out.print(table)


@devices_app.command("calibrate")
@handle_errors
def devices_calibrate(
    device: str = typer.Argument("desktop-cpu", help="A local device profile (local: true): name or YAML path."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Default: the profile's threads."),
    nets: int = typer.Option(260, "--nets", min=2, help="Random networks to time (each fp32 and int8)."),
    cold_only: bool = typer.Option(False, "--cold-only", help="Re-measure only what weights past the cache cost "
                                   "(about a minute) in the profile's existing table for these threads."),
):
    """Re-time this machine's per-kernel latency table (random networks, about 13 minutes for 260 at 1 thread) and point
    the profile at it, so estimates for this machine come from this machine."""
    from ..estimate.kernels.calibrate import calibrate_device, reprobe_cold

    progress.enable_for(sys.stderr)
    if cold_only:
        from ..config import load_device
        from ..estimate.tables import kernel_table_for

        dev = load_device(device)
        if not dev.local:
            raise EdgekitError(f"Kernel calibration measures this machine; device {dev.name} is not local: true")
        t = int(threads or dev.resolved_threads())
        path = kernel_table_for(dev.latency_model, t)
        if path is None:
            raise EdgekitError(f"{dev.name} has no kernel table for {t} thread(s): run `edgekit devices calibrate` first")
        r = reprobe_cold(path)
        out.print("cold curve (weight MB per kernel: us per MB past the cache): "
                  + ", ".join(f"{mb:g}: {us:.1f}" for mb, us in r["cold_curve"]) + f" -> {r['path']}", highlight=False)
        return
    r = calibrate_device(device, threads=threads, nets=nets)
    o = r["overhead"]
    out.print(f"{r['kernels']} kernel timings from {r['nets']} random networks, fp32 and int8 "
              f"({r['threads']} thread(s)) in "
              f"{r['measure_s']:.0f} s -> {r['path']}; executor overhead {o['a_us']:.1f} us + {o['b_us']:.2f} us "
              f"per kernel", highlight=False)


@devices_app.command("check")
@handle_errors
def devices_check(
    device: str = typer.Argument("desktop-cpu", help="A local device profile (local: true): name or YAML path."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Default: the profile's threads."),
    nets: int = typer.Option(12, "--nets", min=2, help="Calibration networks with weights in cache to re-time "
                             "(half fp32, half int8); four more whose weights pass the cache are re-timed too."),
):
    """Is this machine as fast as when its kernel table was timed? Re-times a few of the table's own random networks
    (about 10 s) and compares: a shared host runs slower for a while, and estimates cannot know it."""
    from ..config import load_device
    from ..estimate.check import speed_check
    from ..estimate.tables import kernel_table_for

    progress.enable_for(sys.stderr)
    dev = load_device(device)
    if not dev.local:
        raise EdgekitError(f"A speed check times this machine; device {dev.name} is not local: true")
    t = int(threads or dev.resolved_threads())
    path = kernel_table_for(dev.latency_model, t)
    if path is None:
        raise EdgekitError(f"{dev.name} has no kernel table for {t} thread(s): run `edgekit devices calibrate` first")
    r = speed_check(path, dev, count=nets)
    table = Table(header_style="bold", title=f"{dev.name}, {t} thread(s): now vs {r['table']} ({r['table_date']})")
    for c in ("network", "precision", "kernels", "weights MB", "calibrated ms", "now ms", "now / then"):
        table.add_column(c, justify="left" if c in ("network", "precision") else "right")
    for n in r["nets"]:
        table.add_row(n["name"], n["precision"], str(n["kernels"]),
                      f"{n['weights_mb']:.1f}" + (" (past the cache)" if n["past_cache"] else ""),
                      f"{n['calibrated_ms']:.3f}", f"{n['now_ms']:.3f}", f"{n['now_ms'] / n['calibrated_ms']:.2f}")
    out.print(table)
    ratio = r["ratio"]
    by = ", ".join(f"{label} {r[p]:.2f}x" for p, label in (("fp32", "fp32"), ("int8", "int8"),
                                                            ("past_cache", "weights past the cache")) if p in r)
    if r.get("table_host") and r["table_host"] != r["host"]:
        out.print(f"The table was timed on {r['table_host']}; this is {r['host']}.", highlight=False)
    if abs(ratio - 1) <= 0.10 and abs(r.get("past_cache", 1.0) - 1) <= 0.10:
        out.print(f"This host runs at {ratio:.2f}x the table's times ({by}): its estimates hold.", highlight=False)
    elif abs(ratio - 1) <= 0.10:
        out.print(f"This host runs at {ratio:.2f}x the table's times ({by}): its estimates hold for models whose "
                  f"weights fit in {r['cold_mb']:g} MB; larger ones run {r['past_cache']:.2f}x, slowed or sped by how "
                  f"busy the memory is now.", highlight=False)
    else:
        out.print(f"This host runs at {ratio:.2f}x the table's times ({by}): estimates {'under' if ratio > 1 else 'over'}"
                  f"-state its latency now by about that much. Measure (`edgekit profile`), check again later, or "
                  f"recalibrate (`edgekit devices calibrate {device}`) if it stays so.", highlight=False)
