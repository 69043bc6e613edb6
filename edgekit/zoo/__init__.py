"""The model zoo: one registry table of lightweight CNNs.

``create(name, num_classes, in_chans, pretrained, weights)`` follows timm's
``create_model``. Each entry says where the architecture comes from, the paper,
its native input size and where pretrained weights can be found.
"""

from __future__ import annotations

import importlib

# The registry imports torch; the family modules (timm, torchvision) load on the first lookup. Importing
# ``edgekit.zoo`` itself stays cheap, so the CLI can check names from index.json first.
_LAZY = {"ModelSpec": "registry", "create": "registry", "get_spec": "registry", "list_models": "registry",
         "register_model": "registry", "count_macs": "stats", "count_params": "stats", "model_stats": "stats"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
