"""Training step time in NCHW vs channels_last for every zoo model, timed side by side.

    python bench/train_speed.py [--models a,b] [--input-size 32] [--batch 64] [--threads 1] [--steps 6]

Each model (untrained, seed 0) takes AdamW steps on a random batch, alternating the two layouts step by step so
a slow spell of the machine touches both alike; the figure is the median step after one warm-up step each.
``edgekit.train.fit`` trains conv nets in channels_last because of this table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from edgekit import zoo


def _stepper(name: str, layout, size: int, batch: int):
    torch.manual_seed(0)
    model = zoo.create(name, num_classes=10).train().to(memory_format=layout)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> float:
        t = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated zoo names (default: every zoo model)")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per layout")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    names = a.models.split(",") if a.models else [s.name for s in zoo.list_models()]
    table = Table(title=f"train step, batch {a.batch} at {a.input_size}x{a.input_size}, {a.threads} thread(s): "
                        "median ms")
    for col in ("model", "NCHW", "channels_last", "speedup"):
        table.add_column(col, justify="left" if col == "model" else "right")
    ratios = []
    console = Console()
    for name in names:
        steps = {lay: _stepper(name, lay, a.input_size, a.batch) for lay in (torch.contiguous_format,
                                                                            torch.channels_last)}
        for s in steps.values():
            s()  # warm-up: allocations, oneDNN primitive creation
        times = {lay: [] for lay in steps}
        for _ in range(a.steps):
            for lay, s in steps.items():
                times[lay].append(s())
        nchw, cl = (statistics.median(times[lay]) for lay in steps)
        ratios.append(nchw / cl)
        table.add_row(name, f"{1e3 * nchw:.0f}", f"{1e3 * cl:.0f}", f"{nchw / cl:.2f}x")
        console.print(f"{name}: {nchw / cl:.2f}x", style="dim")
    console.print(table)
    console.print(f"channels_last speedup: median {statistics.median(ratios):.2f}x, range "
                  f"{min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} models")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
