"""Training a detector: the model's own loss (``model.loss(x, targets)``), AdamW with one-cycle LR, as
:func:`edgekit.train.fit` trains a classifier (same :class:`~edgekit.train.FitConfig`, same device choice).

With a teacher (the unpruned baseline) the loss adds mimicking of the teacher's raw prediction maps, the outputs
of ``output_layers()`` before any decoding (Li et al., "Mimicking Very Efficient Network for Object Detection",
CVPR 2017, mimic features; here the head's maps, which a pruned student keeps at the teacher's shape):
``(1 - alpha) * detection loss + alpha * sum_maps MSE(student, teacher) / mean(teacher^2)``."""

from __future__ import annotations

import math
import time
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import progress
from ..data.tasks import read
from ..errors import EdgekitError
from ..train import FitConfig, recalibrate_bn, seed_everything, training_device


def _to(targets: List[Dict[str, torch.Tensor]], device: torch.device) -> List[Dict[str, torch.Tensor]]:
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


class _MapTaps:
    """The raw maps of a detector's prediction convs, kept from its last forward pass."""

    def __init__(self, model: nn.Module):
        layers = model.output_layers()
        self.maps: List[Optional[torch.Tensor]] = [None] * len(layers)
        self._hooks = [m.register_forward_hook(self._keeper(i)) for i, m in enumerate(layers)]

    def _keeper(self, i: int):
        def keep(mod, args, out):
            self.maps[i] = out
        return keep

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def mimic_loss(student: List[torch.Tensor], teacher: List[torch.Tensor]) -> torch.Tensor:
    """Sum over the maps of MSE(student, teacher) relative to the teacher map's mean square."""
    if len(student) != len(teacher) or any(s is None or t is None or s.shape != t.shape
                                          for s, t in zip(student, teacher)):
        raise EdgekitError("distill: the student's prediction maps do not match the teacher's (a head output "
                           "was pruned, or the teacher is another model)")
    return sum(torch.mean((s - t) ** 2) / (t.pow(2).mean() + 1e-8) for s, t in zip(student, teacher))


def fit_detector(model: nn.Module, task, cfg: FitConfig, description: str = "train detector",
                 teacher: Optional[nn.Module] = None) -> Dict[str, float]:
    """Train ``model`` in place on ``task``'s train split; it comes back on the CPU in eval mode. Returns the
    steps, images, seconds and the mean loss of the first and last tenth of the steps (a run whose loss did not
    fall is visible in the report); with a ``teacher`` and ``cfg.alpha > 0`` also the mimic term's."""
    if not callable(getattr(model, "loss", None)):
        raise EdgekitError(f"{type(model).__name__} has no loss(x, targets): edgekit trains its own detectors only")
    if teacher is not None and cfg.alpha <= 0:
        teacher = None
    if teacher is not None and not (callable(getattr(model, "output_layers", None))
                                    and callable(getattr(teacher, "output_layers", None))):
        raise EdgekitError("distill: detectors are distilled through their prediction maps (output_layers())")
    device = training_device(cfg.device)
    seed_everything(cfg.seed)
    loader = task.loader("train", batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed)
    if len(loader) == 0:
        raise EdgekitError(f"the training split has {task.size('train')} images: too few to train on")
    steps = max(1, int(math.ceil(cfg.epochs * len(loader))))
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    losses: List[float] = []
    mimics: List[float] = []
    t0, seen = time.perf_counter(), 0
    taps = (_MapTaps(model), _MapTaps(teacher)) if teacher is not None else None
    try:
        model.to(device, memory_format=layout)
        if teacher is not None:
            teacher.to(device, memory_format=layout).eval()
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
                if taps is not None:
                    with torch.no_grad():
                        teacher(x)
                    mimic = mimic_loss(taps[0].maps, taps[1].maps)
                    mimics.append(mimic.item())
                    loss = (1 - cfg.alpha) * loss + cfg.alpha * mimic
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
        # short fine-tunes leave the running BN statistics behind the weights (YOLOX's momentum is 0.03)
        recalibrate_bn(model, task, seed=cfg.seed)
    finally:
        model.to("cpu", memory_format=torch.contiguous_format)
        if taps is not None:
            for t in taps:
                t.remove()
            teacher.to("cpu", memory_format=torch.contiguous_format)
    model.eval()
    tenth = max(1, len(losses) // 10)
    out = {"steps": steps, "images": seen, "seconds": round(time.perf_counter() - t0, 1),
           "loss_first": round(sum(losses[:tenth]) / tenth, 4), "loss_last": round(sum(losses[-tenth:]) / tenth, 4),
           "device": device.type}
    if mimics:
        out.update(mimic_first=round(sum(mimics[:tenth]) / tenth, 4), mimic_last=round(sum(mimics[-tenth:]) / tenth, 4),
                   alpha=cfg.alpha)
    return out
