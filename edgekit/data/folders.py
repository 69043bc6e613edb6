"""The user's image folders: class folders (labelled, top-1 accuracy) or loose images (unlabelled, agreement).

Layouts, decided by :func:`data_layout`:

- ``classes``: ``DIR/<class>/*.jpg`` (ImageNet-val layout). A fixed shuffle; the first ``num_calib`` calibrate
  (at most a quarter), then half of the rest evaluates and the other half trains. The three never share a file,
  so a fine-tuned accuracy is measured on images the model did not see.
- ``train-val``: ``DIR/train/<class>`` and ``DIR/val/<class>``. ``val`` evaluates; ``train`` is split into a
  calibration share and a training share, disjoint.
- ``images``: image files directly in ``DIR``, no class folders. Unlabelled: the model keeps its own head and
  variants are judged by agreement with fp32; a calibration share and an evaluation share, disjoint.

A tree with one class is refused: a top-1 accuracy on one class says nothing about a classifier.
Every file of every split is decoded once at load, so a bad file stops a run before any training.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset

from ..errors import EdgekitError
from ..progress import track
from .preprocess import Preprocess, resolve
from .tasks import TASKS, Task, _cpus, data_workers

IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
UNLABELLED = -1  # the label of an image without one


class ImageFiles(Dataset):
    """(path, label) pairs decoded lazily and prepared by a :class:`Preprocess` (the model's eval transform)."""

    def __init__(self, items: List[Tuple[Path, int]], preprocess: Preprocess):
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self.items], dtype=np.int64)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                x = self.preprocess(im)
        except Exception as exc:  # a file changed after the check at task load: named, not a PIL traceback
            raise EdgekitError(f"Cannot read image {path}: {_reason(exc)}") from None
        return x, label


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


def _images(d: Path) -> List[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXT)


def _scan(root: Path, classes: List[str]) -> List[Tuple[Path, int]]:
    items = []
    for label, cls in enumerate(classes):
        d = root / cls
        if d.is_dir():
            items += [(p, label) for p in sorted(d.rglob("*")) if p.suffix.lower() in IMG_EXT]
    return items


def data_layout(data: str | Path) -> str:
    """``classes``, ``train-val`` or ``images`` (see the module's docstring): what ``--data DIR`` holds.

    Class sub-folders win over loose images beside them (an ImageNet-val tree with a stray file stays labelled).
    """
    root = Path(data)
    if not root.is_dir():
        raise EdgekitError(f"Data folder not found: {root}")
    if (root / "train").is_dir() and (root / "val").is_dir():
        return "train-val"
    if any(p.is_dir() for p in root.iterdir()):
        return "classes"
    if _images(root):
        return "images"
    raise EdgekitError(f"{root} has no class sub-folders and no images (expected {root}/<class>/<image>.jpg for "
                       f"top-1 accuracy, or {root}/<image>.jpg for agreement with fp32 without labels)")


def class_count(data: str | Path) -> int:
    """The number of class folders of a labelled tree (of ``val`` in the train/val layout), 0 for loose images."""
    root = Path(data)
    layout = data_layout(root)
    if layout == "images":
        return 0
    tree = root / "val" if layout == "train-val" else root
    return sum(1 for p in tree.iterdir() if p.is_dir())


def _split(items: list, n_calib: int, rng: np.random.Generator) -> Tuple[list, list]:
    order = rng.permutation(len(items))
    shuffled = [items[i] for i in order]
    return shuffled[:n_calib], shuffled[n_calib:]


def _calib_count(num_calib: int, n: int) -> int:
    """Calibration takes at most a quarter of a split it shares, and at least one image."""
    return max(1, min(num_calib, n // 4))


def _check_images(root: Path, splits: Dict[str, list], skip_bad_images: bool,
                  need=("calib", "eval")) -> Tuple[Dict[str, list], Optional[List[Tuple[str, str]]]]:
    """Decode every file once; stop on a bad one, or leave it out (``skip_bad_images``) and list it."""
    bad = find_bad_images(sorted({p for part in splits.values() for p, _ in part}))
    if bad and not skip_bad_images:
        more = f" ({len(bad) - 1} more unreadable files in {root})" if len(bad) > 1 else ""
        raise EdgekitError(f"Cannot read image {bad[0][0]}: {bad[0][1]}{more}; fix or remove it, or skip "
                           f"unreadable images with --skip-bad-images (skip_bad_images=True)")
    if not skip_bad_images:
        return splits, None
    drop = {p for p, _ in bad}
    splits = {k: [it for it in part if it[0] not in drop] for k, part in splits.items()}
    for k in need:
        if not splits[k]:
            raise EdgekitError(f"No readable images left in the {k} split of {root} "
                               f"({len(bad)} unreadable ones skipped)")
    return splits, [(str(p), reason) for p, reason in bad]


@TASKS.register("imagefolder")
def imagefolder_task(data: str, input_size: Optional[int] = None, num_calib: int = 256,
                     num_eval: Optional[int] = None, seed: int = 0, skip_bad_images: bool = False,
                     preprocess: Optional[Preprocess] = None, train: bool = True, **_: object) -> Task:
    """A labelled tree, ``DIR/<class>/*.jpg`` or ``DIR/train`` + ``DIR/val``, split three ways without overlap.

    One tree: ``num_calib`` (at most a quarter) calibrate, ``num_eval`` (default: half of the rest) evaluate, the
    rest trains; ``train=False`` (no baseline to train: pretrained head or a weights file) evaluates all of the
    rest. Class indices follow sorted folder names, which is ImageNet's index order for its 1000 synset folders.
    ``preprocess`` is the model's eval transform (default: ImageNet's), at ``input_size`` when given.
    """
    root = Path(data)
    layout = data_layout(root)
    if layout == "images":
        raise EdgekitError(f"{root} has no class sub-folders (expected {root}/<class>/<image>.jpg); its images can "
                           f"be evaluated without labels: load_task(data=...) does that")
    pre = resolve(preprocess, input_size)
    two = layout == "train-val"
    tree = root / "val" if two else root
    classes = sorted(p.name for p in tree.iterdir() if p.is_dir())
    if not classes:
        raise EdgekitError(f"{tree} has no class sub-folders (expected {tree}/<class>/<image>.jpg)")
    rng = np.random.default_rng(seed)
    items = _scan(tree, classes)
    present = sorted({classes[label] for _, label in items})
    if not present:
        raise EdgekitError(f"{tree} has no images in its class folders ({', '.join(classes[:5])}"
                           f"{', ...' if len(classes) > 5 else ''}; expected {tree}/<class>/<image>.jpg)")
    if len(present) < 2:
        raise EdgekitError(f"{tree} has images in 1 class folder ({present[0]}): top-1 accuracy on one class says "
                           f"nothing about a classifier; give two or more class folders, or put the images directly "
                           f"in one folder to judge variants by agreement with fp32 without labels")
    if two:
        train_items = _scan(root / "train", classes)
        if not train_items:
            raise EdgekitError(f"{root / 'train'} has no images in the class folders of {tree}; calibration and "
                               f"training come from it (evaluation is {tree})")
        n_calib = min(num_calib, len(train_items)) if not train else _calib_count(num_calib, len(train_items))
        calib, train_split = _split(train_items, n_calib, rng)
        evals = [items[i] for i in rng.permutation(len(items))]
        evals = evals if num_eval is None else evals[:num_eval]
    else:
        if len(items) < (3 if train else 2):
            raise EdgekitError(f"{tree} holds {len(items)} images; calibration, evaluation"
                               f"{' and training' if train else ''} each need their own, at least "
                               f"{3 if train else 2}")
        calib, rest = _split(items, _calib_count(num_calib, len(items)), rng)
        n_eval = (len(rest) // 2 if train else len(rest)) if num_eval is None else min(num_eval, len(rest))
        evals, train_split = rest[:n_eval], rest[n_eval:] if train else []
    if not train:
        train_split = []
    splits, skipped = _check_images(root, {"train": train_split, "calib": calib, "eval": evals}, skip_bad_images)
    notes = []
    eval_classes = len({label for _, label in splits["eval"]})
    if eval_classes < 2:
        notes.append(f"the eval split holds one class of {len(classes)}: its accuracy says little; give more images")
    return Task(f"imagefolder:{root.name}", len(classes), 3, pre.input_size,
                {k: ImageFiles(v, pre) for k, v in splits.items()}, classes, source=str(root.resolve()),
                workers=data_workers(), skipped=skipped, preprocess=pre, notes=notes,
                layout="train-val" if two else "classes")


@TASKS.register("images")
def images_task(data: str, input_size: Optional[int] = None, num_calib: int = 256, num_eval: Optional[int] = None,
                seed: int = 0, skip_bad_images: bool = False, preprocess: Optional[Preprocess] = None,
                **_: object) -> Task:
    """A folder of images without labels (``DIR/*.jpg``): judged by agreement with fp32, the model's own head kept.

    A fixed shuffle: ``num_calib`` (at most a quarter) calibrate, the rest (or ``num_eval`` of it) evaluates;
    the two never share a file. Nothing trains on it.
    """
    root = Path(data)
    if data_layout(root) != "images":
        raise EdgekitError(f"{root} holds class sub-folders; it is a labelled ImageFolder (imagefolder task)")
    pre = resolve(preprocess, input_size)
    files = _images(root)
    if len(files) < 2:
        raise EdgekitError(f"{root} holds {len(files)} image; calibration and evaluation each need their own, "
                           f"at least 2")
    calib, rest = _split([(p, UNLABELLED) for p in files], _calib_count(num_calib, len(files)),
                         np.random.default_rng(seed))
    evals = rest if num_eval is None else rest[:num_eval]
    splits, skipped = _check_images(root, {"train": [], "calib": calib, "eval": evals}, skip_bad_images)
    return Task(f"imagefolder:{root.name}", None, 3, pre.input_size,
                {k: ImageFiles(v, pre) for k, v in splits.items()}, source=str(root.resolve()),
                workers=data_workers(), skipped=skipped, labelled=False, preprocess=pre, layout="images")
