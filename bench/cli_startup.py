"""CLI start-up: `edgekit --help`, the list commands and name errors answer in under 2 s (no torch import).

    python bench/cli_startup.py [--repeat 5]

Each command runs as a fresh process, best and median of the repeats; the goal is a median under 2 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

COMMANDS = {
    "edgekit --help": ["--help"],
    "edgekit zoo list": ["zoo", "list"],
    "edgekit recipes list": ["recipes", "list"],
    "edgekit devices list": ["devices", "list"],
    "compress shufflenetv3 (unknown model)": ["compress", "shufflenetv3"],
    "compress --recipe int9 (unknown recipe)": ["compress", "shufflenetv2", "--recipe", "int9"],
    "compress --device raspberrypi (unknown device)": ["compress", "shufflenetv2", "--device", "raspberrypi"],
}
GOAL_S = 2.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    table = Table(title=f"CLI start-up, {args.repeat} fresh processes each (goal: median < {GOAL_S:.0f} s)")
    for c in ("command", "exit", "best s", "median s", "goal"):
        table.add_column(c)
    ok = True
    for label, argv in COMMANDS.items():
        times, code = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "edgekit", *argv], capture_output=True)
            times.append(time.perf_counter() - t0)
            code = proc.returncode
        med = statistics.median(times)
        ok &= med < GOAL_S
        table.add_row(label, str(code), f"{min(times):.2f}", f"{med:.2f}", "✅" if med < GOAL_S else "❌")
    Console(width=120).print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
