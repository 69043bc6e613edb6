"""Training throughput and memory of the prune fine-tune by where it runs: 1 vs N processes on the CPU (torchrun,
gloo) and, where torch sees a GPU, the CPU vs one GPU in float32 and with AMP.

    python bench/train_scale.py [--model mobilenetv2] [--input-size 224] [--batch 32] [--steps 6] [--procs 1,2]
                                [--rounds 3] [--json out.json]

Each configuration runs in fresh processes (``python -m torch.distributed.run --standalone --nproc-per-node N
bench/train_scale.py --worker ...``). Every process prunes the untrained model to half its MACs with the prune step
(no fine-tune), then ``edgekit.train.fit`` runs the fine-tune that step runs (its learning rate and alpha) for
``--steps`` optimizer steps per process on seeded noise images made per item (no dataset held in memory). Figures:
images/s of all processes together after the first step (fit's own count, as the progress bar shows it), the
peak RSS of each process (``ru_maxrss``: pruning included), and on CUDA ``torch.cuda.max_memory_allocated``. The
batch is per process, so N processes train N times the images per step. With 1 process the CPU row uses every core
as threads; with N processes each gets cores/N threads. The configurations run in turn ``--rounds`` times, so a
slow spell of a shared machine touches each alike; the table shows the median round (and the range), the JSON every
round with the load average before it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def noise_task(n: int, size: int):
    """A Task of ``n`` seeded noise images (10 classes), made when read."""
    import torch
    from torch.utils.data import Dataset

    from edgekit.data import Task

    class Noise(Dataset):
        def __init__(self, count: int):
            self.count = count

        def __len__(self) -> int:
            return self.count

        def __getitem__(self, i: int):
            return torch.randn(3, size, size, generator=torch.Generator().manual_seed(i)), i % 10

    return Task("noise", 10, 3, size, {"train": Noise(n), "calib": Noise(16), "eval": Noise(16)},
                [str(i) for i in range(10)], source="seeded noise")


def worker(a) -> None:
    """One process of a configuration: prune, fine-tune, write this rank's figures as JSON."""
    import torch

    from edgekit import distributed, zoo
    from edgekit.steps import StepContext, build_step
    from edgekit.steps.common import default_lr
    from edgekit.train import FitConfig, fit, recording, training_device

    device = training_device(a.device)
    world = distributed.init(device.type)
    task = noise_task(a.steps * a.batch * world, a.input_size)  # one epoch: --steps steps per process
    torch.manual_seed(0)
    baseline = zoo.create(a.model, num_classes=10).eval()
    ctx = StepContext(task=task, baseline=baseline, model_name=a.model, device=None, train_device=a.device)
    step = build_step("prune", {"macs": 0.5, "finetune_epochs": 0, "recalibrate": False})
    model = step.apply(copy.deepcopy(baseline), ctx)
    p = step.params
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = FitConfig(epochs=1, lr=p.finetune_lr or default_lr(a.model), seed=1, alpha=p.finetune_alpha,
                    batch_size=a.batch, device=a.device, amp=a.amp)
    with recording() as log:
        fit(model, task, cfg, teacher=baseline if p.finetune_alpha > 0 else None, description="prune fine-tune")
    f = log.fits[0]
    row = {"rank": distributed.rank(), "world_size": world, "device": f["device"], "amp": f["amp"],
           "threads": torch.get_num_threads(), "steps": f["steps"], "images": f["images"],
           "images_per_s": f["images_per_s"], "fit_seconds": f["seconds"],
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "gpu": f.get("gpu"),
           "cuda_max_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
           if device.type == "cuda" else None}
    (Path(a.outdir) / f"rank{row['rank']}.json").write_text(json.dumps(row))
    distributed.shutdown()


def run_config(name: str, procs: int, device: str, amp: bool, a, threads: int) -> dict:
    """One configuration in fresh processes; its rows per rank, summed up."""
    load = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="train-scale-") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               __file__, "--worker", "--outdir", out, "--model", a.model, "--input-size", str(a.input_size),
               "--batch", str(a.batch), "--steps", str(a.steps), "--device", device] + (["--amp"] if amp else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "EDGEKIT_PROGRESS": "off",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        t0 = time.time()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
        if res.returncode != 0:
            return {"config": name, "error": (res.stderr.strip().splitlines() or ["?"])[-1][:300]}
        ranks = sorted((json.loads(p.read_text()) for p in Path(out).glob("rank*.json")), key=lambda r: r["rank"])
    r0 = ranks[0]
    return {"config": name, "processes": procs, "threads_per_process": r0["threads"], "device": r0["device"],
            "gpu": r0["gpu"], "amp": r0["amp"], "steps_per_process": r0["steps"], "global_batch": a.batch * procs,
            "images": r0["images"], "images_per_s": r0["images_per_s"],
            "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
            "cuda_max_allocated_mb": [r["cuda_max_allocated_mb"] for r in ranks] if r0["device"] == "cuda" else None,
            "wall_s": round(time.time() - t0, 1), "load_before": load}


def summarise(runs: list) -> dict:
    """A configuration's rounds: the median round's figures, the range of images/s, every round kept."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    ok.sort(key=lambda r: r["images_per_s"] or 0)
    mid = ok[len(ok) // 2]
    return {**mid, "images_per_s_range": [ok[0]["images_per_s"], ok[-1]["images_per_s"]],
            "peak_rss_mb": [max(x) for x in zip(*(r["peak_rss_mb"] for r in ok))], "rounds": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenetv2")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32, help="per process")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per process (the first is not timed)")
    ap.add_argument("--procs", default="1,2", help="CPU process counts to compare")
    ap.add_argument("--rounds", type=int, default=3, help="runs of every configuration, in turn")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--outdir", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    import torch
    from rich.console import Console
    from rich.table import Table

    from edgekit.hostinfo import machine_info

    cores = _cores()
    configs = [(f"cpu x{n}", n, "cpu", False, max(1, cores // n)) for n in map(int, a.procs.split(","))]
    if torch.cuda.is_available():
        configs += [("cuda fp32", 1, "cuda", False, cores), ("cuda AMP", 1, "cuda", True, cores)]
        gpus = torch.cuda.device_count()
        if gpus > 1:
            configs.append((f"cuda AMP x{gpus}", gpus, "cuda", True, max(1, cores // gpus)))
    console = Console(width=None if sys.stdout.isatty() else 160)  # a log keeps the table whole
    runs: dict = {cfg[0]: [] for cfg in configs}
    for i in range(a.rounds):
        for cfg in configs:
            console.print(f"round {i + 1}/{a.rounds}: {cfg[0]} ...", style="dim")
            runs[cfg[0]].append(run_config(*cfg[:4], a, cfg[4]))
    rows = [summarise(runs[cfg[0]]) for cfg in configs]
    m = machine_info()
    hardware = (f"{m.get('cpu')}, {cores} cores usable; torch {torch.__version__}"
                + (f"; GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "; no CUDA GPU"))
    table = Table(title=f"prune fine-tune of {a.model} (pruned to 50% MACs) at {a.input_size} px, batch {a.batch} per "
                        f"process, {a.steps} steps per process, median of {a.rounds} rounds\n{hardware}",
                  header_style="bold")
    for c in ("config", "processes x threads", "global batch", "images/s", "range", "vs first",
              "peak RSS MB / process", "CUDA max alloc MB"):
        table.add_column(c, justify="left" if c == "config" else "right")
    base = next((r["images_per_s"] for r in rows if r.get("images_per_s")), None)
    for r in rows:
        if "error" in r:
            table.add_row(r["config"], "", "", "failed", "", "", r["error"], "")
            continue
        table.add_row(r["config"], f"{r['processes']} x {r['threads_per_process']}", str(r["global_batch"]),
                      f"{r['images_per_s']:.1f}", "-".join(f"{x:.1f}" for x in r["images_per_s_range"]),
                      f"{r['images_per_s'] / base:.2f}x" if base else "-",
                      ", ".join(f"{x:.0f}" for x in r["peak_rss_mb"]),
                      ", ".join(f"{x:.0f}" for x in r["cuda_max_allocated_mb"]) if r["cuda_max_allocated_mb"] else "-")
    console.print(table)
    doc = {"hardware": hardware, "model": a.model, "input_size": a.input_size, "batch_per_process": a.batch,
           "steps_per_process": a.steps, "rounds": a.rounds, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if a.json:  # first: a closed pipe on stdout must not lose the file
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
