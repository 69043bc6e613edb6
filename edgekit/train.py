"""One fit / fine-tune loop, used for the baseline, distillation and fine-tuning after pruning."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import Task
from .data.tasks import read
from . import progress


@dataclass
class FitConfig:
    epochs: float = 4
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    seed: int = 0
    # Knowledge distillation (Hinton et al. 2015): loss = a*T^2*KL(s/T || t/T) + (1-a)*CE
    temperature: float = 4.0
    alpha: float = 0.0
    # Train conv nets in channels_last (NHWC) memory: oneDNN's NHWC kernels take 1.1-2.7x less time per step
    # (median 1.7x) than NCHW on CPU for every zoo model, depthwise/grouped nets the most (bench/train_speed.py).
    # The model is handed back in the default layout, so export and pruning see what they always saw.
    channels_last: bool = True


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                    reduction="batchmean") * t * t


def fit(model: nn.Module, task: Task, cfg: FitConfig, teacher: Optional[nn.Module] = None,
        description: str = "train", extra_loss: Optional[Callable[[nn.Module], torch.Tensor]] = None) -> nn.Module:
    """Train ``model`` in place with AdamW + one-cycle LR; returns it in eval mode.

    With a ``teacher`` and ``cfg.alpha > 0`` the loss mixes soft targets from the
    teacher with the labels. Fractional epochs are allowed (short fine-tunes).
    """
    seed_everything(cfg.seed)
    loader = task.loader("train", batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed)
    steps = max(1, int(math.ceil(cfg.epochs * len(loader))))
    nets = [m for m in (model, teacher) if m is not None]
    layout = torch.channels_last if cfg.channels_last and _has_conv2d(model) else torch.contiguous_format
    for m in nets:  # before the optimizer: it keeps its state in the parameters' layout
        m.to(memory_format=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    if teacher is not None:
        teacher.eval()
    model.train()

    def batches():  # streamed: DataLoader workers decode files while the model trains
        while True:
            yield from read(loader)

    try:
        it = batches()
        with progress.task(description, total=steps, unit="batches", rate_unit="img") as bar:
            for _ in range(steps):  # the bar advances per batch, with images/s
                x, y = next(it)
                if task.augment is not None:
                    x = task.augment(x)
                if x.dim() == 4:
                    x = x.contiguous(memory_format=layout)
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                if teacher is not None and cfg.alpha > 0:
                    with torch.no_grad():
                        t_logits = teacher(x)
                    loss = cfg.alpha * kd_loss(logits, t_logits, cfg.temperature) + (1 - cfg.alpha) * loss
                if extra_loss is not None:
                    loss = loss + extra_loss(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.advance(1, len(y))
    finally:  # also on an interrupt: the caller's model never stays in the training layout
        for m in nets:
            m.to(memory_format=torch.contiguous_format)
    return recalibrate_bn(model, task, seed=cfg.seed)


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def set_stochastic_depth(model: nn.Module, p: float) -> int:
    """Set the drop probability of every stochastic-depth / drop-path module; returns how many there were.

    ImageNet recipes drop whole residual branches (torchvision EfficientNet-B0: 0.2). In a very short run
    (2 epochs at 32 px) that noise keeps EfficientNet-B0 near 0.45 top-1 where 0.0 reaches 0.6; at edgekit's
    default 4 epochs it is worth keeping: it also makes the net robust to int8 noise (bench/int8_speed.py).
    The modules are the identity at inference, so the exported graph is the same.
    """
    n = 0
    for m in model.modules():
        if type(m).__name__ == "StochasticDepth" and hasattr(m, "p"):  # torchvision.ops
            m.p, n = p, n + 1
        elif type(m).__name__ == "DropPath" and hasattr(m, "drop_prob"):  # timm
            m.drop_prob, n = p, n + 1
    return n


@torch.no_grad()
def recalibrate_bn(model: nn.Module, task: Task, num_batches: int = 16, batch_size: int = 64,
                   seed: int = 0) -> nn.Module:
    """Re-estimate BatchNorm running statistics as exact averages over training batches.

    Short schedules leave running stats behind the weights (torchvision's
    MobileNetV3 uses momentum 0.01), and pruning invalidates them; both make
    eval-mode accuracy collapse while train-mode accuracy is fine.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model.eval()
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for i, (x, _) in enumerate(read(task.loader("train", batch_size=batch_size, shuffle=True, seed=seed + 1))):
        if i >= num_batches:
            break
        model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, task: Task, split: str = "eval", batch_size: int = 128) -> np.ndarray:
    """Logits of a torch model over a split, streamed: only the logits are kept."""
    model.eval()
    outs = [model(torch.from_numpy(x)).numpy() for x, _ in task.batches(split, batch_size=batch_size)]
    return np.concatenate(outs)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()
