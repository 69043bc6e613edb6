"""One fit / fine-tune loop, used for the baseline, distillation and fine-tuning after pruning.

It trains where the hardware is: on a CUDA GPU when torch sees one (float16 autocast with a GradScaler, channels_last),
else on the CPU; ``FitConfig.device`` forces either. Under torchrun it trains with DistributedDataParallel (see
:mod:`edgekit.distributed`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import Task
from .data.tasks import read
from .errors import EdgekitError
from . import progress

DEVICES = ("auto", "cpu", "cuda")


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
    # Where to train (--device-train): "auto" is CUDA when torch sees a GPU, else the CPU. The model comes back on
    # the CPU either way.
    device: str = "auto"
    # Automatic mixed precision (float16 autocast + GradScaler); None: on for CUDA. The CPU trains in float32.
    amp: Optional[bool] = None


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                    reduction="batchmean") * t * t


def training_device(name: str = "auto") -> torch.device:
    """The device ``fit`` trains on for ``--device-train NAME``; under torchrun each process takes the GPU of its
    LOCAL_RANK. ``cuda`` where torch sees no GPU is the user's mistake, said in one line."""
    if name not in DEVICES:
        raise EdgekitError(f"--device-train must be one of {', '.join(DEVICES)}, not {name!r}")
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        why = "this torch build has no CUDA" if torch.version.cuda is None else "torch.cuda.is_available() is False"
        raise EdgekitError(f"--device-train cuda: torch {torch.__version__} sees no CUDA GPU here ({why}); "
                           "use --device-train cpu or auto")
    if name == "cpu" or not cuda:
        return torch.device("cpu")
    from . import distributed

    index = distributed.env_local_rank() if distributed.launched() else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise EdgekitError(f"LOCAL_RANK {index}, but this node has {torch.cuda.device_count()} GPU(s): start at "
                           "most that many processes per node (torchrun --nproc-per-node)")
    return torch.device("cuda", index)


class TrainingLog:
    """The facts of every ``fit`` inside :func:`recording`; ``summary()`` is report.json's ``training``."""

    def __init__(self):
        self.fits: List[dict] = []

    def summary(self) -> Optional[dict]:
        """None when nothing trained (a cached baseline and no training step)."""
        if not self.fits:
            return None

        def one(key):
            values = list(dict.fromkeys(f[key] for f in self.fits))
            return values[0] if len(values) == 1 else values

        out = {"device": one("device"), "world_size": one("world_size"), "backend": one("backend"),
               "amp": one("amp"), "seconds": round(sum(f["seconds"] for f in self.fits), 1)}
        gpus = [f["gpu"] for f in self.fits if f.get("gpu")]
        if gpus:
            out["gpu"] = gpus[0]
        out["fits"] = [{k: f[k] for k in ("description", "steps", "images", "images_per_s", "seconds")}
                       for f in self.fits]
        return out


_logs: List[TrainingLog] = []


@contextlib.contextmanager
def recording() -> Iterator[TrainingLog]:
    """Collect what each ``fit`` in this block trained on, for the report."""
    log = TrainingLog()
    _logs.append(log)
    try:
        yield log
    finally:
        _logs.remove(log)


def _train_loader(task: Task, cfg: FitConfig, world: int, rank: int, pin: bool):
    """One process: the task's shuffled loader, as always. Several: each rank's share of every epoch
    (DistributedSampler, the same seed everywhere, ``drop_last`` so every rank takes as many steps)."""
    if world == 1:
        return task.loader("train", batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed), None
    from torch.utils.data import DataLoader, DistributedSampler

    ds = task.splits["train"]
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, pin_memory=pin,
                      num_workers=task.workers if len(ds) else 0), sampler


class _NoBar:
    def advance(self, steps: int = 1, amount: Optional[float] = None) -> None:
        pass


def fit(model: nn.Module, task: Task, cfg: FitConfig, teacher: Optional[nn.Module] = None,
        description: str = "train", extra_loss: Optional[Callable[[nn.Module], torch.Tensor]] = None) -> nn.Module:
    """Train ``model`` in place with AdamW + one-cycle LR; returns it on the CPU, in eval mode.

    With a ``teacher`` and ``cfg.alpha > 0`` the loss mixes soft targets from the
    teacher with the labels. Fractional epochs are allowed (short fine-tunes).

    Under torchrun (several processes) the model, already pruned by the caller and the same on every rank, is
    wrapped in DistributedDataParallel. ``cfg.batch_size`` is per process (as in torchrun's examples): the global
    batch is ``batch_size * world`` and an epoch takes ``1/world`` as many optimizer steps, the same on every rank;
    the learning rate is not scaled. BatchNorm becomes SyncBatchNorm on CUDA only: torch's SyncBatchNorm refuses
    CPU tensors ("expected input tensor to be on GPU"), so on CPU (gloo) each rank normalises its own batch and
    the statistics are re-estimated on rank 0 at the end and copied to every rank.
    """
    from . import distributed

    device = training_device(cfg.device)
    world = distributed.init(device.type)  # 1 unless torchrun started several processes
    rank = distributed.rank()
    amp = device.type == "cuda" if cfg.amp is None else cfg.amp
    if amp and device.type != "cuda":
        raise EdgekitError("mixed precision (amp) needs CUDA; the CPU trains in float32")
    seed_everything(cfg.seed + rank)  # augmentation and dropout differ between ranks; one process: as before
    loader, sampler = _train_loader(task, cfg, world, rank, pin=device.type == "cuda")
    if len(loader) == 0:
        raise EdgekitError(f"the training split has {task.size('train')} images: too few to train "
                           + (f"{world} processes on" if world > 1 else "on"))
    steps = max(1, int(math.ceil(cfg.epochs * len(loader))))
    nets = [m for m in (model, teacher) if m is not None]
    layout = torch.channels_last if cfg.channels_last and _has_conv2d(model) else torch.contiguous_format
    if world > 1:
        distributed.check_same_model(model)
    t0 = time.perf_counter()
    swapped: list = []
    try:
        for m in nets:  # before the optimizer: it keeps its state in the parameters' layout and device
            m.to(device, memory_format=layout)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        net = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            swapped = sync_batchnorm(model) if device.type == "cuda" else []
            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if teacher is not None:
            teacher.eval()
        model.train()

        def batches():  # streamed: DataLoader workers decode files while the model trains
            epoch = 0
            while True:
                if sampler is not None:
                    sampler.set_epoch(epoch)  # another order each epoch, the same on every rank
                yield from read(loader)
                epoch += 1

        it = batches()
        where = [device.type] * (device.type != "cpu") + ["AMP"] * amp + [f"{world} processes"] * (world > 1)
        label = f"{description} ({', '.join(where)})" if where else description
        autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if amp else contextlib.nullcontext
        seen, first = 0, None  # images this rank trained on; (time, images) after the first step
        with (progress.task(label, total=steps, unit="batches", rate_unit="img") if rank == 0  # one bar: rank 0's
              else contextlib.nullcontext(_NoBar())) as bar:
            for _ in range(steps):  # the bar advances per batch, with images/s of all ranks together
                x, y = next(it)
                if task.augment is not None:
                    x = task.augment(x)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if x.dim() == 4:
                    x = x.contiguous(memory_format=layout)
                with autocast():
                    logits = net(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                    if teacher is not None and cfg.alpha > 0:
                        with torch.no_grad():
                            t_logits = teacher(x)
                        loss = cfg.alpha * kd_loss(logits, t_logits, cfg.temperature) + (1 - cfg.alpha) * loss
                    if extra_loss is not None:
                        loss = loss + extra_loss(model)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                _schedule_step(sched, quiet=amp)
                seen += len(y)
                bar.advance(1, len(y) * world)  # every rank's batch has this size (drop_last in the sampler)
                if first is None:
                    first = (time.perf_counter(), seen)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rate = (seen - first[1]) * world / (time.perf_counter() - first[0]) if steps > 1 else None
        restore_batchnorm(swapped)
        swapped = []
        for m in nets:
            m.to(memory_format=torch.contiguous_format)
        recalibrate_bn(model, task, seed=cfg.seed)  # on the training device; rank 0's statistics on every rank
    finally:  # also on an interrupt: the caller's model never stays in the training layout or on the GPU
        restore_batchnorm(swapped)
        for m in nets:
            m.to("cpu", memory_format=torch.contiguous_format)
    for log in _logs:
        log.fits.append({"description": description, "device": device.type, "world_size": world,
                         "backend": distributed.backend(), "amp": amp, "steps": steps,
                         "images": seen * world, "seconds": round(time.perf_counter() - t0, 2),
                         "images_per_s": None if rate is None else round(rate, 1),
                         **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {})})
    return model.eval()


_SHARED = ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
           "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def _sync_class(module: nn.Module):
    """The synchronised counterpart of a BatchNorm class, or None: torch's for plain BatchNorm, timm's
    SyncBatchNormAct for its BatchNormAct2d (which applies an activation after normalising)."""
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return nn.SyncBatchNorm
    if type(module).__name__ == "BatchNormAct2d":
        from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct

        return SyncBatchNormAct if type(module) is BatchNormAct2d else None
    return None


def _schedule_step(sched, quiet: bool) -> None:
    """The scheduler's step; with AMP without torch's warning that it came before the optimizer's: GradScaler skips
    the optimizer step of a batch whose float16 gradients overflowed (often the first), and the schedule goes on."""
    if not quiet:
        sched.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        sched.step()


def sync_batchnorm(model: nn.Module) -> list:
    """Swap the BatchNorm layers of ``model`` for SyncBatchNorm ones sharing their parameters, buffers, children
    and hooks (distillation's feature taps hook every layer); returns what :func:`restore_batchnorm` needs to put
    the originals back. Other BatchNorm subclasses keep per-rank statistics."""
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            cls = _sync_class(child)
            if cls is None:
                continue
            sync = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            for attr in _SHARED:  # the same dicts: the same tensors and hooks, not copies
                if hasattr(child, attr):
                    setattr(sync, attr, getattr(child, attr))
            sync.train(child.training)
            setattr(parent, name, sync)
            swaps.append((parent, name, child, sync))
    return swaps


def restore_batchnorm(swaps: list) -> None:
    for parent, name, original, sync in swaps:
        for attr in _SHARED:  # a move to another device replaced the tensors in the shared dicts: the same ones
            if hasattr(sync, attr):
                setattr(original, attr, getattr(sync, attr))
        original.train(sync.training)
        setattr(parent, name, original)


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
    eval-mode accuracy collapse while train-mode accuracy is fine. The batches
    run on the model's device. Under torchrun rank 0 estimates them and every
    rank receives its buffers, so all ranks hold the same statistics.
    """
    from . import distributed

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model.eval()
    if distributed.world_size() > 1 and not distributed.is_main():
        distributed.broadcast_state(model, params=False)
        return model.eval()
    device = next(iter([*model.parameters(), *model.buffers()])).device
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for i, (x, _) in enumerate(read(task.loader("train", batch_size=batch_size, shuffle=True, seed=seed + 1))):
        if i >= num_batches:
            break
        model(x.to(device))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    distributed.broadcast_state(model, params=False)  # one process: nothing
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, task: Task, split: str = "eval", batch_size: int = 128) -> np.ndarray:
    """Logits of a torch model over a split, streamed: only the logits are kept."""
    model.eval()
    outs = [model(torch.from_numpy(x)).numpy() for x, _ in task.batches(split, batch_size=batch_size)]
    return np.concatenate(outs)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()
