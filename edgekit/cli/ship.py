"""Getting a run onto a device: deploy, docker, and the version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .. import __version__
from .base import app, err, handle_errors, out


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
    from ..deployment import deploy_cmd

    res = deploy_cmd(run_dir, device, host=host, bundle=bundle, root=root, python_version=python,
                     fetch_wheels=not no_wheels, force=force, bench_runs=runs)
    if as_json:
        typer.echo(json.dumps(res, default=str))
        return
    if res.get("bundle"):
        out.print(f"bundle [bold]{res['bundle']}[/] ({res.get('size_mb', '?')} MiB, id {res['release']}): "
                  f"{res.get('artifact')} for {res.get('device')}"
                  + (f", fallback {res['fallback']}" if res.get("fallback") else ""), highlight=False)
        if res.get("why"):
            out.print(f"• chosen: {res['why']}", highlight=False, markup=False)
        lat = res.get("latency") or {}
        if lat.get("p50") is not None:
            how = "measured" if str(lat.get("source", "")).startswith("measured") else \
                "ESTIMATED, not measured (uncalibrated coefficients unless the profile says otherwise)"
            out.print(f"• latency on {lat.get('device')}: p50 {lat['p50']:.3f} ms, {how}", highlight=False,
                      markup=False)
        for note in res.get("notes") or []:
            out.print(f"• {note}", highlight=False, markup=False)
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
    device: Optional[str] = typer.Option(None, "--device", "-d", help="Device profile: rpi4, jetson-orin-nano, "
                                                                      "desktop-cpu ..."),
    toolkit: bool = typer.Option(False, "--toolkit", help="The x86_64 toolkit image instead of a device's runtime."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="A bundle .tar.gz (or extracted folder) to put "
                                                                 "in the image."),
    engine: str = typer.Option("auto", "--engine", help="docker (buildx), podman, or auto: the one installed here."),
    local_bases: bool = typer.Option(False, "--local-bases", help="podman: build FROM the Debian bases "
                                     "docker/make-bases.sh makes from Debian packages (no registry needed)."),
    host_pip: bool = typer.Option(False, "--host-pip", help="Give the build's pip this machine's index, find-links "
                                  "and cert settings (podman mounts the local folders they name read-only)."),
    cross: bool = typer.Option(False, "--cross", help="Build runtime-cross: no RUN step on the device's platform "
                               "(chosen by itself with podman where no qemu binfmt is registered)."),
    tag: Optional[str] = typer.Option(None, "--tag", "-t", help="Image tag (default edgekit-runtime:DEVICE, or "
                                                                "edgekit:toolkit)."),
    run: bool = typer.Option(False, "--run", help="Run the commands instead of printing them."),
    smoke: bool = typer.Option(False, "--smoke", help="With --run and --bundle (podman): run the bundle's smoke "
                                                      "test inside the built image, compared with the host's outputs."),
    push: bool = typer.Option(False, "--push", help="Push instead of loading into the local engine."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
):
    """Print (or --run) the commands that build a device's runtime image, or the toolkit image."""
    from ..deployment import docker_cmd

    res = docker_cmd(device, bundle=bundle, run=run, tag=tag, push=push, engine=engine, smoke=smoke,
                     toolkit=toolkit, local_bases=local_bases, host_pip=host_pip, cross=cross)
    if as_json:
        typer.echo(json.dumps(res, default=str))
        return
    for note in res["notes"]:
        err.print(f"# {note}", highlight=False, markup=False, soft_wrap=True)
    if run:
        took = ", ".join(f"{s['argv'][0]} {s['argv'][1]} {s['seconds']:.0f} s" for s in res["steps"])
        out.print(f"[bold green]built[/] {res['tag']} ({res['target']}, {res['platform']}; {took})", highlight=False)
        sm = res.get("smoke")
        if sm:
            worst = max((c.get("max_abs_diff") or 0.0 for c in sm["checks"]), default=0.0)
            out.print(f"smoke test in the image ({sm['arch']}, {sm['launcher']}): {len(sm['checks'])} samples of "
                      f"{sm['model']}, " + (f"match the host (max |diff| {worst:.2e}, atol {sm['atol']})"
                                            if sm["matches_host"] else "ran (no host reference)"), highlight=False)
    else:
        err.print(f"# run in {res['cwd']}", highlight=False)
        for c in res["commands"]:
            typer.echo(c)


@app.command()
def version():
    """Print edgekit's version."""
    out.print(f"edgekit {__version__}")
