"""A user's COCO-format detection folder, checked whole before any work.

Layouts: ``DIR/annotations.json`` (one file, split by a fixed shuffle of the image ids) or ``DIR/train/`` and
``DIR/val/`` each with an ``annotations.json`` (val gives calibration and evaluation). ``file_name`` is relative to
the folder that holds its annotations file.

The JSON is the user's and may be hostile: every field is checked at task creation and a bad one stops the task
with one line naming the file and the problem (never a traceback); no path leads outside the folder (absolute
names, ``..`` and symlinks out are refused); a file over 512 MB is refused unread; image headers are read once
(their sizes place the boxes, so ground truth needs no decoding) and a decompression bomb is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import EdgekitError

ANNOTATIONS = "annotations.json"
MAX_JSON_BYTES = 512 * 2**20
PAD = 114  # letterbox grey, as YOLO-family detectors pad

Item = Tuple[Path, int, int, np.ndarray, np.ndarray]  # (image, width, height, xyxy boxes letterboxed, labels)


def annotation_files(root: Path) -> List[Tuple[str, Path]]:
    """[("all", DIR/annotations.json)] or [("train", ...), ("val", ...)]: the one file wins when both exist."""
    if (root / ANNOTATIONS).is_file():
        return [("all", root / ANNOTATIONS)]
    if (root / "train" / ANNOTATIONS).is_file() and (root / "val" / ANNOTATIONS).is_file():
        return [("train", root / "train" / ANNOTATIONS), ("val", root / "val" / ANNOTATIONS)]
    raise EdgekitError(f"{root} is not a COCO detection folder: expected {root / ANNOTATIONS}, or "
                       f"{root / 'train' / ANNOTATIONS} and {root / 'val' / ANNOTATIONS}")


def is_coco_folder(path) -> bool:
    """Whether ``path`` is a folder in one of the two COCO layouts (nothing is read)."""
    try:
        root = Path(path)
        return root.is_dir() and bool(annotation_files(root))
    except (EdgekitError, OSError, TypeError, ValueError):
        return False


def _show(v: object, n: int = 60) -> str:
    """A user's value for a one-line message: repr escapes newlines; long values are cut."""
    text = repr(v)
    return text if len(text) <= n else text[:n - 3] + "..."


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop on older Pythons
        return False


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(path: Path, root: Path) -> Tuple[dict, str]:
    """The parsed file and its sha256; refused when outside ``root``, not a regular file, or over 512 MB."""
    if not _inside(path, root):
        raise EdgekitError(f"{path} leads outside {root} (a symlink?); annotations must lie inside the folder")
    if not path.is_file():
        raise EdgekitError(f"{path} is not a regular file")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise EdgekitError(f"{path} is {size / 2**20:.0f} MB; annotation files over "
                           f"{MAX_JSON_BYTES // 2**20} MB are refused unread")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise EdgekitError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise EdgekitError(f"{path} is nested too deeply to be COCO annotations") from None
    except ValueError as exc:  # bytes that are not UTF-8/16/32 text
        raise EdgekitError(f"{path} is not valid JSON: {type(exc).__name__}") from None
    return data, hashlib.sha256(raw).hexdigest()


def _list(data: dict, key: str, path: Path, required: bool = True) -> list:
    if key not in data and not required:
        return []
    if key not in data:
        raise EdgekitError(f"{path} has no \"{key}\" list")
    if not isinstance(data[key], list):
        raise EdgekitError(f"{path}: \"{key}\" must be a list, not {type(data[key]).__name__}")
    return data[key]


def _entry(v: object, where: str, keys: Tuple[str, ...], path: Path) -> dict:
    if not isinstance(v, dict):
        raise EdgekitError(f"{path}: {where} must be an object, not {_show(v)}")
    for k in keys:
        if k not in v:
            raise EdgekitError(f"{path}: {where} has no \"{k}\"")
    return v


def _file_name(fn: object, where: str, base: Path, root: Path, path: Path) -> Path:
    """The image file ``fn`` names, refused unless it is a relative path that stays inside ``root``."""
    try:
        ok = isinstance(fn, str) and bool(fn.strip()) and "\0" not in fn and bool(os.fsencode(fn))
    except UnicodeError:  # a lone surrogate: no file on disk has that name
        ok = False
    if not ok:
        raise EdgekitError(f"{path}: {where}.file_name must be a non-empty file name, not {_show(fn)}")
    if PurePosixPath(fn).is_absolute() or PureWindowsPath(fn).is_absolute() or PureWindowsPath(fn).drive \
            or fn.startswith(("/", "\\")):
        raise EdgekitError(f"{path}: {where}.file_name {_show(fn)} is absolute; give a path relative to {base}")
    if ".." in fn.replace("\\", "/").split("/"):
        raise EdgekitError(f"{path}: {where}.file_name {_show(fn)} contains '..'; images must lie inside {root}")
    p = base / fn
    if not _inside(p, root):
        raise EdgekitError(f"{path}: {where}.file_name {_show(fn)} leads outside {root} (a symlink?)")
    return p


def _image_size(p: Path) -> Tuple[int, int]:
    """(width, height) from the header; a decompression bomb, a non-image or an unreadable file is refused."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(p) as im:
                w, h = im.size
        except EdgekitError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever PIL raises, the file is unusable
            raise EdgekitError(f"Cannot read image {p}: {_reason(exc)}") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > limit:
        raise EdgekitError(f"Cannot read image {p}: {w}x{h} pixels is over PIL's limit of {limit} "
                           f"(a decompression bomb?)")
    return w, h


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def parse(path: Path, root: Path) -> dict:
    """One annotations file, checked whole: {"images": [(id, file, w, h)], "categories": {id: name},
    "boxes": {image id: [(category id, x, y, w, h)]}, "crowd": n skipped, "sha256": ...}."""
    data, digest = _read_json(path, root)
    if not isinstance(data, dict):
        raise EdgekitError(f"{path} must hold a JSON object with \"images\", \"annotations\" and \"categories\", "
                           f"not a {type(data).__name__}")
    base = path.parent
    images, anns, cats = _list(data, "images", path), _list(data, "annotations", path), _list(data, "categories",
                                                                                                 path)
    if not images:
        raise EdgekitError(f"{path} lists no images")
    if not cats:
        raise EdgekitError(f"{path} lists no categories")
    categories: Dict[int, str] = {}
    for i, c in enumerate(cats):
        c = _entry(c, f"categories[{i}]", ("id", "name"), path)
        if not _is_int(c["id"]) or not isinstance(c["name"], str):
            raise EdgekitError(f"{path}: categories[{i}] needs a whole-number id and a text name, not "
                               f"id {_show(c['id'])} name {_show(c['name'])}")
        if c["id"] in categories:
            raise EdgekitError(f"{path}: categories[{i}] repeats category id {c['id']}")
        categories[c["id"]] = c["name"]
    entries: List[Tuple[int, Path, Optional[int], Optional[int]]] = []
    seen: set = set()
    for i, im in enumerate(images):
        im = _entry(im, f"images[{i}]", ("id", "file_name"), path)
        if not _is_int(im["id"]):
            raise EdgekitError(f"{path}: images[{i}].id must be a whole number, not {_show(im['id'])}")
        if im["id"] in seen:
            raise EdgekitError(f"{path}: images[{i}] repeats image id {im['id']}")
        seen.add(im["id"])
        dims = [im.get(k) for k in ("width", "height")]
        for k, v in zip(("width", "height"), dims):
            if v is not None and not (_is_int(v) and v > 0):
                raise EdgekitError(f"{path}: images[{i}].{k} must be a whole number above 0, not {_show(v)}")
        entries.append((im["id"], _file_name(im["file_name"], f"images[{i}]", base, root, path), *dims))
    boxes: Dict[int, list] = {}
    crowd = 0
    for i, a in enumerate(anns):
        a = _entry(a, f"annotations[{i}]", ("image_id", "category_id"), path)
        if not _is_int(a["image_id"]) or a["image_id"] not in seen:
            raise EdgekitError(f"{path}: annotations[{i}] names image_id {_show(a['image_id'])}, which no image has")
        if not _is_int(a["category_id"]) or a["category_id"] not in categories:
            raise EdgekitError(f"{path}: annotations[{i}] names category_id {_show(a['category_id'])}, which no "
                               f"category has")
        if a.get("iscrowd", 0) not in (0, 1):  # False/True compare equal to 0/1
            raise EdgekitError(f"{path}: annotations[{i}].iscrowd must be 0 or 1, not {_show(a['iscrowd'])}")
        if a.get("iscrowd", 0):  # crowd regions are not objects to detect (as COCO's own evaluation treats them)
            crowd += 1
            continue
        b = a.get("bbox")
        if not (isinstance(b, list) and len(b) == 4 and all(_is_num(v) for v in b)):
            raise EdgekitError(f"{path}: annotations[{i}].bbox must be 4 finite numbers [x, y, width, height], "
                               f"not {_show(b)}")
        if b[2] <= 0 or b[3] <= 0 or b[0] < 0 or b[1] < 0:
            raise EdgekitError(f"{path}: annotations[{i}].bbox {_show(b)} needs x, y >= 0 and width, height > 0")
        boxes.setdefault(a["image_id"], []).append((a["category_id"], *(float(v) for v in b)))
    missing = [(i, p) for i, (_, p, _, _) in enumerate(entries) if not p.is_file()]
    if missing:
        i, p = missing[0]
        more = f" ({len(missing) - 1} more images missing)" if len(missing) > 1 else ""
        raise EdgekitError(f"{path}: images[{i}] file {p} is missing or not a regular file{more}")
    sized = []
    for i, (image_id, p, w, h) in enumerate(entries):
        size = _image_size(p)
        if (w is not None and w != size[0]) or (h is not None and h != size[1]):
            raise EdgekitError(f"{path}: images[{i}] declares {w}x{h} but {p} is {size[0]}x{size[1]}")
        sized.append((image_id, p, *size))
    return {"images": sized, "categories": categories, "boxes": boxes, "crowd": crowd, "sha256": digest}


def letterbox_items(parsed: dict, label_of: Dict[int, int], size: int) -> List[Item]:
    """Each image's boxes as xyxy in the ``size`` letterbox (scaled by size / longer side, clipped to the image;
    boxes left with no area are dropped), in image-id order."""
    items = []
    for image_id, p, w, h in sorted(parsed["images"], key=lambda t: t[0]):
        r = size / max(w, h)
        nw, nh = _fit(w, h, size)
        rows = parsed["boxes"].get(image_id, [])
        b = np.array([[x, y, x + bw, y + bh] for _, x, y, bw, bh in rows], np.float64).reshape(-1, 4) * r
        b[:, 0::2] = b[:, 0::2].clip(0, nw)
        b[:, 1::2] = b[:, 1::2].clip(0, nh)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        labels = np.array([label_of[c] for c, *_ in rows], np.int64)[keep]
        items.append((p, w, h, b[keep].astype(np.float32), labels))
    return items


def _fit(w: int, h: int, size: int) -> Tuple[int, int]:
    r = size / max(w, h)
    return max(1, min(size, round(w * r))), max(1, min(size, round(h * r)))


class CocoImages(Dataset):
    """Letterboxed images of a COCO folder, decoded lazily; ground truth is known without decoding."""

    def __init__(self, items: List[Item], input_size: int, root: Path):
        self.items, self.input_size, self.root = items, input_size, root

    def __len__(self) -> int:
        return len(self.items)

    def targets(self, limit: Optional[int] = None) -> List[dict]:
        return [{"boxes": b.copy(), "labels": y.copy()} for _, _, _, b, y in self.items[:limit]]

    def __getitem__(self, i: int):
        p, w, h, boxes, labels = self.items[i]
        x = torch.from_numpy(letterbox(p, w, h, self.input_size, self.root))
        return x, {"boxes": torch.from_numpy(boxes.copy()), "labels": torch.from_numpy(labels.copy())}


def letterbox(p: Path, w: int, h: int, size: int, root: Path) -> np.ndarray:
    """The image as float32 RGB CHW in [0, 1], scaled to fit ``size`` and padded grey on the right and bottom."""
    from PIL import Image

    if not _inside(p, root):  # the file may have been replaced by a link since the task was made
        raise EdgekitError(f"Cannot read image {p}: it now leads outside {root}")
    nw, nh = _fit(w, h, size)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(p) as im:
                if im.size != (w, h):
                    raise EdgekitError(f"Cannot read image {p}: it is {im.size[0]}x{im.size[1]} now, "
                                       f"{w}x{h} when the task was made")
                im.draft("RGB", (nw, nh))  # JPEG: decode at a reduced scale no smaller than needed
                arr = np.asarray(im.convert("RGB").resize((nw, nh), Image.Resampling.BILINEAR))
        except EdgekitError:
            raise
        except Exception as exc:  # noqa: BLE001 - a file corrupt or changed after the check at task creation
            raise EdgekitError(f"Cannot read image {p}: {_reason(exc)}") from None
    out = np.full((size, size, 3), PAD, np.uint8)
    out[:nh, :nw] = arr
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)


def load_splits(root: Path, input_size: int, num_calib: int, seed: int) -> Tuple[Dict[str, List[Item]], List[str],
                                                                              dict, List[str]]:
    """({"train", "calib", "eval"} items, class names, origin, notes) of the folder, every file checked first.

    One file: a fixed shuffle of the sorted image ids; 20% evaluate, min(num_calib, 10%) calibrate, the rest
    trains. train/ + val/: train trains; val is shuffled, at most a quarter of it (and num_calib) calibrates, the
    rest evaluates. The splits never share an image.
    """
    files = annotation_files(root)
    parsed = {k: parse(p, root) for k, p in files}
    cats = parsed[files[0][0]]["categories"]
    if len(files) == 2 and parsed["train"]["categories"] != parsed["val"]["categories"]:
        raise EdgekitError(f"{files[0][1]} and {files[1][1]} list different categories; both must list the same "
                           f"ids and names")
    ids = sorted(cats)
    label_of = {c: i for i, c in enumerate(ids)}
    rng = np.random.default_rng(seed)
    if len(files) == 1:
        items = letterbox_items(parsed["all"], label_of, input_size)
        if len(items) < 2:
            raise EdgekitError(f"{files[0][1]} lists 1 image; calibration and evaluation each need their own, "
                               f"at least 2")
        items = [items[i] for i in rng.permutation(len(items))]
        n_eval = max(1, round(0.2 * len(items)))
        n_calib = max(1, min(num_calib, len(items) // 10))
        splits = {"eval": items[:n_eval], "calib": items[n_eval:n_eval + n_calib],
                  "train": items[n_eval + n_calib:]}
    else:
        val = letterbox_items(parsed["val"], label_of, input_size)
        if len(val) < 2:
            raise EdgekitError(f"{files[1][1]} lists 1 image; calibration and evaluation each need their own, "
                               f"at least 2")
        val = [val[i] for i in rng.permutation(len(val))]
        n_calib = max(1, min(num_calib, len(val) // 4))
        splits = {"train": letterbox_items(parsed["train"], label_of, input_size), "calib": val[:n_calib],
                  "eval": val[n_calib:]}
    notes = []
    if len(splits["train"]) < 100:
        notes.append(f"the train split holds {len(splits['train'])} images: too few to train a detector well")
    n_eval_boxes = sum(len(it[4]) for it in splits["eval"])
    if n_eval_boxes == 0:
        notes.append("the eval split holds no boxes: mAP is undefined on it")
    crowd = sum(p["crowd"] for p in parsed.values())
    if crowd:
        notes.append(f"{crowd} crowd annotations (iscrowd 1) left out")
    origin = {"format": "coco", "layout": "annotations.json" if len(files) == 1 else "train-val",
              "annotations": {k: str(p) for k, p in files},
              "sha256": {k: parsed[k]["sha256"] for k, _ in files},
              "category_ids": ids}
    return splits, [cats[c] for c in ids], origin, notes
