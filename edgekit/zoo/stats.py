"""Parameter and multiply-accumulate counts (conv, linear) by forward hooks."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: Tuple[int, ...]) -> int:
    """MACs of one forward pass: convolutions and linear layers (the standard convention)."""
    total = 0

    def conv_hook(mod: nn.Conv2d, _inp, out):
        nonlocal total
        kh, kw = mod.kernel_size
        total += out.numel() // out.shape[0] * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod: nn.Linear, inp, out):
        nonlocal total
        total += out.numel() // out.shape[0] * mod.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros((1,) + tuple(input_shape[-3:])))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total


def model_stats(model: nn.Module, input_shape: Tuple[int, ...]) -> dict:
    return {"params": count_params(model), "macs": count_macs(model, input_shape)}
