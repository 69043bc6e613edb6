"""``edgekit sweep``: a grid of models x recipes x devices on Ray, with a table per device."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .. import progress
from ..errors import EdgekitError
from .base import app, check_inputs, err, handle_errors, out
from .tables import show_sweep


def _list(text: Optional[str]) -> List[str]:
    return [x.strip() for x in text.split(",") if x.strip()] if text else []


def _hosts(items: List[str]) -> dict:
    """--host rpi5=pi@10.0.0.5,pi@10.0.0.6 (repeatable) -> {"rpi5": [...]}."""
    hosts: dict = {}
    for item in items:
        device, sep, boards = item.partition("=")
        if not sep or not device.strip() or not _list(boards):
            raise EdgekitError(f"--host {item!r}: expected DEVICE=user@addr[:port][,user@addr2...]")
        hosts.setdefault(device.strip(), []).extend(_list(boards))
    return hosts


@app.command()
@handle_errors
def sweep(
    file: Optional[Path] = typer.Argument(None, help="A sweep YAML (models, recipes, devices, hosts, data, ...); "
                                          "options given here replace its fields."),
    models: Optional[str] = typer.Option(None, "--models", "-m", help="Comma-separated model sources."),
    recipes: Optional[str] = typer.Option(None, "--recipes", "-r", help="Comma-separated recipe names or YAMLs."),
    devices: Optional[str] = typer.Option(None, "--devices", "-d", help="Comma-separated device names or YAMLs."),
    host: List[str] = typer.Option([], "--host", help="DEVICE=user@addr[:port],... : the boards that measure a "
                                   "device over SSH, one run per board at a time (repeatable)."),
    data: Optional[Path] = typer.Option(None, "--data", help="As for compress (default: the embedded MNIST task)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="'pretrained' or a state-dict .pth file."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default export/sweep); "
                                         "running again there skips every finished cell."),
    address: Optional[str] = typer.Option(None, "--address", help="A Ray cluster (ray://host:port or auto); "
                                          "default: a local Ray instance, started and stopped here."),
    gpus: Optional[float] = typer.Option(None, "--gpus-per-build", help="GPUs each training/build task asks Ray "
                                         "for (default 0: train on CPUs)."),
    target_ms: Optional[float] = typer.Option(None, "--target-ms", help="Latency target (default: each device's)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Square input size (default: the task's)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    runs: Optional[int] = typer.Option(None, "--runs", min=10, help="Timed runs per variant (default 100)."),
):
    """Compress every model with every recipe for every device on Ray; the best variant under each device's
    latency target, and the accuracy-latency Pareto front (sweep.json, sweep.md, sweep.html)."""
    if file is not None and not file.is_file():
        raise EdgekitError(f"Sweep file not found: {file}")
    check_inputs(data, weights)
    from ..sweep import sweep as run_sweep

    progress.enable_for(sys.stderr)
    try:
        result = run_sweep(file, out=out_dir, models=_list(models), recipes=_list(recipes), devices=_list(devices),
                           hosts=_hosts(host), data=str(data) if data else None, weights=weights, address=address,
                           target_ms=target_ms, input_size=input_size, seed=seed, runs=runs,
                           gpus_per_build=gpus)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted: the cells that finished are kept whole under cells/ (no half-written "
                  "cell); run the same command again to finish the others[/]")
        raise typer.Exit(130)
    show_sweep(result.to_json())
    out.print(f"Wrote {result.out_dir}/ (sweep.md, sweep.html, sweep.json; cells/ has one compress folder per cell)")

