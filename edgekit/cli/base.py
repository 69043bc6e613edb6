"""The Typer apps, the consoles, and what every command shares: one-line errors (exit 2), fast name checks."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from .. import progress
from ..errors import EdgekitError

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
    """Unknown zoo, recipe and device names, missing model files fail in well under a second (no torch)."""
    from ..config import load_device, resolve_file
    from ..sources import parse_source

    if model is not None:
        parse_source(model)  # zoo names from index.json, files by existence: torch is not imported
    if recipe is not None:
        resolve_file("recipes", recipe)
    if device is not None:
        load_device(device)


def check_inputs(data: Optional[Path] = None, weights: Optional[str] = None) -> None:
    """--data and --weights mistakes answered before any work, with what to give instead."""
    if data is not None and not data.is_dir():
        if data.exists():
            raise EdgekitError(f"--data must be a folder of class sub-folders (<folder>/<class>/<image>.jpg, or "
                               f"<folder>/train and <folder>/val), or of images (<folder>/<image>.jpg, judged "
                               f"without labels by agreement with fp32), not a file: {data}")
        raise EdgekitError(f"Data folder not found: {data}")
    if weights is not None and weights != "pretrained" and not Path(weights).is_file():
        raise EdgekitError(f"Weights file not found: {weights}. --weights takes 'pretrained' (the zoo's pretrained "
                           f"ImageNet weights: --weights pretrained) or a state-dict .pth file")
