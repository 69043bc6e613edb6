"""Stage 1, the baseline: the fp32 model every variant is compared with (trained and cached, pretrained, or the
user's weights)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import zoo
from ..cache import cache_dir
from ..config import Recipe
from ..data import Task
from ..fsutil import atomic_write_bytes
from ..train import FitConfig, fit, set_stochastic_depth

TRAIN_VERSION = 1  # bump when the baseline training recipe changes, to invalidate caches
DETECT_TRAIN_VERSION = 2  # the same for detectors alone (2: BatchNorm statistics recalibrated after training)


def baseline_fit_config(spec: zoo.ModelSpec, recipe: Optional[Recipe], seed: int,
                        train_device: str = "auto") -> FitConfig:
    tr = recipe.train if recipe is not None else None
    lr = (tr.lr if tr is not None and tr.lr else None) or spec.train.get("lr", 1e-2)
    # an entry's own epochs and batch (detectors: more, smaller steps) unless the recipe names its own
    given = tr.model_fields_set if tr is not None else set()
    epochs = tr.epochs if "epochs" in given else spec.train.get("epochs", tr.epochs if tr else 4)
    batch = tr.batch_size if "batch_size" in given else int(spec.train.get("batch_size", tr.batch_size if tr else 64))
    return FitConfig(epochs=float(epochs), lr=lr, batch_size=batch, seed=seed, device=train_device)


def _cache_key_fit(cfg: FitConfig, world: int) -> dict:
    """The training recipe as the cache key sees it: where it ran (device, AMP) is left out, as the CPU's thread
    count is, so a baseline trained on a GPU serves CPU runs; several processes train with a larger global batch
    and fewer steps, which is another recipe."""
    key = {k: v for k, v in vars(cfg).items() if k not in ("device", "amp")}
    return {**key, "world_size": world} if world > 1 else key


def get_baseline(model_name: str, task: Task, weights: Optional[str] = None, recipe: Optional[Recipe] = None,
                 seed: int = 0, use_cache: bool = True, train_device: str = "auto") -> tuple[nn.Module, dict]:
    """The fp32 model every variant is compared with, and how it was obtained.

    ``weights``: None trains on the task (cached per model/task/config), ``"pretrained"``
    loads ImageNet weights (fine-tuning the new head when the task has other classes),
    any other value is a state-dict file for exactly this task's head. ``train_device``: auto, cpu or cuda.

    Under torchrun every rank trains; rank 0 alone reads and writes the cache, and a cached baseline reaches the
    other ranks from rank 0 (their nodes need no copy of the cache).
    """
    from .. import distributed
    from ..train import training_device

    spec = zoo.get_spec(model_name)
    cfg = baseline_fit_config(spec, recipe, seed, train_device)
    world = distributed.init(training_device(train_device).type)  # 1 unless torchrun started several processes
    classes = task.num_classes or spec.num_classes  # an unlabelled task keeps the model's own head
    detector = spec.task == "detection"
    size = {"input_size": task.input_size} if detector else {}  # a detector's default boxes follow its input
    if weights not in (None, "pretrained"):
        model = zoo.create(spec.name, num_classes=classes, in_chans=task.in_chans, weights=weights, **size)
        return model, {"source": "file", "path": str(Path(weights).resolve())}
    if weights == "pretrained":
        model = zoo.create(spec.name, num_classes=classes, in_chans=task.in_chans, pretrained=True, **size)
        if classes == spec.num_classes:
            return model, {"source": "pretrained"}
    else:
        model = None
    torch.manual_seed(seed)  # fresh weights must not depend on what ran before in this process
    stochastic_depth = recipe.train.stochastic_depth if recipe is not None else None
    key = json.dumps({"model": spec.name, "task": task.describe(), "fit": _cache_key_fit(cfg, world),
                      "pretrained": model is not None, "v": TRAIN_VERSION, "torch": torch.__version__.split("+")[0],
                      **({"code": spec.notes} if spec.source == "python" else {}),  # the user's file, by hash
                      **({"stochastic_depth": stochastic_depth} if stochastic_depth is not None else {}),
                      **({"detect_v": DETECT_TRAIN_VERSION} if detector else {})},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    slug = re.sub(r"[^\w.-]+", "_", f"{spec.name}-{task.name}")
    path = cache_dir() / "baselines" / f"{slug}-{digest}.pt"
    info = {"source": "pretrained+finetuned" if model is not None else "trained", "cache": str(path),
            "epochs": cfg.epochs, "lr": cfg.lr, "seed": seed}
    if model is None:
        model = zoo.create(spec.name, num_classes=task.num_classes, in_chans=task.in_chans, **size)
    cached = False
    if use_cache and distributed.is_main() and path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            cached = True
        except Exception:  # a stale or corrupt cache entry is retrained, never fatal
            path.unlink(missing_ok=True)
    if distributed.broadcast_object(cached):  # rank 0 decides for every rank: all train, or none does
        distributed.broadcast_state(model)
        return model.eval(), {**info, "cached": True}
    if stochastic_depth is not None:
        info["stochastic_depth"] = set_stochastic_depth(model, stochastic_depth)
    t0 = time.time()
    if detector:
        from ..detect.train import fit_detector

        info["fit"] = fit_detector(model, task, cfg, description=f"train {spec.name}")
    else:
        fit(model, task, cfg, description=f"train {spec.name}")
    info["train_seconds"] = round(time.time() - t0, 1)
    if use_cache and distributed.is_main():
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        atomic_write_bytes(path, buf.getvalue())  # a unique temp name: caches shared by containers (all PID 1)
    return model.eval(), {**info, "cached": False}
