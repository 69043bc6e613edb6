"""The edgekit command line: thin wrappers over the library, rich tables for results.

Errors a user can cause end in one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import __version__, progress
from .errors import EdgekitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress lightweight CNNs, export them for edge devices, and tell the truth about speed "
                       "and accuracy.")
zoo_app = typer.Typer(no_args_is_help=True, help="The model zoo.")
recipes_app = typer.Typer(no_args_is_help=True, help="Built-in recipes.")
devices_app = typer.Typer(no_args_is_help=True, help="Built-in device profiles.")
app.add_typer(zoo_app, name="zoo")
app.add_typer(recipes_app, name="recipes")
app.add_typer(devices_app, name="devices")

# Off a terminal (CI logs, pipes) rich would wrap tables at 80 columns; give them room instead.
out = Console(width=None if sys.stdout.isatty() else 180)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 180)


def handle_errors(fn):
    """Turn EdgekitError into one red line and exit 2; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        mode = progress.mode()  # commands turn progress on; callers in the same process (tests) get it back as it was
        try:
            return fn(*args, **kwargs)
        except EdgekitError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted; nothing was written[/]")
            raise typer.Exit(130)
        finally:
            progress.enable(mode)

    return wrapper


def check_names(model: Optional[str] = None, recipe: Optional[str] = None, device: Optional[str] = None) -> None:
    """Unknown zoo, recipe and device names fail in well under a second (index.json and YAML, no torch)."""
    from .config import load_device, resolve_file
    from .zoo.index import canonical_name

    if model is not None and ":" not in model and not model.lower().endswith((".onnx", ".py")):
        canonical_name(model)
    if recipe is not None:
        resolve_file("recipes", recipe)
    if device is not None:
        load_device(device)


def check_inputs(data: Optional[Path] = None, weights: Optional[str] = None) -> None:
    """--data and --weights mistakes answered before any work, with what to give instead."""
    if data is not None and not data.is_dir():
        if data.exists():
            raise EdgekitError(f"--data must be a folder of class sub-folders (<folder>/<class>/<image>.jpg, or "
                               f"<folder>/train and <folder>/val), not a file: {data}")
        raise EdgekitError(f"Data folder not found: {data}")
    if weights is not None and weights != "pretrained" and not Path(weights).is_file():
        raise EdgekitError(f"Weights file not found: {weights}. --weights takes 'pretrained' (the zoo's pretrained "
                           f"ImageNet weights: --weights pretrained) or a state-dict .pth file")


def _plain(cell) -> str:
    """A cell's text as shown (rich reads str cells as markup)."""
    from rich.errors import MarkupError

    try:
        return Text.from_markup(cell).plain if isinstance(cell, str) else str(cell)
    except MarkupError:
        return str(cell)


def fit_table(table: Table, console: Optional[Console] = None):
    """``table`` if ``console`` is wide enough for every cell's longest word, else one block per row of "header: value"
    pairs: rich would otherwise cut numbers to '1.…' in an 80-column terminal. Wrapping columns to fit, widest first,
    never below a column's longest word."""
    from rich.cells import cell_len

    console = console or out
    cols = table.columns
    texts = [[_plain(c.header)] + [_plain(x) for x in c.cells] for c in cols]
    hi = [max((cell_len(line) for t in ts for line in t.splitlines()), default=0) for ts in texts]
    lo = [max((cell_len(w) for t in ts for w in t.split()), default=0) for ts in texts]
    left, right = table.padding[3], table.padding[1]
    overhead = (left + right) * len(cols) + (len(cols) + 1 if table.box and table.show_edge else len(cols) - 1)
    room = console.width - overhead
    if sum(hi) <= room:
        return table
    if sum(lo) <= room:
        widths = list(hi)
        while sum(widths) > room:  # narrow the widest column that can still wrap
            i = max((j for j in range(len(cols)) if widths[j] > lo[j]), key=lambda j: widths[j])
            widths[i] -= 1
        for c, w in zip(cols, widths):
            c.width, c.no_wrap, c.overflow = w, False, "fold"
        return table
    return _blocks(table, texts, console.width)


def _blocks(table: Table, texts: List[List[str]], width: int) -> Group:
    """The narrow layout: per row its first cell as a heading, then "header: value" pairs packed into lines."""
    from rich.cells import cell_len

    heads = [" ".join(ts[0].split()) for ts in texts]
    # the heading: the first cell and the left-aligned names after it (variant · format · precision)
    n = 1
    while n < len(texts) and table.columns[n].justify == "left":
        n += 1
    lines: List[Text] = []
    if table.title:
        lines.append(Text(_plain(table.title), style="bold"))
    for r in range(len(texts[0]) - 1 if texts else 0):
        lines.append(Text(" · ".join(ts[r + 1] for ts in texts[:n] if ts[r + 1]) or "—", style="bold"))
        row, cur = [], ""
        for h, ts in zip(heads[n:], texts[n:]):
            value = " ".join(ts[r + 1].split())
            if not value:
                continue
            pair = f"{h}: {value}"
            if cur and cell_len(cur) + 3 + cell_len(pair) > width - 2:
                row.append(cur)
                cur = pair
            else:
                cur = f"{cur} · {pair}" if cur else pair
        if cur:
            row.append(cur)
        lines += [Text("  " + x) for x in row]
    if table.caption:
        lines.append(Text(_plain(table.caption), style="dim"))
    return Group(*lines)


def show_report(report: dict, console: Optional[Console] = None) -> None:
    """compress's terminal output: the results table (blocks when the terminal is narrow) and the summary."""
    from .report import summary_lines

    console = console or out
    console.print(fit_table(results_table(report, title=f"{report['model']} · {report['recipe']} · "
                                                        f"{report['device']}"), console))
    for line in summary_lines(report):
        flag = any(w in line for w in ("SLOWER", "loses", "failed", "uncalibrated"))
        console.print(("[bold yellow]! [/]" if flag else "• ") + escape(line.replace("**", "")), highlight=False)


def show_benchmark(rows, table: Table, device: str, console: Optional[Console] = None) -> None:
    """benchmark's terminal output: its table (blocks when narrow) and what its estimated latencies are."""
    console = console or out
    console.print(fit_table(table, console))
    estimated = [v.latency for v in rows if v.latency is not None and not v.latency.measured]
    if estimated:
        from .report import latency_basis

        bases = "; ".join(sorted({latency_basis(lat.to_json()) for lat in estimated}))
        console.print(f"[bold yellow]! [/]Latency noted 'latency estimated' is {escape(bases)}: the latency model's "
                      f"prediction for {escape(device)}, not timed on it.", highlight=False)


def results_table(report: dict, title: Optional[str] = None) -> Table:
    from .report import COLUMNS, variant_rows

    table = Table(title=title, header_style="bold")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("variant", "format", "precision", "status") else "right")
    for row in variant_rows(report):
        table.add_row(*row)
    return table


@app.command()
@handle_errors
def compress(
    model: str = typer.Argument(..., help="Zoo model name (see `edgekit zoo list`)."),
    recipe: str = typer.Option("int8", "--recipe", "-r", help="Built-in recipe name or path to a recipe YAML."),
    device: str = typer.Option("desktop-cpu", "--device", "-d", help="Device profile name or YAML path."),
    data: Optional[Path] = typer.Option(None, "--data", help="ImageFolder tree (default: embedded MNIST task)."),
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
):
    """Compress MODEL with a recipe, export, evaluate and measure every variant."""
    check_names(model, recipe, device)  # a typo is answered before torch is imported
    check_inputs(data, weights)
    from .pipeline import run

    progress.enable_for(sys.stderr)
    report = run(model, recipe, device, data=str(data) if data else None, weights=weights, out=out_dir,
                 force=force, seed=seed, target_ms=target_ms, input_size=input_size, runs=runs,
                 skip_bad_images=skip_bad_images)
    show_report(report)
    if report["task"].get("skipped_images"):
        out.print(f"[bold yellow]! [/]skipped {report['task']['skipped_images']} unreadable image(s) of --data "
                  "(listed in report.json under task.skipped)", highlight=False)
    out.print(f"Wrote {report['out_dir']}/ (report.md, report.html, report.json) in {report['seconds']} s")


@zoo_app.command("list")
@handle_errors
def zoo_list(input_size: int = typer.Option(224, help="Input size for the params/MACs columns."),
             markdown: bool = typer.Option(False, "--markdown", help="Print the zoo matrix as Markdown (the README's table).")):
    """Every zoo model with its source, params, MACs and the formats/recipes the test suite found passing."""
    from .zoo import matrix as zm
    from .zoo.index import STATS_SIZE, load_index

    matrix = zm.load_matrix()
    if markdown:
        out.print(zm.to_markdown(matrix, input_size), markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(header_style="bold", caption=f"passing: from the test run of {matrix.get('generated', 'never')} "
                                               "(edgekit/zoo/matrix.py says what each column means)")
    for c in ("model", "aliases", "source", "params", f"MMACs@{input_size}", *zm.COLUMNS, "paper"):
        table.add_column(c)
    for name, spec in sorted(load_index().items()):
        if input_size == STATS_SIZE:  # from index.json: no model is built, torch is not imported
            st = spec
        else:
            from . import zoo

            st = zoo.model_stats(zoo.create(name), (3, input_size, input_size))
        entry = matrix.get("models", {}).get(name, {})
        table.add_row(name, ", ".join(spec["aliases"]), spec["source"], f"{st['params'] / 1e6:.2f}M",
                      f"{st['macs'] / 1e6:.1f}", *(zm.cell(entry.get(c), c) for c in zm.COLUMNS), spec["paper"])
    out.print(table)


@recipes_app.command("list")
@handle_errors
def recipes_list():
    """Built-in recipes (user recipes are YAML files passed by path)."""
    from .config import builtin_names, load_recipe

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
    from .config import builtin_names, load_device

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
    from .estimate.kernels.calibrate import calibrate_device, reprobe_cold

    progress.enable_for(sys.stderr)
    if cold_only:
        from .config import load_device
        from .estimate.tables import kernel_table_for

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
    from .config import load_device
    from .estimate.check import speed_check
    from .estimate.tables import kernel_table_for

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


@app.command()
@handle_errors
def benchmark(
    model: str = typer.Argument(..., help="Zoo model name (see `edgekit zoo list`)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe whose steps compress the model first."),
    device: str = typer.Option("desktop-cpu", "--device", "-d", help="Device profile name or YAML path."),
    data: Optional[Path] = typer.Option(None, "--data", help="ImageFolder tree (default: embedded MNIST task)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="'pretrained' or a state-dict .pth file."),
    formats: Optional[List[str]] = typer.Option(None, "--format", "-f", help="Only these formats (repeatable)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Keep the artifacts in this folder."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Runtime threads (default: the device's)."),
    runs: int = typer.Option(50, "--runs", min=5, help="Timed rounds (all formats interleaved)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Square input size (default: the task's)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the rows as JSON."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Leave unreadable images of --data out "
                                         "instead of stopping."),
):
    """Export MODEL to every format x precision, evaluate and time them side by side (ok / unavailable / failed)."""
    check_names(model, recipe, device)
    from .pipeline.benchmark import benchmark as run_benchmark, benchmark_table

    check_inputs(data, weights)
    progress.enable_for(sys.stderr)
    result = run_benchmark(model, recipe=recipe, device=device, data=str(data) if data else None, weights=weights,
                           formats=formats or None, out_dir=out_dir, threads=threads, runs=runs,
                           input_size=input_size, skip_bad_images=skip_bad_images)
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
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Zoo architecture of a .pt/.pth checkpoint."),
    data: Optional[Path] = typer.Option(None, "--data", help="ImageFolder tree (default: embedded MNIST task)."),
    limit: int = typer.Option(500, "--limit", min=1, help="Inputs to compare on."),
    per_layer: bool = typer.Option(True, "--per-layer/--no-per-layer", help="Per-layer table (two ONNX models)."),
    threshold_db: float = typer.Option(20.0, "--threshold-db", help="SQNR below which a layer has diverged."),
    max_layers: int = typer.Option(40, "--max-layers", min=1, help="Layer rows to show around the divergence."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the full result as JSON."),
):
    """Run two artifacts of one model on the same inputs; name the first layer where they diverge."""
    from .comparison import compare_artifacts, render_comparison

    check_inputs(data)
    result = compare_artifacts(a, b, data=str(data) if data else None, per_layer=per_layer, model=model,
                               limit=limit, threshold_db=threshold_db)
    for table in render_comparison(result, max_layers=max_layers):
        out.print(fit_table(table))
    first = result.get("first_divergence")
    if result.get("layers") is not None:
        out.print(f"first layer below {threshold_db} dB: " + (f"{first['node']} ({first['op']}, "
                  f"{first['sqnr_db']:.1f} dB)" if first else "none"))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2, default=str))


@app.command()
@handle_errors
def profile(
    artifact: Path = typer.Argument(..., help="Exported model: .onnx, .tflite or .engine."),
    device: str = typer.Option("desktop-cpu", "--device", "-d", help="Device profile name or YAML path."),
    host: Optional[str] = typer.Option(None, "--host", help="Measure on user@address[:port] over SSH "
                                                            "(system OpenSSH, host keys checked)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Default: the profile's threads."),
    runs: int = typer.Option(100, "--runs", min=1, help="Timed runs after warm-up."),
    warmup: int = typer.Option(10, "--warmup", min=0),
    as_json: bool = typer.Option(False, "--json", help="Print the whole result as JSON."),
):
    """Latency of ARTIFACT on a device: measured here (local profiles), over SSH (--host or the profile's
    ssh: block), or estimated from the ONNX graph (every other profile)."""
    from .measure import profile_artifact
    from .results import ESTIMATED, MEASURED, MEASURED_SSH

    progress.enable_for(sys.stderr)
    lat = profile_artifact(artifact, device, host=host, threads=threads, runs=runs, warmup=warmup)
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


@app.command()
@handle_errors
def deploy(
    run_dir: Path = typer.Argument(..., help="A run folder from `edgekit compress`, or a bundle .tar.gz to deploy."),
    device: str = typer.Option(..., "--device", "-d", help="Device profile: rpi4, rpi5, jetson-orin-nano, ... or a "
                                                           "YAML path."),
    host: Optional[str] = typer.Option(None, "--host", help="Deploy over SSH to user@address[:port]."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Write the bundle (.tar.gz) here."),
    python: str = typer.Option("3.11", "--python", help="The device's Python version; the wheels are fetched for it."),
    root: str = typer.Option("~/edgekit", "--root", help="Folder on the device for releases/ and current."),
    no_wheels: bool = typer.Option(False, "--no-wheels", help="Bundle no wheels (install.sh then uses the index)."),
    runs: int = typer.Option(20, "--runs", help="Benchmark runs on the device after installing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --bundle file."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
):
    """Bundle a run for a device (installs offline) and/or deploy it over SSH (releases, atomic `current`)."""
    from .deployment import deploy_cmd

    res = deploy_cmd(run_dir, device, host=host, bundle=bundle, root=root, python_version=python,
                     fetch_wheels=not no_wheels, force=force, bench_runs=runs)
    if as_json:
        typer.echo(json.dumps(res, default=str))
        return
    if res.get("bundle"):
        out.print(f"bundle [bold]{res['bundle']}[/] ({res.get('size_mb', '?')} MiB, id {res['release']}): "
                  f"{res.get('artifact')} for {res.get('device')}"
                  + (f", fallback {res['fallback']}" if res.get("fallback") else ""), highlight=False)
    if res.get("action") in ("installed", "activated", "unchanged"):
        out.print(f"[bold green]{res['action']}[/]: {res['message']}", highlight=False)
        smoke, bench = res.get("smoke") or {}, res.get("bench") or {}
        if smoke.get("checks"):
            out.print(f"smoke test: {len(smoke['checks'])} samples, "
                      f"{'match the host' if smoke.get('matches_host') else 'ran (no host reference)'}")
        if bench.get("p50") is not None:
            out.print(f"on the device: p50 {bench['p50']:.3f} ms, p90 {bench['p90']:.3f} ms "
                      f"({bench.get('runtime')} {bench.get('version')}, {bench.get('machine')})")


@app.command()
@handle_errors
def docker(
    device: str = typer.Option(..., "--device", "-d", help="Device profile: rpi4, jetson-orin-nano, desktop-cpu ..."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="A bundle .tar.gz (or extracted folder) to put "
                                                                 "in the image."),
    tag: Optional[str] = typer.Option(None, "--tag", "-t", help="Image tag (default edgekit-runtime:DEVICE)."),
    run: bool = typer.Option(False, "--run", help="Run the build (needs docker buildx) instead of printing it."),
    push: bool = typer.Option(False, "--push", help="Push instead of loading into the local engine."),
):
    """Print (or --run) the `docker buildx build` command of a device's runtime image."""
    from .deployment import docker_cmd

    res = docker_cmd(device, bundle=bundle, run=run, tag=tag, push=push)
    if run:
        out.print(f"[bold green]built[/] {res['argv'][res['argv'].index('-t') + 1]}", highlight=False)
    else:
        err.print(f"# run in {res['cwd']}", highlight=False)
        typer.echo(res["command"])


@app.command()
def version():
    """Print edgekit's version."""
    out.print(f"edgekit {__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
