"""Training a detector: the model's own loss (``model.loss(x, targets)``), AdamW with one-cycle LR, as
:func:`edgekit.train.fit` trains a classifier (same :class:`~edgekit.train.FitConfig`, same device choice)."""

from __future__ import annotations

import math
import time
from typing import Dict, List

import torch
from torch import nn

from .. import progress
from ..data.tasks import read
from ..errors import EdgekitError
from ..train import FitConfig, seed_everything, training_device


def _to(targets: List[Dict[str, torch.Tensor]], device: torch.device) -> List[Dict[str, torch.Tensor]]:
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


def fit_detector(model: nn.Module, task, cfg: FitConfig, description: str = "train detector") -> Dict[str, float]:
    """Train ``model`` in place on ``task``'s train split; it comes back on the CPU in eval mode. Returns the
    steps, images, seconds and the mean loss of the first and last tenth of the steps (a run whose loss did not
    fall is visible in the report)."""
    if not callable(getattr(model, "loss", None)):
        raise EdgekitError(f"{type(model).__name__} has no loss(x, targets): edgekit trains its own detectors only")
    device = training_device(cfg.device)
    seed_everything(cfg.seed)
    loader = task.loader("train", batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed)
    if len(loader) == 0:
        raise EdgekitError(f"the training split has {task.size('train')} images: too few to train on")
    steps = max(1, int(math.ceil(cfg.epochs * len(loader))))
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    losses: List[float] = []
    t0, seen = time.perf_counter(), 0
    try:
        model.to(device, memory_format=layout)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
        model.train()

        def batches():
            while True:
                yield from read(loader)

        it = batches()
        with progress.task(f"{description} ({device.type})", total=steps, unit="batches", rate_unit="img") as bar:
            for _ in range(steps):
                x, targets = next(it)
                x = x.to(device).contiguous(memory_format=layout)
                loss = model.loss(x, _to(targets, device))["loss"]
                if not torch.isfinite(loss):
                    raise EdgekitError(f"{description}: the loss became {float(loss)} at step {len(losses) + 1} "
                                       f"(learning rate {cfg.lr:g} too high?)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                opt.step()
                sched.step()
                losses.append(loss.item())
                seen += len(x)
                bar.advance(1, len(x))
    finally:
        model.to("cpu", memory_format=torch.contiguous_format)
    tenth = max(1, len(losses) // 10)
    return {"steps": steps, "images": seen, "seconds": round(time.perf_counter() - t0, 1),
            "loss_first": round(sum(losses[:tenth]) / tenth, 4), "loss_last": round(sum(losses[-tenth:]) / tenth, 4),
            "device": device.type}
