"""Every zoo entry through the int8 pipeline: build → train → ONNX fp32 → ORT int8 → accuracy on the task.

A CI-sized run (32x32 MNIST, two epochs; the two EfficientNets as edgekit trains by default): the point is that each architecture trains, exports and
quantizes without losing its accuracy, not the accuracy a full run reaches (bench/int8_speed.py gives
that). Outcomes feed the zoo matrix (see conftest.py and ``edgekit zoo list``).
"""

from __future__ import annotations

import pytest

from edgekit import zoo
from edgekit.config import Recipe, TrainSpec, load_device
from edgekit.pipeline import VariantSpec, evaluate, export_variants, get_baseline, load_runners

SPECS = [s.name for s in zoo.list_models()]
QUICK = Recipe(name="zoo-matrix", train=TrainSpec(epochs=2))
# EfficientNet-B0 and EfficientNetV2-B0 (SiLU, squeeze-excitation) are checked as edgekit trains them by default:
# 64 px, four epochs, the architecture's stochastic depth. Two or three epochs at 32 px leave their logits so close
# together that int8 changes 5-30% of the answers, and how many of them are wrong depends on the trajectory: runs
# that differ only in float rounding (NCHW vs channels_last training, 3 vs 4 epochs) lost 0 to 14 points. In the
# default configuration both stay within 0.5 point of fp32 (agreement 0.99).
DEFAULT_RUN = {"efficientnet-b0", "efficientnetv2-b0"}
MIN_TOP1 = 0.2  # 10 classes: chance is 0.1 (±0.01 on 1,000 images). Two epochs at 32 px leave the slow learners
# (SqueezeNet at its low learning rate, the stride-32 nets whose last map is 1x1) near 0.3; most reach 0.6-0.9.
MAX_DROP_PP = 3.0  # int8 vs fp32 on 1,000 images of a short run (the full-size run holds 0.5 pp: bench/int8_speed.py)


@pytest.mark.slow
@pytest.mark.zoo_matrix("int8")
@pytest.mark.parametrize("name", SPECS)
def test_trains_exports_and_quantizes(name, small_task, mnist_task, tmp_path, record_property):
    """The int8 recipe's quantization (calibration and op scope chosen on the calibration split)."""
    task, recipe = (mnist_task, Recipe(name="zoo-matrix")) if name in DEFAULT_RUN else (small_task, QUICK)
    model, info = get_baseline(name, task, recipe=recipe)
    assert info["source"] == "trained"
    # the pipeline's own stages: the exporter quantizes as the desktop-cpu profile asks (calibration and op scope
    # auto on 64 calibration images; no latency search, this is about accuracy)
    specs = [VariantSpec("baseline", "onnx", "fp32"),
             VariantSpec("baseline", "onnx", "int8", {"num_calib": 64, "search": "none"})]
    variants = export_variants({"baseline": model}, specs, task, load_device("desktop-cpu"), tmp_path,
                               model_label=name)
    evaluate(variants, load_runners(variants, threads=1), task)
    fp32, int8 = variants
    assert int8.status == "ok", int8.error
    acc = {"fp32": fp32.accuracy, "int8": int8.accuracy}
    record_property("top1_fp32", round(acc["fp32"], 4))
    record_property("top1_int8", round(acc["int8"], 4))
    record_property("agreement_int8", int8.agreement)
    record_property("int8_config", int8.info["quantization"]["config"])
    assert acc["fp32"] >= MIN_TOP1, f"{name} did not train: top-1 {acc['fp32']:.3f}"
    assert 100 * (acc["fp32"] - acc["int8"]) <= MAX_DROP_PP, acc
    assert int8.agreement is not None
