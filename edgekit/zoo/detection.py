"""Zoo entries of the detection task: the YOLO and SSD families of the seed documents (section 23.9-23.10).

Each is built for a number of classes and a fixed input size and ends in edgekit's detector output,
``[B, anchors, 4 + classes]`` decoded inside the graph (:mod:`edgekit.detect.metrics`).
"""

from __future__ import annotations

from typing import Dict

import torch

from .registry import ModelSpec, register_model, torch_hub_file


# AdamW at 2e-3 in batches of 32 (detection losses are noisier per image than a classifier's); 20 epochs of the
# default task's 3,000 images
TRAIN = {"lr": 2e-3, "epochs": 20, "batch_size": 32}


def _yolox_nano(num_classes: int, input_size: int = 416):
    from ..detect.yolox import yolox_nano

    return yolox_nano(num_classes)


def _ssdlite(num_classes: int, input_size: int = 320):
    from ..detect.ssdlite import ssdlite_mobilenetv3

    return ssdlite_mobilenetv3(num_classes, input_size)


def _ssdlite_coco() -> Dict[str, torch.Tensor]:
    """torchvision's COCO checkpoint (91 classes with background) where torch hub already holds it."""
    state = torch_hub_file("ssdlite320_mobilenet_v3_large_coco-a79551df.pth")()
    return {f"net.{k}": v for k, v in state.items()}


register_model(ModelSpec(
    name="yolox-nano", family="yolox", source="edgekit", task="detection", input_size=416, num_classes=80,
    paper="Ge et al. 2021, YOLOX: Exceeding YOLO Series in 2021, arXiv:2107.08430", build=_yolox_nano,
    notes="depth 0.33, width 0.25, depthwise CSPDarknet + PAFPN, decoupled anchor-free head, SimOTA",
    train=TRAIN,
    reference={"params_m": 0.91}))
register_model(ModelSpec(
    name="ssdlite-mobilenetv3", family="ssd", source="torchvision", task="detection", input_size=320,
    num_classes=90, aliases=("ssdlite320",), build=_ssdlite,
    paper="Sandler et al. 2018 (SSDLite), arXiv:1801.04381; Howard et al. 2019, arXiv:1905.02244",
    pretrained=(("torch hub cache", _ssdlite_coco),), train=TRAIN,
    notes="torchvision's ssdlite320_mobilenet_v3_large; default boxes decoded in the graph, NMS outside"))
