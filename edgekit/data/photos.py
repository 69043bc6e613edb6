"""``photos``: real photographs shipped inside scikit-image, to judge a pretrained model's variants without labels.

A pretrained ImageNet network keeps its own 1000-class head; nothing is fine-tuned. Its compressed variants are
compared with its fp32 outputs (top-1 agreement, top-5 overlap, logits SQNR) on natural photos, which exercise
the network as its users' inputs do (MNIST digits or noise do not). The photos are the freely licensed ones
bundled in the scikit-image wheel (public domain or CC0, as skimage.data's docstrings state); nothing is
downloaded: images that skimage fetches on demand are not used, and a photo that is not in the wheel stops the
task with an EdgekitError.

Each photo gives 16 light, deterministic views (the whole photo, 80% and 60% crops at fixed places, some
mirrored), each prepared by the model's own :class:`~edgekit.data.preprocess.Preprocess`. Evaluation and
calibration come from *different photos*: no calibration input shares a pixel with an evaluation input, so int8
ranges are not tuned on the scenes they are judged on.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset

from ..errors import EdgekitError
from .preprocess import Preprocess, resolve
from .tasks import TASKS, Task

# skimage.data name -> licence, as its docstring states it. Natural photographs only (no drawings, textures,
# scans or micrographs in the eval set); grey ones are given three equal channels.
EVAL_PHOTOS = {
    "astronaut": "public domain (NASA)",
    "camera": "CC0 (Lav Varshney)",
    "chelsea": "CC0 (Stefan van der Walt)",
    "coffee": "CC0 (Rachel Michetti)",
    "rocket": "public domain (SpaceX)",
}
CALIB_PHOTOS = {
    "coins": "no known copyright restrictions (Brooklyn Museum)",
    "clock": "public domain (Stefan van der Walt)",
    "hubble_deep_field": "public domain (NASA)",
    "immunohistochemistry": "no known copyright restrictions (CMMI)",
    "retina": "CC0 (Mikael Häggström)",
}
# (left, top, width, height) as fractions of the photo, mirrored or not: the whole photo, five 80% crops, nine 60%
CROPS: Tuple[Tuple[float, float, float, float, bool], ...] = (
    (0.0, 0.0, 1.0, 1.0, False), (0.0, 0.0, 1.0, 1.0, True),
    (0.1, 0.1, 0.8, 0.8, False), (0.0, 0.0, 0.8, 0.8, True), (0.2, 0.0, 0.8, 0.8, False),
    (0.0, 0.2, 0.8, 0.8, False), (0.2, 0.2, 0.8, 0.8, True),
    *((x, y, 0.6, 0.6, (i % 2 == 1)) for i, (y, x) in enumerate((y, x) for y in (0.0, 0.2, 0.4)
                                                                   for x in (0.0, 0.2, 0.4))),
)


# skimage.data function -> its file in the wheel's skimage/data folder
FILES = {"astronaut": "astronaut.png", "camera": "camera.png", "chelsea": "chelsea.png", "coffee": "coffee.png",
         "rocket": "rocket.jpg", "coins": "coins.png", "clock": "clock_motion.png",
         "hubble_deep_field": "hubble_deep_field.jpg", "immunohistochemistry": "ihc.png", "retina": "retina.jpg"}


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """The photo as HxWx3 uint8 from the scikit-image wheel; a photo not in it is refused, never downloaded."""
    try:
        import skimage.data
    except ImportError:
        raise EdgekitError("The photos task needs scikit-image: pip install scikit-image") from None
    if not (Path(skimage.data.__file__).parent / FILES[name]).is_file():
        raise EdgekitError(f"scikit-image's photo {name} ({FILES[name]}) is not in this scikit-image wheel; edgekit's "
                           f"photos task uses bundled photos only and downloads nothing")
    arr = np.asarray(getattr(skimage.data, name)())  # checks the file's hash against skimage's registry
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise EdgekitError(f"scikit-image's photo {name} is {arr.dtype} {arr.shape}, not an RGB or grey photo")
    arr.setflags(write=False)
    return arr


class PhotoCrops(Dataset):
    """(photo, crop) views prepared by a :class:`Preprocess`; label -1 (none)."""

    def __init__(self, items: Sequence[Tuple[str, int]], preprocess: Preprocess):
        self.items, self.preprocess = list(items), preprocess

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> np.ndarray:
        return np.full(len(self.items), -1, dtype=np.int64)

    def view(self, i: int):
        """The i-th view as a PIL image, before preprocessing."""
        from PIL import Image

        name, c = self.items[i]
        arr = _photo(name)
        h, w = arr.shape[:2]
        x0, y0, cw, ch, flip = CROPS[c]
        left, top = round(x0 * w), round(y0 * h)
        im = Image.fromarray(arr[top:top + round(ch * h), left:left + round(cw * w)])
        return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im

    def __getitem__(self, i: int):
        return self.preprocess(self.view(i)), -1


def _views(photos: Sequence[str], limit: Optional[int]) -> List[Tuple[str, int]]:
    """Crop-major order, so that the first ``limit`` views cover every photo."""
    items = [(p, c) for c in range(len(CROPS)) for p in photos]
    return items if limit is None else items[:max(0, limit)]


@TASKS.register("photos")
def photos_task(input_size: Optional[int] = None, preprocess: Optional[Preprocess] = None,
                num_calib: Optional[int] = None, num_eval: Optional[int] = None, **_: object) -> Task:
    """Unlabelled natural photos from scikit-image: 80 eval views of 5 photos, 80 calibration views of 5 others.

    ``preprocess`` is the model's eval transform (default: ImageNet's at 224 px, or at ``input_size``).
    ``num_calib`` / ``num_eval`` take fewer views. Deterministic: no seed changes it.
    """
    import skimage

    pre = resolve(preprocess, input_size)
    for name in (*EVAL_PHOTOS, *CALIB_PHOTOS):
        _photo(name)  # a missing photo stops here, before any work
    splits: Dict[str, Dataset] = {"train": PhotoCrops([], pre),
                                  "calib": PhotoCrops(_views(list(CALIB_PHOTOS), num_calib), pre),
                                  "eval": PhotoCrops(_views(list(EVAL_PHOTOS), num_eval), pre)}
    origin = {"package": "scikit-image", "version": skimage.__version__, "module": "skimage.data",
              "eval_photos": dict(EVAL_PHOTOS), "calib_photos": dict(CALIB_PHOTOS), "views_per_photo": len(CROPS),
              "disjoint": "calibration and evaluation use different photos"}
    source = (f"scikit-image {skimage.__version__} skimage.data photographs (public domain / CC0): eval "
              f"{', '.join(EVAL_PHOTOS)}; calibration {', '.join(CALIB_PHOTOS)}")
    return Task("photos", None, 3, pre.input_size, splits, source=source, labelled=False, preprocess=pre,
                origin=origin)
