"""How an image file becomes a model input: the model's own eval transform, not one fixed for every model.

A pretrained network is judged on inputs prepared as it was trained to see them: timm records that in each
model's data config (input size, crop_pct, interpolation, mean/std, crop mode) and
``timm.data.resolve_data_config({}, model=model)`` returns it. :class:`Preprocess` holds those values and applies
them as timm's ``transforms_imagenet_eval`` does (same resize arithmetic, same centre crop, same padding), so
that a tensor made here equals timm's own transform's. The default is the ImageNet eval transform: resize to
size / 0.875, centre crop, bilinear, ImageNet mean/std.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Mapping, Optional, Tuple

from ..errors import EdgekitError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")


@dataclass(frozen=True)
class Preprocess:
    """An eval transform: resize (shorter side to ``input_size / crop_pct``), crop ``input_size`` square,
    scale to [0, 1], normalise by ``mean``/``std``.

    ``crop_mode`` as timm's: ``center`` keeps the aspect ratio and crops, ``squash`` resizes both sides then
    crops, ``border`` fits the longer side and pads with the mean colour. ``source`` says where the values come
    from (the report shows it); it takes no part in equality.
    """

    input_size: int = 224
    crop_pct: float = DEFAULT_CROP_PCT
    interpolation: str = "bilinear"
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    crop_mode: str = "center"
    source: str = field(default="ImageNet eval default", compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.input_size, int) and self.input_size > 0):
            raise EdgekitError(f"Preprocessing input size must be a positive whole number, not {self.input_size!r}")
        if not (0 < float(self.crop_pct) <= 1.5):
            raise EdgekitError(f"Preprocessing crop_pct must be in (0, 1.5], not {self.crop_pct!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise EdgekitError(f"Preprocessing interpolation {self.interpolation!r} is not one of "
                               f"{', '.join(INTERPOLATIONS)}")
        if self.crop_mode not in CROP_MODES:
            raise EdgekitError(f"Preprocessing crop_mode {self.crop_mode!r} is not one of {', '.join(CROP_MODES)}")
        for name in ("mean", "std"):
            v = tuple(float(x) for x in getattr(self, name))
            if len(v) != 3 or (name == "std" and min(v) <= 0):
                raise EdgekitError(f"Preprocessing {name} must be 3 numbers (RGB){' above 0' * (name == 'std')}, "
                                   f"not {getattr(self, name)!r}")
            object.__setattr__(self, name, v)
        object.__setattr__(self, "crop_pct", float(self.crop_pct))

    @classmethod
    def from_timm(cls, cfg: Mapping[str, Any], source: str = "timm data config") -> "Preprocess":
        """From a timm data config (``resolve_data_config``): input_size (C, H, W), crop_pct, interpolation,
        mean, std and, where present, crop_mode. edgekit's tasks are square and RGB: anything else is refused."""
        size = cfg.get("input_size", (3, 224, 224))
        size = tuple(size) if isinstance(size, (tuple, list)) else (3, size, size)
        if len(size) != 3 or size[0] != 3 or size[1] != size[2]:
            raise EdgekitError(f"The model's data config asks for input {size} (C, H, W); edgekit's image tasks are "
                               f"square RGB (3, N, N)")
        interp = cfg.get("interpolation") or "bilinear"
        if interp == "random":  # a training-time choice: evaluation uses one
            interp = "bilinear"
        return cls(int(size[1]), float(cfg.get("crop_pct") or DEFAULT_CROP_PCT), str(interp),
                   tuple(cfg.get("mean") or IMAGENET_MEAN), tuple(cfg.get("std") or IMAGENET_STD),
                   str(cfg.get("crop_mode") or "center"), source)

    @classmethod
    def for_model(cls, model: Any, input_size: Optional[int] = None) -> "Preprocess":
        """The model's own transform when it carries a timm pretrained config, else the default.

        timm's fallback for a model without one is bicubic: not what edgekit's own networks were trained with.
        """
        if getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None):
            from timm.data import resolve_data_config

            name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
            pre = cls.from_timm(resolve_data_config({}, model=model), source=f"timm data config of {name}")
        else:
            pre = cls()
        return pre.resized(input_size)

    def resized(self, input_size: Optional[int]) -> "Preprocess":
        """The same transform at another input size (``--input-size``); crop_pct etc. kept."""
        return self if input_size is None or input_size == self.input_size else replace(self, input_size=input_size)

    @property
    def scale_size(self) -> int:
        """The resize target before the crop, as timm computes it (floor of size / crop_pct)."""
        return math.floor(self.input_size / self.crop_pct)

    def __call__(self, im):
        """A PIL image -> float32 CHW tensor, normalised."""
        import numpy as np
        import torch
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        im = im.convert("RGB")
        s, scale = self.input_size, self.scale_size
        mode = InterpolationMode(self.interpolation)
        if self.crop_mode == "squash":
            im = F.resize(im, [scale, scale], interpolation=mode)
        elif self.crop_mode == "border":  # timm's ResizeKeepRatio(longest=1) + CenterCropOrPad(fill=mean colour)
            w, h = im.size
            ratio = max(h / scale, w / scale)
            im = F.resize(im, [round(h / ratio), round(w / ratio)], interpolation=mode)
            w, h = im.size
            if s > w or s > h:
                pad = [(s - w) // 2 if s > w else 0, (s - h) // 2 if s > h else 0,
                       (s - w + 1) // 2 if s > w else 0, (s - h + 1) // 2 if s > h else 0]
                im = F.pad(im, pad, fill=tuple(round(255 * m) for m in self.mean))
        else:
            im = F.resize(im, scale, interpolation=mode)  # shorter side; the longer one as torchvision rounds it
        im = F.center_crop(im, [s, s])
        arr = np.asarray(im, dtype=np.float32) / 255.0
        arr = (arr - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Preprocess":
        """From report.json's ``task.preprocess`` (which may come from anyone: malformed values are refused)."""
        known = {"input_size", "crop_pct", "interpolation", "mean", "std", "crop_mode", "source"}
        try:
            return cls(**{k: (tuple(v) if k in ("mean", "std") else v) for k, v in d.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise EdgekitError(f"Malformed preprocessing {dict(d)!r}: {exc}") from None


def resolve(preprocess: Optional[Preprocess], input_size: Optional[int], default_size: int = 224) -> Preprocess:
    """The transform a task uses: ``preprocess`` (or the default) at ``input_size`` when one is given."""
    pre = preprocess if preprocess is not None else Preprocess(default_size)
    if not isinstance(pre, Preprocess):
        raise TypeError(f"preprocess must be an edgekit.data.Preprocess, not {type(pre).__name__}")
    return pre.resized(input_size)
