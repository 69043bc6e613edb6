"""YOLOX (Ge et al. 2021, arXiv:2107.08430): an anchor-free detector, written after Megvii's reference (Apache-2.0).

CSPDarknet (Focus stem, SPP bottleneck) -> PAFPN -> decoupled head at strides 8/16/32. ``forward`` returns decoded
detections before NMS as one tensor, so an exported graph needs no post-processing besides NMS; ``loss`` is YOLOX's
training loss with SimOTA label assignment. :func:`yolox_nano` is the nano configuration (0.91M parameters).
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["YOLOX", "yolox_nano"]

STRIDES = (8, 16, 32)
_ACTS = {"silu": nn.SiLU, "relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": nn.Hardswish}


def _act(name: str) -> nn.Module:
    # Not in place: in-place activations on BN outputs are harmless in eager mode but get in the way of fake-quant
    # observers and some exporters.
    if name not in _ACTS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTS)}")
    return _ACTS[name]()


class ConvBnAct(nn.Module):
    """Conv -> BN -> activation with 'same' padding (YOLOX's BaseConv)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: str = "silu"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = _act(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class DWConv(nn.Sequential):
    """Depthwise k x k conv then pointwise 1x1, each with BN and activation."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, act: str = "silu"):
        super().__init__(ConvBnAct(cin, cin, k, stride, groups=cin, act=act), ConvBnAct(cin, cout, 1, act=act))


def _conv(depthwise: bool):
    return DWConv if depthwise else ConvBnAct


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool, depthwise: bool, act: str):
        super().__init__()
        self.conv1 = ConvBnAct(c, c, 1, act=act)
        self.conv2 = _conv(depthwise)(c, c, 3, act=act)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(self.conv1(x))
        return x + y if self.shortcut else y


class CSPLayer(nn.Module):
    """CSP block (YOLOv5's C3): half the channels go through n bottlenecks, half bypass, then a 1x1 merges."""

    def __init__(self, cin: int, cout: int, n: int, shortcut: bool = True, depthwise: bool = False,
                 act: str = "silu"):
        super().__init__()
        hidden = int(cout * 0.5)
        self.conv1 = ConvBnAct(cin, hidden, 1, act=act)
        self.conv2 = ConvBnAct(cin, hidden, 1, act=act)
        self.conv3 = ConvBnAct(2 * hidden, cout, 1, act=act)
        self.m = nn.Sequential(*[Bottleneck(hidden, shortcut, depthwise, act) for _ in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(torch.cat([self.m(self.conv1(x)), self.conv2(x)], 1))


class SPPBottleneck(nn.Module):
    """Max-pools of 5/9/13 at stride 1, concatenated: a larger receptive field for the stride-32 level."""

    def __init__(self, cin: int, cout: int, act: str, kernels: Sequence[int] = (5, 9, 13)):
        super().__init__()
        hidden = cin // 2
        self.conv1 = ConvBnAct(cin, hidden, 1, act=act)
        self.pools = nn.ModuleList([nn.MaxPool2d(k, 1, k // 2) for k in kernels])
        self.conv2 = ConvBnAct(hidden * (len(kernels) + 1), cout, 1, act=act)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [p(x) for p in self.pools], 1))


class Focus(nn.Module):
    """Space-to-depth (2x2 pixels into channels) then a conv: the stride-2 stem."""

    def __init__(self, cin: int, cout: int, k: int, act: str):
        super().__init__()
        self.conv = ConvBnAct(cin * 4, cout, k, act=act)

    def forward(self, x: Tensor) -> Tensor:
        tl, tr = x[..., ::2, ::2], x[..., ::2, 1::2]
        bl, br = x[..., 1::2, ::2], x[..., 1::2, 1::2]
        return self.conv(torch.cat([tl, bl, tr, br], 1))


class CSPDarknet(nn.Module):
    """Returns the stride 8/16/32 features (dark3, dark4, dark5)."""

    def __init__(self, depth: float, width: float, depthwise: bool, act: str):
        super().__init__()
        conv = _conv(depthwise)
        c = int(width * 64)
        n = max(round(depth * 3), 1)
        self.stem = Focus(3, c, 3, act)
        self.dark2 = nn.Sequential(conv(c, 2 * c, 3, 2, act=act), CSPLayer(2 * c, 2 * c, n, True, depthwise, act))
        self.dark3 = nn.Sequential(conv(2 * c, 4 * c, 3, 2, act=act),
                                   CSPLayer(4 * c, 4 * c, 3 * n, True, depthwise, act))
        self.dark4 = nn.Sequential(conv(4 * c, 8 * c, 3, 2, act=act),
                                   CSPLayer(8 * c, 8 * c, 3 * n, True, depthwise, act))
        self.dark5 = nn.Sequential(conv(8 * c, 16 * c, 3, 2, act=act), SPPBottleneck(16 * c, 16 * c, act),
                                   CSPLayer(16 * c, 16 * c, n, False, depthwise, act))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        x3 = self.dark3(self.dark2(self.stem(x)))
        x4 = self.dark4(x3)
        return x3, x4, self.dark5(x4)


class PAFPN(nn.Module):
    """Top-down then bottom-up fusion of the three backbone levels; outputs keep the backbone's channel counts."""

    def __init__(self, depth: float, width: float, depthwise: bool, act: str,
                 in_channels: Sequence[int] = (256, 512, 1024)):
        super().__init__()
        c3, c4, c5 = (int(c * width) for c in in_channels)
        n = round(3 * depth)
        conv = _conv(depthwise)
        self.lateral_conv0 = ConvBnAct(c5, c4, 1, act=act)
        self.C3_p4 = CSPLayer(2 * c4, c4, n, False, depthwise, act)
        self.reduce_conv1 = ConvBnAct(c4, c3, 1, act=act)
        self.C3_p3 = CSPLayer(2 * c3, c3, n, False, depthwise, act)
        self.bu_conv2 = conv(c3, c3, 3, 2, act=act)
        self.C3_n3 = CSPLayer(2 * c3, c4, n, False, depthwise, act)
        self.bu_conv1 = conv(c4, c4, 3, 2, act=act)
        self.C3_n4 = CSPLayer(2 * c4, c5, n, False, depthwise, act)

    @staticmethod
    def _up(x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    def forward(self, feats: Tuple[Tensor, Tensor, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        x3, x4, x5 = feats
        p5 = self.lateral_conv0(x5)
        p4 = self.reduce_conv1(self.C3_p4(torch.cat([self._up(p5), x4], 1)))
        out3 = self.C3_p3(torch.cat([self._up(p4), x3], 1))
        out4 = self.C3_n3(torch.cat([self.bu_conv2(out3), p4], 1))
        out5 = self.C3_n4(torch.cat([self.bu_conv1(out4), p5], 1))
        return out3, out4, out5


class DecoupledHead(nn.Module):
    """One level's head: 1x1 stem, then separate cls and reg branches (two 3x3 convs each); obj hangs off reg."""

    def __init__(self, cin: int, hidden: int, num_classes: int, depthwise: bool, act: str):
        super().__init__()
        conv = _conv(depthwise)
        self.stem = ConvBnAct(cin, hidden, 1, act=act)
        self.cls_convs = nn.Sequential(conv(hidden, hidden, 3, act=act), conv(hidden, hidden, 3, act=act))
        self.reg_convs = nn.Sequential(conv(hidden, hidden, 3, act=act), conv(hidden, hidden, 3, act=act))
        self.cls_pred = nn.Conv2d(hidden, num_classes, 1)
        self.reg_pred = nn.Conv2d(hidden, 4, 1)
        self.obj_pred = nn.Conv2d(hidden, 1, 1)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        x = self.stem(x)
        reg = self.reg_convs(x)
        return self.reg_pred(reg), self.obj_pred(reg), self.cls_pred(self.cls_convs(x))


def _grid(h: int, w: int, like: Tensor) -> Tensor:
    """[h*w, 2] cell indices (x, y) in row-major order, matching ``flatten(2)`` of an [.., h, w] map."""
    ys = torch.arange(h, dtype=like.dtype, device=like.device)
    xs = torch.arange(w, dtype=like.dtype, device=like.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)


def _box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes [n,4] x [m,4] -> [n,m]."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-16)


def _aligned_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matching rows of two [n,4] xyxy tensors."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter + 1e-16)


class YOLOX(nn.Module):
    """YOLOX detector. ``forward`` -> [B, N, 4 + num_classes]: xyxy boxes in input pixels, then per-class scores."""

    strides = STRIDES
    in_chans = 3  # RGB; the Focus stem's conv sees 12
    max_log_wh = 10.0  # exp(10) * 32 px: far beyond any input, and no inf in an exported graph
    center_radius = 2.5
    iou_weight = 5.0

    def __init__(self, num_classes: int, depth: float = 0.33, width: float = 0.25, depthwise: bool = True,
                 act: str = "silu"):
        super().__init__()
        _act(act)  # fail early on an unknown name
        self.num_classes = num_classes
        self.backbone = CSPDarknet(depth, width, depthwise, act)
        self.neck = PAFPN(depth, width, depthwise, act)
        hidden = int(256 * width)
        self.heads = nn.ModuleList(
            [DecoupledHead(int(c * width), hidden, num_classes, depthwise, act) for c in (256, 512, 1024)])
        self._init_weights()

    def _init_weights(self, prior_prob: float = 0.01) -> None:
        # YOLOX's BN settings; cls/obj biases start every anchor at p = 0.01 so the initial objectness loss over
        # thousands of background anchors does not swamp the few positives.
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = 1e-3, 0.03
        bias = -math.log((1 - prior_prob) / prior_prob)
        for head in self.heads:
            nn.init.constant_(head.cls_pred.bias, bias)
            nn.init.constant_(head.obj_pred.bias, bias)

    def output_layers(self) -> List[nn.Module]:
        """The convs whose output channels are the head's predictions: pruning never narrows them."""
        return [m for h in self.heads for m in (h.reg_pred, h.obj_pred, h.cls_pred)]

    def _raw(self, x: Tensor) -> List[Tuple[Tensor, Tensor, Tensor, Tensor, int]]:
        """Per level: reg [B,A,4], obj logit [B,A,1], cls logits [B,A,C], grid [A,2], stride."""
        out = []
        for head, feat, stride in zip(self.heads, self.neck(self.backbone(x)), self.strides):
            reg, obj, cls = head(feat)
            h, w = feat.shape[-2:]
            out.append((reg.flatten(2).transpose(1, 2), obj.flatten(2).transpose(1, 2),
                        cls.flatten(2).transpose(1, 2), _grid(h, w, reg), stride))
        return out

    def _decode(self, reg: Tensor, grid: Tensor, stride: int) -> Tensor:
        """(dx, dy, log w, log h) -> xyxy pixels: center = (grid + d) * stride, wh = exp(log wh) * stride."""
        center = (reg[..., :2] + grid) * float(stride)  # a float: an int scalar becomes an int64 tensor in PT2E
        half = torch.exp(reg[..., 2:].clamp(max=self.max_log_wh)) * (0.5 * stride)
        return torch.cat([center - half, center + half], -1)

    def forward(self, x: Tensor) -> Tensor:
        """Decoded detections before NMS: [B, N, 4 + C], scores = sigmoid(obj) * sigmoid(cls)."""
        levels = [torch.cat([self._decode(reg, grid, s), torch.sigmoid(obj) * torch.sigmoid(cls)], -1)
                  for reg, obj, cls, grid, s in self._raw(x)]
        return torch.cat(levels, 1)

    def loss(self, x: Tensor, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """YOLOX's loss: SimOTA positives, 5 * IoU loss + objectness BCE + IoU-aware cls BCE, each / num positives.

        ``targets[i]`` holds ``boxes`` [n,4] xyxy in input pixels and ``labels`` [n] int64 (n may be 0). The returned
        ``iou`` already carries its weight, so ``loss == iou + obj + cls``.
        """
        raw = self._raw(x)
        boxes = torch.cat([self._decode(reg, grid, s) for reg, _, _, grid, s in raw], 1)
        obj = torch.cat([r[1] for r in raw], 1)[..., 0]
        cls = torch.cat([r[2] for r in raw], 1)
        centers = torch.cat([(grid + 0.5) * s for _, _, _, grid, s in raw], 0)  # cell centres, as SimOTA's prior
        strides = torch.cat([grid.new_full((grid.shape[0],), float(s)) for _, _, _, grid, s in raw], 0)

        obj_target = torch.zeros_like(obj)
        fg_boxes, fg_targets, fg_cls, fg_cls_targets = [], [], [], []
        for i, tgt in enumerate(targets):
            gt_boxes = tgt["boxes"].to(boxes)
            gt_labels = tgt["labels"].to(torch.int64)
            if gt_boxes.shape[0] == 0:
                continue
            # assignment in fp32 (as YOLOX does under AMP): log costs and IoUs of tiny boxes underflow in fp16
            fg_idx, gt_idx, ious = self._simota(boxes[i].detach().float(), obj[i].detach().float(),
                                                cls[i].detach().float(), centers.float(), strides.float(),
                                                gt_boxes.float(), gt_labels)
            obj_target[i, fg_idx] = 1.0
            fg_boxes.append(boxes[i, fg_idx])
            fg_targets.append(gt_boxes[gt_idx])
            fg_cls.append(cls[i, fg_idx])
            fg_cls_targets.append((F.one_hot(gt_labels[gt_idx], self.num_classes) * ious[:, None]).to(cls))

        num_fg = sum(int(b.shape[0]) for b in fg_boxes)
        norm = float(max(num_fg, 1))
        loss_obj = F.binary_cross_entropy_with_logits(obj, obj_target, reduction="sum") / norm
        if num_fg:
            iou = _aligned_iou(torch.cat(fg_boxes), torch.cat(fg_targets))
            loss_iou = self.iou_weight * (1.0 - iou ** 2).sum() / norm
            loss_cls = F.binary_cross_entropy_with_logits(torch.cat(fg_cls), torch.cat(fg_cls_targets),
                                                          reduction="sum") / norm
        else:  # keep the graph connected so backward() works on a batch without objects
            loss_iou = boxes.sum() * 0.0
            loss_cls = cls.sum() * 0.0
        total = loss_iou + loss_obj + loss_cls
        return {"loss": total, "iou": loss_iou, "obj": loss_obj, "cls": loss_cls,
                "num_fg": obj.new_tensor(float(num_fg)).detach()}

    @torch.no_grad()
    def _simota(self, boxes: Tensor, obj: Tensor, cls: Tensor, centers: Tensor, strides: Tensor,
                gt_boxes: Tensor, gt_labels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """SimOTA for one image -> (positive anchor indices, their gt indices, their IoU with that gt)."""
        gt_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        in_box = ((centers[None] > gt_boxes[:, None, :2]) & (centers[None] < gt_boxes[:, None, 2:])).all(-1)
        radius = self.center_radius * strides[None, :, None]
        in_ctr = ((centers[None] - gt_ctr[:, None]).abs() < radius).all(-1)
        cand = (in_box | in_ctr).any(0).nonzero().squeeze(1)  # anchors inside some box or some centre region
        empty = cand.new_zeros(0)
        if cand.numel() == 0:
            return empty, empty, boxes.new_zeros(0)
        in_both = in_box[:, cand] & in_ctr[:, cand]

        ious = _box_iou(gt_boxes, boxes[cand])  # [G, M]
        # BCE of sqrt(p_cls * p_obj) against the one-hot gt class, summed over classes: sum_c -log(1 - p_c) for all
        # classes, then swap the gt class's term for -log(p_gt). Same value as YOLOX's dense BCE, without [G, M, C].
        p = (torch.sigmoid(cls[cand]) * torch.sigmoid(obj[cand])[:, None]).sqrt()
        neg = -torch.log(1 - p).clamp(min=-100.0)  # BCE's clamp of log at -100
        pos = -torch.log(p).clamp(min=-100.0)
        cls_cost = neg.sum(1)[None] + (pos - neg)[:, gt_labels].T
        cost = cls_cost + 3.0 * -torch.log(ious + 1e-8) + 1e5 * (~in_both).to(ious)

        # dynamic k: each gt takes as many positives as the sum of its 10 best IoUs (at least one)
        k = torch.topk(ious, min(10, ious.shape[1]), dim=1).values.sum(1).int().clamp(min=1)
        rank = torch.empty_like(cost, dtype=torch.long)
        order = cost.argsort(dim=1)
        rank.scatter_(1, order, torch.arange(cost.shape[1], device=cost.device).expand_as(order).contiguous())
        matching = rank < k[:, None]
        # an anchor claimed by several gts goes to the one it costs least
        multi = matching.sum(0) > 1
        if bool(multi.any()):
            best = cost[:, multi].argmin(0)
            matching[:, multi] = F.one_hot(best, cost.shape[0]).T.bool()
        fg = matching.any(0)
        gt_idx = matching[:, fg].int().argmax(0)
        return cand[fg], gt_idx, ious[gt_idx, fg.nonzero().squeeze(1)]


def yolox_nano(num_classes: int = 80, act: str = "silu") -> YOLOX:
    """YOLOX-Nano: depth 0.33, width 0.25, depthwise convs (0.91M parameters at 80 classes)."""
    return YOLOX(num_classes, depth=0.33, width=0.25, depthwise=True, act=act)
