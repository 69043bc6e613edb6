"""YOLOX-Nano: the paper's size, the decoded output, ONNX parity and a loss that actually teaches boxes and classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekit.detect.yolox import YOLOX, _box_iou, yolox_nano


def _anchors(size: int) -> int:
    return sum((size // s) ** 2 for s in YOLOX.strides)


def _perturb_bn(model: torch.nn.Module) -> None:
    """Non-trivial running statistics, so an eval-mode comparison exercises the BN folding of the exporter."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)


_COLOURS = torch.tensor([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.2, 1.0]])  # class -> rectangle colour


def _scene(rects):
    """A 128 px dark image with bright rectangles whose colour is their class."""
    img = torch.full((3, 128, 128), 0.05)
    for (x1, y1, x2, y2), c in rects:
        img[:, y1:y2, x1:x2] = _COLOURS[c][:, None, None]
    boxes = torch.tensor([r[0] for r in rects], dtype=torch.float32)
    return img, {"boxes": boxes, "labels": torch.tensor([r[1] for r in rects], dtype=torch.int64)}


def _no_targets():
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def test_nano_has_the_papers_parameter_count():
    n = sum(p.numel() for p in yolox_nano(num_classes=80).parameters())
    assert abs(n - 0.91e6) / 0.91e6 < 0.05, n


@pytest.mark.parametrize("size,act", [(128, "silu"), (160, "silu"), (128, "relu"), (128, "relu6"), (128, "hswish")])
def test_output_is_decoded_boxes_and_scores(size, act):
    torch.manual_seed(0)
    model = yolox_nano(num_classes=7, act=act).eval()
    with torch.no_grad():
        y = model(torch.rand(2, 3, size, size))
    assert y.shape == (2, _anchors(size), 4 + 7)
    assert torch.isfinite(y).all()
    assert (y[..., 4:] >= 0).all() and (y[..., 4:] <= 1).all()
    assert (y[..., 2] >= y[..., 0]).all() and (y[..., 3] >= y[..., 1]).all()  # x1y1x2y2, not cxcywh


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="activation"):
        yolox_nano(act="gelu")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's, the one edgekit uses
@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["torchscript", "dynamo"])
def test_onnx_export_matches_torch(tmp_path, dynamo):
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = yolox_nano(num_classes=5).eval()
    _perturb_bn(model)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        ref = model(x).numpy()
    path = tmp_path / "yolox.onnx"
    torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=dynamo, input_names=["images"],
                      output_names=["detections"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert out.shape == ref.shape
    np.testing.assert_allclose(out[..., 4:], ref[..., 4:], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out[..., :4], ref[..., :4], atol=1e-2, rtol=1e-4)  # pixels


def test_loss_is_finite_with_and_without_targets():
    torch.manual_seed(0)
    model = yolox_nano(num_classes=3).train()
    img, tgt = _scene([((8, 10, 48, 60), 0), ((70, 20, 120, 50), 1), ((40, 80, 100, 118), 2)])
    x = torch.stack([img, torch.full_like(img, 0.05)])
    for targets in ([tgt, _no_targets()], [_no_targets(), _no_targets()]):
        out = model.loss(x, targets)
        assert set(out) == {"loss", "iou", "obj", "cls", "num_fg"}
        assert all(torch.isfinite(v) for v in out.values())
        assert torch.allclose(out["loss"], out["iou"] + out["obj"] + out["cls"])
        out["loss"].backward()  # also without any positive: the graph stays connected
        model.zero_grad()
    assert float(model.loss(x, [tgt, _no_targets()])["num_fg"]) >= 3  # every separate box gets a positive


def test_simota_keeps_positives_near_their_box_and_one_gt_per_anchor():
    torch.manual_seed(0)
    model = yolox_nano(num_classes=3)
    size = 128
    raw = model._raw(torch.rand(1, 3, size, size))
    boxes = torch.cat([model._decode(r, g, s) for r, _, _, g, s in raw], 1)[0].detach()
    obj = torch.cat([r[1] for r in raw], 1)[0, :, 0].detach()
    cls = torch.cat([r[2] for r in raw], 1)[0].detach()
    centers = torch.cat([(g + 0.5) * s for _, _, _, g, s in raw])
    strides = torch.cat([g.new_full((g.shape[0],), float(s)) for _, _, _, g, s in raw])
    gt = torch.tensor([[10.0, 10.0, 60.0, 50.0], [50.0, 40.0, 120.0, 120.0]])
    fg, gt_idx, ious = model._simota(boxes, obj, cls, centers, strides, gt, torch.tensor([0, 1]))
    assert fg.unique().numel() == fg.numel()  # one gt per anchor
    assert set(gt_idx.tolist()) == {0, 1}
    ctr = (gt[gt_idx, :2] + gt[gt_idx, 2:]) / 2
    near = ((centers[fg] - ctr).abs() < 2.5 * strides[fg, None]).all(1)
    inside = ((centers[fg] > gt[gt_idx, :2]) & (centers[fg] < gt[gt_idx, 2:])).all(1)
    assert (near | inside).all()
    torch.testing.assert_close(ious, _box_iou(boxes[fg], gt).gather(1, gt_idx[:, None])[:, 0])
    far = torch.tensor([[-400.0, -400.0, -380.0, -380.0]])  # no anchor inside it or near its centre
    assert model._simota(boxes, obj, cls, centers, strides, far, torch.tensor([2]))[0].numel() == 0


@pytest.mark.slow
def test_short_overfit_learns_boxes_and_classes():
    torch.manual_seed(0)
    a, ta = _scene([((8, 10, 48, 60), 0), ((70, 20, 120, 50), 1), ((40, 80, 100, 118), 2)])
    b, tb = _scene([((20, 30, 80, 90), 2), ((90, 90, 124, 124), 0)])
    x, targets = torch.stack([a, b]), [ta, tb]
    model = yolox_nano(num_classes=3).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        out = model.loss(x, targets)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.4 * losses[0], (losses[0], losses[-1])
    # Read the net with batch statistics, as it was fit: 100 steps at YOLOX's BN momentum (0.03) leave the running
    # statistics far from this batch's, which is a question for calibration, not for the loss.
    with torch.no_grad():
        y = model(x)
    for det, tgt in zip(y, targets):
        scores = det[:, 4:]
        best = scores.max(1).values.argmax()
        iou = _box_iou(det[best, None, :4], tgt["boxes"])[0]
        k = int(iou.argmax())
        assert float(iou[k]) > 0.5, float(iou[k])
        assert int(scores[best].argmax()) == int(tgt["labels"][k])
