"""SSDlite with the MobileNetV3-Large backbone (torchvision's ``ssdlite320_mobilenet_v3_large``), exportable.

torchvision's module takes a list of images and returns boxes after NMS, with the resizing, the default boxes
and NMS in Python. edgekit's detectors take one fixed-size batch and return every default box decoded,
``[B, N, 4 + classes]`` (see :mod:`edgekit.detect.metrics`), so the wrapper keeps torchvision's backbone, head,
default-box generator, box coder and loss, and moves only the decoding into the graph.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # torchvision SSD's box coder
DW_CLIP = 4.135166556742356  # log(1000 / 16), torchvision's bbox_xform_clip


class SSDLite(nn.Module):
    """torchvision's SSDlite at a fixed ``input_size``; inputs are RGB in [0, 1] (normalised inside, as torchvision
    normalises its inputs to [-1, 1]). ``num_classes`` excludes the background class the head adds."""

    def __init__(self, num_classes: int, input_size: int = 320):
        super().__init__()
        from torchvision.models.detection import ssdlite320_mobilenet_v3_large
        from torchvision.models.detection.image_list import ImageList

        self.num_classes, self.input_size = num_classes, input_size
        self.net = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1)
        dummy = torch.zeros(1, 3, input_size, input_size)
        with torch.no_grad():
            was = self.net.backbone.training
            self.net.backbone.eval()
            feats = list(self.net.backbone(dummy).values())
            self.net.backbone.train(was)
            anchors = self.net.anchor_generator(ImageList(dummy, [(input_size, input_size)]), feats)[0]
        self.register_buffer("anchors", anchors.float(), persistent=False)  # xyxy, input pixels

    def output_layers(self) -> List[nn.Module]:
        """The last conv of each level's classification and regression head (pruning never narrows them)."""
        heads = (self.net.head.classification_head, self.net.head.regression_head)
        return [[m for m in block.modules() if isinstance(m, nn.Conv2d)][-1] for h in heads for block in h.module_list]

    def _head(self, x: Tensor) -> Dict[str, Tensor]:
        feats = list(self.net.backbone(x * 2.0 - 1.0).values())
        return self.net.head(feats)

    def forward(self, x: Tensor) -> Tensor:
        out = self._head(x)
        reg, logits = out["bbox_regression"], out["cls_logits"]
        a = self.anchors
        wa, ha = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
        cxa, cya = a[:, 0] + 0.5 * wa, a[:, 1] + 0.5 * ha
        wx, wy, ww, wh = BOX_WEIGHTS
        cx = reg[..., 0] / wx * wa + cxa
        cy = reg[..., 1] / wy * ha + cya
        w = torch.exp(torch.clamp(reg[..., 2] / ww, max=DW_CLIP)) * wa
        h = torch.exp(torch.clamp(reg[..., 3] / wh, max=DW_CLIP)) * ha
        size = float(self.input_size)
        boxes = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1).clamp(0.0, size)
        scores = torch.softmax(logits, dim=-1)[..., 1:]
        return torch.cat([boxes, scores], dim=-1)

    def loss(self, x: Tensor, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """torchvision's SSD loss: default boxes matched by IoU, smooth-L1 on the matched, cross-entropy with 3:1
        hard negative mining; labels shift by one for the background class."""
        from torchvision.ops import box_iou

        head = self._head(x)
        anchors = [self.anchors] * x.shape[0]
        tv_targets, matched = [], []
        for t in targets:
            boxes = t["boxes"].to(x.dtype)
            tv_targets.append({"boxes": boxes, "labels": t["labels"].long() + 1})
            if boxes.numel() == 0:
                matched.append(torch.full((self.anchors.shape[0],), -1, dtype=torch.int64))
            else:
                matched.append(self.net.proposal_matcher(box_iou(boxes, self.anchors)))
        losses = self.net.compute_loss(tv_targets, head, anchors, matched)
        return {"loss": losses["bbox_regression"] + losses["classification"], "box": losses["bbox_regression"],
                "cls": losses["classification"]}


def ssdlite_mobilenetv3(num_classes: int = 80, input_size: int = 320) -> SSDLite:
    return SSDLite(num_classes, input_size)
