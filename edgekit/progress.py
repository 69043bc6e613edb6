"""Progress bars for long steps (training, calibration, benchmarking), on stderr.

Library code calls ``track``; the CLI turns bars on. Tests and library users get
no bars unless they call ``enable``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
_state = {"enabled": False}
console = Console(stderr=True)


def enable(on: bool = True) -> None:
    _state["enabled"] = on


def track(items: Iterable[T], description: str, total: Optional[int] = None) -> Iterator[T]:
    if not _state["enabled"]:
        yield from items
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as prog:
        yield from prog.track(items, total=total, description=description)


@contextmanager
def status(message: str):
    """A spinner for a step with no natural count (export, conversion)."""
    if not _state["enabled"]:
        yield
        return
    with console.status(message):
        yield


def log(message: str) -> None:
    if _state["enabled"]:
        console.print(message)
