"""Zoo entries built from torchvision (weights stay compatible with torchvision's)."""

from __future__ import annotations

from functools import partial

from torchvision import models as tvm

from .registry import ModelSpec, register_model, torch_hub_file

# (name, torchvision builder, classifier path, paper, hub checkpoint file, aliases, reference figures)
_TABLE = [
    ("shufflenetv2-x0.5", "shufflenet_v2_x0_5", "fc", "Ma et al. 2018, arXiv:1807.11164",
     "shufflenetv2_x0.5-f707e7126e.pth", (), {"params_m": 1.4, "macs_m": 41}),
    ("shufflenetv2-x1.0", "shufflenet_v2_x1_0", "fc", "Ma et al. 2018, arXiv:1807.11164",
     "shufflenetv2_x1-5666bf0f80.pth", ("shufflenetv2",), {"params_m": 2.3, "macs_m": 146}),
    ("shufflenetv2-x1.5", "shufflenet_v2_x1_5", "fc", "Ma et al. 2018, arXiv:1807.11164",
     "shufflenetv2_x1_5-3c479a10.pth", (), {"params_m": 3.5, "macs_m": 299}),
    ("shufflenetv2-x2.0", "shufflenet_v2_x2_0", "fc", "Ma et al. 2018, arXiv:1807.11164",
     "shufflenetv2_x2_0-8be3c8ee.pth", (), {"params_m": 7.4, "macs_m": 591}),
    ("mobilenetv2", "mobilenet_v2", "classifier.1", "Sandler et al. 2018, arXiv:1801.04381",
     "mobilenet_v2-b0353104.pth", (), {"params_m": 3.4, "macs_m": 300}),
    ("mobilenetv3-small", "mobilenet_v3_small", "classifier.3", "Howard et al. 2019, arXiv:1905.02244",
     "mobilenet_v3_small-047dcff4.pth", (), {"params_m": 2.5, "macs_m": 56}),
    ("mobilenetv3-large", "mobilenet_v3_large", "classifier.3", "Howard et al. 2019, arXiv:1905.02244",
     "mobilenet_v3_large-8738ca79.pth", (), {"params_m": 5.4, "macs_m": 219}),
    ("squeezenet1.0", "squeezenet1_0", "classifier.1", "Iandola et al. 2016, arXiv:1602.07360",
     "squeezenet1_0-b66bff10.pth", (), {"params_m": 1.25}),
    ("squeezenet1.1", "squeezenet1_1", "classifier.1", "Iandola et al. 2016, arXiv:1602.07360",
     "squeezenet1_1-b8a52dc0.pth", ("squeezenet",), {}),
    ("mnasnet0.5", "mnasnet0_5", "classifier.1", "Tan et al. 2019, arXiv:1807.11626",
     "mnasnet0.5_top1_67.823-3ffadce67e.pth", (), {"params_m": 2.2, "macs_m": 104}),
    ("mnasnet1.0", "mnasnet1_0", "classifier.1", "Tan et al. 2019, arXiv:1807.11626",
     "mnasnet1.0_top1_73.512-f206786ef8.pth", ("mnasnet",), {"params_m": 4.2, "macs_m": 312}),
    ("efficientnet-b0", "efficientnet_b0", "classifier.1", "Tan & Le 2019, arXiv:1905.11946",
     "efficientnet_b0_rwightman-7f5810bc.pth", (), {"params_m": 5.3, "macs_m": 390}),
]


def _build(fn_name: str, num_classes: int):
    return getattr(tvm, fn_name)(weights=None, num_classes=num_classes)


for _name, _fn, _head, _paper, _file, _aliases, _ref in _TABLE:
    register_model(ModelSpec(
        name=_name, family=_name.split("-")[0].rstrip("0123456789."), source="torchvision",
        paper=_paper, build=partial(_build, _fn), classifier=_head,
        pretrained=(("torchvision", torch_hub_file(_file)),), aliases=_aliases, reference=_ref,
        # SqueezeNet's ReLU after its conv classifier dies at higher learning rates.
        train={"lr": 5e-4} if _name.startswith("squeezenet") else {},
    ))
