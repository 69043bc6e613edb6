"""The model zoo: one registry table of lightweight CNNs.

``create(name, num_classes, in_chans, pretrained, weights)`` follows timm's
``create_model``. Each entry says where the architecture comes from, the paper,
its native input size and where pretrained weights can be found.
"""

from __future__ import annotations

from .registry import ModelSpec, create, get_spec, list_models, register_model  # noqa: F401
from .stats import count_macs, count_params, model_stats  # noqa: F401

# Importing the family modules fills the registry table.
from . import torchvision_models, timm_models  # noqa: F401,E402
from . import own  # noqa: F401,E402
