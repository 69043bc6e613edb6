"""CondenseNet: DenseNet with learned group convolutions, deployed as standard group convolutions.

Huang, Liu, van der Maaten & Weinberger, "CondenseNet: An Efficient DenseNet using
Learned Group Convolutions", CVPR 2018, arXiv:1711.09224. ImageNet model
(G = C = 4): 3x3/s2 stem with 16 channels, five dense blocks of [4, 6, 8, 10, 8] layers
with growth rates [8, 16, 32, 64, 128] (exponentially increasing growth, fully dense
connectivity: 2x2 average pooling between blocks, no transition convs), final
BN-ReLU, global pool and the classifier. A dense layer is
BN-ReLU-LGC 1x1 (4k channels) -> BN-ReLU -> channel permutation -> 3x3 group conv
(G groups, k channels), concatenated to its input.

How the learned group convolution (LGC) becomes a standard group conv:

- Training form (``model.train()`` with gradients on): the 1x1 LGC is a dense conv
  whose weight is multiplied by a per-group input mask. Output filters are split into
  G contiguous groups; condensation stage ``s`` (s = 1..C-1) removes, in every group,
  the ``in/C`` still-connected input channels with the smallest summed |weight| over
  the group's filters (the paper's criterion). Stages are triggered by the module's
  own count of optimisation steps (one stage every ``condense_every`` training
  forwards, default 40: the schedule finishes within the first half of edgekit's
  default 4-epoch run on the default task; the paper spreads C-1 stages over the first
  half of training). Masks, stage and step count are buffers, so they are saved with
  the weights.
- Deployed form (``model.eval()``, or any forward without gradients, which is what
  the exporter traces): each group keeps exactly ``in/C`` input channels; the layer
  is a constant-index ``Gather`` of those channels (the index permutation) and one
  ``Conv`` with ``groups=G`` whose weight is the kept slice of the dense weight with
  the following (eval-mode) BN folded in. If training stopped before the last stage, the
  remaining stages are applied (same criterion) when forming the deployed layer, so
  eval/export always see the condensed model; train-mode outputs differ from it only
  until condensation is complete.
- Export form (``freeze_for_export``, called by the TFLite exporter on every module):
  the same deployed layer with constant weights, ``Gather -> depthwise 1x1 Conv`` (the
  input BN, which commutes with the gather) ``-> ReLU -> group Conv`` (following BN
  folded), so PT2E int8 quantizes convs only: no BatchNorm right after the stem conv
  (whose output is also concatenated, which PT2E's conv-BN folding would corrupt) and
  no weight arithmetic in the graph. Eval mode only; ``train()`` drops it.

The paper's channel permutation between the LGC and the 3x3 group conv is placed after
the BN-ReLU that follows the LGC instead of before it (BN and ReLU are per channel, so
this only relabels BN parameters); the BN then folds into the LGC at export and the
permutation exports as Reshape/Transpose/Reshape. The pre-activation BN at the input
of every dense layer (and the final BN) act on concatenated features and precede a
ReLU, so, as in any DenseNet, they stay BatchNormalization nodes (ONNX Runtime's QDQ
quantizer handles them).

Departures: no group-lasso regulariser (edgekit's fit loop takes no per-model loss);
the classifier is a plain Linear, not the paper's condensed linear layer (which
prunes half of its inputs after training without fine-tuning).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ModelSpec, register_model
from .convs import ChannelShuffle, WeightArgConv2d, bn_scale_shift


class LearnedGroupConv(nn.Module):
    """BN-ReLU-1x1 learned group convolution with ``groups`` groups and condensation factor ``condense``."""

    def __init__(self, in_ch: int, out_ch: int, groups: int = 4, condense: int = 4, condense_every: int = 40):
        super().__init__()
        if in_ch % condense or out_ch % groups:
            raise ValueError(f"LearnedGroupConv: C={condense} must divide {in_ch}, G={groups} must divide {out_ch}")
        self.in_ch, self.out_ch, self.groups, self.condense = in_ch, out_ch, groups, condense
        self.condense_every = condense_every
        self.norm = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, 1, 1))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.register_buffer("mask", torch.ones(groups, in_ch))
        self.register_buffer("stage", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.conv = WeightArgConv2d(groups * (in_ch // condense), out_ch, 1, groups=groups)

    # -- condensation ---------------------------------------------------------------------------
    @torch.no_grad()
    def _drop_stage(self, mask: torch.Tensor) -> torch.Tensor:
        """One condensing stage: every group drops its ``in/C`` weakest connected input channels."""
        delta = self.in_ch // self.condense
        score = self.weight.detach().abs()[:, :, 0, 0].view(self.groups, -1, self.in_ch).sum(1)
        score = score.masked_fill(mask == 0, float("inf"))
        weakest = score.argsort(dim=1, stable=True)[:, :delta]
        return mask.scatter(1, weakest, 0.0)

    @torch.no_grad()
    def _advance(self) -> None:
        self.steps += 1
        target = min(self.condense - 1, int(self.steps) // max(1, self.condense_every))
        while int(self.stage) < target:
            self.mask.copy_(self._drop_stage(self.mask))
            self.stage += 1

    @torch.no_grad()
    def deploy_index(self) -> list[list[int]]:
        """Kept input channels per group once all C-1 stages are done (finishing them virtually)."""
        mask = self.mask.clone()
        for _ in range(int(self.stage), self.condense - 1):
            mask = self._drop_stage(mask)
        return [torch.nonzero(row).flatten().tolist() for row in mask]

    @torch.no_grad()
    def export_form(self, bn: Optional[nn.BatchNorm2d] = None) -> tuple[torch.Tensor, ...]:
        """The deployed layer as constant tensors ``(index, pre_weight, pre_bias, weight, bias)`` (eval mode).

        ``x -> Gather(index) -> depthwise 1x1 Conv(pre_weight, pre_bias) -> ReLU -> group Conv(weight, bias)``:
        the input BN-ReLU commutes with the channel gather (both per channel), so it runs on the gathered
        channels as a depthwise 1x1 convolution, and ``bn`` (eval mode) is folded into the group conv. Same
        values as the deployed forward; every weight is one constant and there is no BatchNorm node, so PT2E
        quantizes each conv as a conv (no parameter arithmetic left in the graph for it to annotate, and no
        conv -> BatchNorm pair for it to fold into a conv whose output is also concatenated).
        """
        keep = self.deploy_index()
        index = torch.tensor([c for row in keep for c in row], dtype=torch.long, device=self.weight.device)
        scale, shift = bn_scale_shift(self.norm)
        d = self.out_ch // self.groups
        weight = torch.cat([self.weight[g * d:(g + 1) * d, row] for g, row in enumerate(keep)], 0)
        bias = None
        if bn is not None:
            post_scale, bias = bn_scale_shift(bn)
            weight = weight * post_scale[:, None, None, None]
        return (index, scale[index].reshape(-1, 1, 1, 1).clone(), shift[index].clone(), weight.clone(),
                None if bias is None else bias.detach().clone())

    def freeze_for_export(self, bn: Optional[nn.BatchNorm2d] = None) -> None:
        """Fix the deployed layer as constants for ``torch.export`` (litert-torch, PT2E); ``bn`` as in ``forward``.

        ``deploy_index`` reads the ``stage``/``mask`` buffers (``int()``, ``nonzero``): data-dependent control flow
        that ``torch.export`` cannot trace. Freezing stores the index and :meth:`export_form` for ``bn`` (a layer
        may be frozen for several ``bn``; ``forward`` uses the form frozen for the ``bn`` it is given). Only
        eval-mode forwards use it; cleared by ``train()`` and by loading a state dict.
        """
        self._frozen_keep = self.deploy_index()
        forms = [(b, f) for b, f in (getattr(self, "_frozen_forms", None) or []) if b is not bn]
        self._frozen_forms = forms + [(bn, self.export_form(bn))]

    def train(self, mode: bool = True):
        self._frozen_keep = None
        self._frozen_forms = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._frozen_keep = None
        self._frozen_forms = None
        return super()._load_from_state_dict(*args, **kwargs)

    @property
    def condensed(self) -> bool:
        return int(self.stage) >= self.condense - 1

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, bn: Optional[nn.BatchNorm2d] = None) -> torch.Tensor:
        """Training form when training with gradients, else the deployed form.

        ``bn``: an eval-mode BatchNorm that follows this layer, folded into the deployed conv.
        """
        if not self.training and (bn is None or not bn.training):
            form = next((f for b, f in (getattr(self, "_frozen_forms", None) or []) if b is bn), None)
            if form is not None:
                index, pre_weight, pre_bias, weight, bias = form
                x = F.conv2d(x.index_select(1, index), pre_weight, pre_bias, groups=index.numel())
                return self.conv(self.relu(x), weight, bias)
        x = self.relu(self.norm(x))
        if self.training and torch.is_grad_enabled():
            self._advance()
            mask = self.mask.repeat_interleave(self.out_ch // self.groups, 0)
            y = F.conv2d(x, self.weight * mask[:, :, None, None])
            return y if bn is None else bn(y)
        keep = getattr(self, "_frozen_keep", None) or self.deploy_index()
        d = self.out_ch // self.groups
        index = torch.tensor([c for row in keep for c in row], dtype=torch.long, device=x.device)
        weight = torch.cat([self.weight[g * d:(g + 1) * d, row] for g, row in enumerate(keep)], 0)
        x = x.index_select(1, index)
        if bn is None:
            return self.conv(x, weight)
        if bn.training:
            return bn(self.conv(x, weight))
        scale, shift = bn_scale_shift(bn)
        return self.conv(x, weight * scale[:, None, None, None], shift)

    def extra_repr(self) -> str:
        return (f"{self.in_ch}, {self.out_ch}, groups={self.groups}, condense={self.condense}, "
                f"condense_every={self.condense_every}")


class DenseLayer(nn.Module):
    def __init__(self, in_ch: int, growth: int, groups: int, condense: int, bottleneck: int, condense_every: int):
        super().__init__()
        mid = bottleneck * growth
        self.lgc = LearnedGroupConv(in_ch, mid, groups, condense, condense_every)
        self.norm = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.shuffle = ChannelShuffle(groups)
        self.conv = nn.Conv2d(mid, growth, 3, 1, 1, groups=groups, bias=False)

    def freeze_for_export(self) -> None:
        """Freeze the LGC's export form with this layer's BN folded in (see ``LearnedGroupConv.freeze_for_export``)."""
        self.lgc.freeze_for_export(self.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.shuffle(self.relu(self.lgc(x, self.norm))))
        return torch.cat([x, y], 1)


class CondenseNet(nn.Module):
    def __init__(self, num_classes: int = 1000, stages=(4, 6, 8, 10, 8), growth=(8, 16, 32, 64, 128),
                 groups: int = 4, condense: int = 4, bottleneck: int = 4, condense_every: int = 40):
        super().__init__()
        ch = 2 * growth[0]
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 3, 2, 1, bias=False)]
        for i, (n, k) in enumerate(zip(stages, growth)):
            if i > 0:
                layers.append(nn.AvgPool2d(2, 2))
            for _ in range(n):
                layers.append(DenseLayer(ch, k, groups, condense, bottleneck, condense_every))
                ch += k
        layers += [nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def condensation_complete(model: nn.Module) -> bool:
    """True when every learned group conv has finished its C-1 condensing stages."""
    return all(m.condensed for m in model.modules() if isinstance(m, LearnedGroupConv))


register_model(ModelSpec(
    name="condensenet-g4c4", family="condensenet", source="edgekit", paper="Huang et al. 2017, arXiv:1711.09224",
    build=lambda n: CondenseNet(n), classifier="classifier", aliases=("condensenet",),
    reference={"params_m": 4.8, "macs_m": 529},
    notes="ImageNet CondenseNet, G=C=4, stages 4-6-8-10-8, growth 8-16-32-64-128. Learned group convs "
          "condense during training (one stage per 40 steps) and are deployed as Gather + group Conv. "
          "Checked in deployed form against Table 5 (4.8M params, 529M MACs) within ±10%.",
))


def deployed_params(model: nn.Module) -> int:
    """Parameters of the deployed (condensed) model: each LGC keeps ``1/C`` of its dense 1x1 weight."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, LearnedGroupConv):
            total -= m.weight.numel() - m.out_ch * (m.in_ch // m.condense)
    return total
