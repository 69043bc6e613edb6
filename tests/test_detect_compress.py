"""prune and distill on detectors: the prediction convs never lose a channel, the pruned graph still decodes
boxes and exports, and distillation pulls a pruned student's prediction maps towards its baseline's."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgekit import zoo
from edgekit.config import load_device
from edgekit.errors import EdgekitError
from edgekit.steps.registry import StepContext, build_step
from edgekit.zoo import count_macs


def _prune(model, name, **params):
    ctx = StepContext(task=None, baseline=model, model_name=name, device=load_device("desktop-cpu"))
    step = build_step("prune", {"macs": 0.5, "iterations": 1, "finetune_epochs": 0, **params})
    return step.apply(copy.deepcopy(model), ctx), ctx


@pytest.mark.parametrize("name,size,blocks", [("yolox-nano", 64, 0.7), ("ssdlite-mobilenetv3", 96, 0.0)])
def test_prune_keeps_a_detectors_prediction_convs(name, size, blocks, tmp_path):
    from edgekit.export.onnx import export_onnx
    from edgekit.runtime import load_runner

    torch.manual_seed(0)
    model = zoo.create(name, num_classes=3, input_size=size).eval()
    pruned, ctx = _prune(model, name, blocks=blocks)
    heads = [(m.in_channels, m.out_channels) for m in model.output_layers()]
    kept = [(m.in_channels, m.out_channels) for m in pruned.output_layers()]
    assert [o for _, o in kept] == [o for _, o in heads]  # boxes, objectness and classes per anchor
    assert sum(i for i, _ in kept) < sum(i for i, _ in heads)  # the branches feeding them did lose channels
    shape = (3, size, size)
    assert count_macs(pruned, shape) <= 0.52 * count_macs(model, shape)
    x = torch.rand(2, *shape)
    with torch.no_grad():
        want = pruned(x)
    assert want.shape == model(x).shape and torch.isfinite(want).all()
    path = export_onnx(pruned, tmp_path / "p.onnx", (1, *shape))
    got = load_runner("onnxruntime", path, threads=1).run(x[:1].numpy())
    np.testing.assert_allclose(got, want[:1].numpy(), rtol=1e-3, atol=1e-3)
    if blocks:
        assert ctx.info["prune"]["blocks"]["removed"], ctx.info["prune"]


@pytest.mark.slow
def test_distill_pulls_a_pruned_detector_towards_its_baseline():
    from edgekit.detect.data import digits_detect_task
    from edgekit.detect.train import fit_detector, mimic_loss
    from edgekit.train import FitConfig

    task = digits_detect_task(num_train=192, num_calib=8, num_eval=8)
    torch.manual_seed(0)
    teacher = zoo.create("yolox-nano", num_classes=10, input_size=task.input_size)
    fit_detector(teacher, task, FitConfig(epochs=1, lr=2e-3, batch_size=32))
    student, _ = _prune(teacher, "yolox-nano", macs=0.6)
    # alpha 1: the mimic term alone, so its fall is the thing measured
    info = fit_detector(student, task, FitConfig(epochs=4, lr=4e-3, batch_size=32, alpha=1.0), teacher=teacher)
    assert info["alpha"] == 1.0 and info["mimic_last"] < 0.8 * info["mimic_first"], info
    assert not student.training and not any(m._forward_hooks for m in student.modules())  # the taps are gone
    with pytest.raises(EdgekitError, match="prediction maps do not match"):
        mimic_loss([torch.zeros(1, 3, 4, 4)], [torch.zeros(1, 4, 4, 4)])


@pytest.mark.parametrize("params", [{"teacher": "mobilenetv2"}, {"feature_weight": 1.0}])
def test_distill_refuses_classifier_options_on_a_detector(params):
    from edgekit.detect.data import digits_detect_task

    task = digits_detect_task(num_train=8, num_calib=4, num_eval=4)
    model = zoo.create("yolox-nano", num_classes=10, input_size=task.input_size)
    ctx = StepContext(task=task, baseline=model, model_name="yolox-nano", device=load_device("desktop-cpu"))
    with pytest.raises(EdgekitError, match="'teacher' and 'feature_weight' apply to classifiers"):
        build_step("distill", {"epochs": 1, **params}).apply(copy.deepcopy(model), ctx)
