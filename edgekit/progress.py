"""Progress of long steps (training, calibration, benchmarking), on stderr.

Library code calls ``track``, ``task`` and ``status``; the CLI turns progress on with ``enable_for(sys.stderr)``:
rich bars on a terminal, and elsewhere (a log, a pipe, CI) a plain line every ``EDGEKIT_PROGRESS_PERIOD`` seconds
(default 10), e.g. ``train shufflenetv2: 120/468 batches, 1,530 img/s, eta 0:35``, so a redirected run still shows
what it is doing. Tests and library users get nothing unless they call ``enable``.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
OFF, BARS, LINES = "off", "bars", "lines"
_state = {"mode": OFF}
console = Console(stderr=True)
DEFAULT_PERIOD_S = 10.0


def enable(on: bool | str = True) -> None:
    """True or "bars": rich bars; "lines": plain periodic lines; False or "off": nothing."""
    mode = BARS if on is True else OFF if on is False else on
    if mode not in (OFF, BARS, LINES):
        raise ValueError(f"progress mode must be one of off, bars, lines; got {on!r}")
    _state["mode"] = mode


def enable_for(stream=None) -> str:
    """Bars when ``stream`` (default stderr) is a terminal, plain lines otherwise; ``EDGEKIT_PROGRESS`` (off, bars,
    lines) overrides. Returns the mode chosen."""
    stream = sys.stderr if stream is None else stream
    forced = os.environ.get("EDGEKIT_PROGRESS", "").strip().lower()
    is_tty = bool(getattr(stream, "isatty", lambda: False)())
    enable(forced if forced in (OFF, BARS, LINES) else BARS if is_tty else LINES)
    return _state["mode"]


def mode() -> str:
    return _state["mode"]


def period() -> float:
    """Seconds between plain progress lines (``EDGEKIT_PROGRESS_PERIOD``, default 10)."""
    try:
        return max(0.0, float(os.environ.get("EDGEKIT_PROGRESS_PERIOD", DEFAULT_PERIOD_S)))
    except ValueError:
        return DEFAULT_PERIOD_S


def clock(seconds: float) -> str:
    """0:35, 12:04, 1:02:03."""
    s = int(round(max(0.0, seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def _line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _Meter:
    """Counts steps (and optionally items such as images) and their rate; ``advance`` after each step."""

    def __init__(self, description: str, total: Optional[int], unit: str, rate_unit: Optional[str]):
        self.description, self.total, self.unit, self.rate_unit = description, total, unit, rate_unit
        self.done, self.amount = 0, 0
        self.t0 = time.perf_counter()
        self.first: Optional[tuple] = None  # (time, done, amount) after the first step: start-up left out of rates

    def advance(self, steps: int = 1, amount: Optional[float] = None) -> None:
        self.done += steps
        self.amount += steps if amount is None else amount
        if self.first is None:
            self.first = (time.perf_counter(), self.done, self.amount)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def rate_text(self) -> str:
        """'1,530 img/s' (items per second after the first step; steps per second without a rate unit)."""
        if self.first is None:
            return ""
        t1, d1, a1 = self.first
        dt = time.perf_counter() - t1
        if self.done > d1 and dt > 0:
            per_s = (self.amount - a1) / dt
        else:
            per_s = self.amount / max(self.elapsed(), 1e-9)
        return f"{_rate(per_s)} {self.rate_unit or self.unit or 'it'}/s"

    def eta(self) -> Optional[float]:
        if self.first is None or self.total is None:
            return None
        t1, d1, _ = self.first
        if self.done <= d1:
            return None
        return (self.total - self.done) * (time.perf_counter() - t1) / (self.done - d1)

    def line(self, final: bool = False) -> str:
        count = f"{self.done:,}" + (f"/{self.total:,}" if self.total is not None else "")
        parts = [count + (f" {self.unit}" if self.unit else "")]
        rate = self.rate_text()
        if rate:
            parts.append(rate)
        if final:
            parts.append(f"done in {clock(self.elapsed())}")
        else:
            eta = self.eta()
            parts.append(f"elapsed {clock(self.elapsed())}" if eta is None else f"eta {clock(eta)}")
        return f"{self.description}: " + ", ".join(parts)


class _Lines(_Meter):
    """Plain lines: one every ``period()`` seconds, and a last one for a step that took longer than that."""

    def __init__(self, *args):
        super().__init__(*args)
        self.period, self.last, self.printed = period(), self.t0, False

    def advance(self, steps: int = 1, amount: Optional[float] = None) -> None:
        super().advance(steps, amount)
        now = time.perf_counter()
        if now - self.last >= self.period and (self.total is None or self.done < self.total):
            self.last, self.printed = now, True
            _line(self.line())

    def close(self) -> None:
        if self.printed or self.elapsed() >= self.period:
            _line(self.line(final=True))


class _Bars(_Meter):
    def __init__(self, prog: Progress, *args):
        super().__init__(*args)
        self.prog = prog
        self.id = prog.add_task(self.description, total=self.total, rate="")

    def advance(self, steps: int = 1, amount: Optional[float] = None) -> None:
        super().advance(steps, amount)
        self.prog.update(self.id, advance=steps, rate=self.rate_text())


class _Off:
    def advance(self, steps: int = 1, amount: Optional[float] = None) -> None:
        pass


@contextmanager
def task(description: str, total: Optional[int] = None, unit: str = "", rate_unit: Optional[str] = None):
    """A progress handle for a loop that counts itself: call ``.advance(steps, amount)`` after each step
    (``amount``: items in it, e.g. images, whose rate is shown as ``rate_unit``/s)."""
    m = _state["mode"]
    if m == LINES:
        meter = _Lines(description, total, unit, rate_unit)
        yield meter
        meter.close()  # not after an error or an interrupt: no "done" line then
    elif m == BARS:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn(unit), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console, transient=True) as prog:
            yield _Bars(prog, description, total, unit, rate_unit)
    else:
        yield _Off()


def track(items: Iterable[T], description: str, total: Optional[int] = None, unit: str = "") -> Iterator[T]:
    """Iterate ``items`` with progress (one step per item)."""
    if _state["mode"] == OFF:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(description, total, unit) as t:
        for item in items:
            yield item
            t.advance()


@contextmanager
def status(message: str):
    """A spinner for a step with no natural count (export, conversion); off a terminal a line when it starts, and
    one when it ends if it took longer than the progress period."""
    m = _state["mode"]
    if m == BARS:
        with console.status(message):
            yield
    elif m == LINES:
        t0 = time.perf_counter()
        _line(message)
        yield
        if time.perf_counter() - t0 >= period():
            _line(f"{message.rstrip(' .…')}: done in {clock(time.perf_counter() - t0)}")
    else:
        yield


def log(message: str) -> None:
    m = _state["mode"]
    if m == BARS:
        console.print(message)
    elif m == LINES:
        from rich.errors import MarkupError
        from rich.text import Text

        try:
            _line(Text.from_markup(message).plain)
        except MarkupError:
            _line(message)
