"""The edgekit command line: thin wrappers over the library, rich tables for results.

Errors a user can cause end in one line on stderr and exit code 2.

One module per command group (``run``, ``sweep``, ``catalog``, ``ship``), the shared app and error handling in ``base``, result
tables in ``tables``; importing this package registers every command on ``app``.
"""

from __future__ import annotations

from . import run, sweep, catalog, ship  # noqa: F401  (registration order is the help's order)
from .base import app, err, handle_errors, out  # noqa: F401
from .tables import fit_table, results_table, show_benchmark, show_report  # noqa: F401


def main() -> None:
    app()
