"""Errors a user can cause. The CLI turns them into one line on stderr and exit code 2."""

from __future__ import annotations

import difflib
import math
from typing import Any, Iterable


class EdgekitError(Exception):
    """A problem with the user's input or environment, explained in one message."""

    exit_code = 2


class DeviceUnreachable(EdgekitError):
    """A device that does not answer (connection refused or timed out, no route, a command that never returned):
    a sweep marks its board down and measures elsewhere, where another error would fail the measurement."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' Did you mean: a, b?' when close names exist, else ''."""
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=3, cutoff=0.5)
    lookup = {c.lower(): c for c in choices}
    return f" Did you mean: {', '.join(lookup[c] for c in close)}?" if close else ""


def show_value(x: Any) -> str:
    """The offending value as the user wrote it, for messages: inf, nan, 1e+11, '1e11' (a YAML string)."""
    if isinstance(x, float) and (not math.isfinite(x) or abs(x) >= 1e6):
        return f"{x:.6g}"
    return repr(x) if isinstance(x, str) else str(x)


def first_line(exc: BaseException) -> str:
    """An unexpected exception as one line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {(text.splitlines()[0] if text else '')[:300]}".rstrip(": ")
