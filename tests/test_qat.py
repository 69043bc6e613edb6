"""QAT: the exported int8 files compute what the fake-quantized torch model computed, with the scales it learned."""

from __future__ import annotations
import copy

import numpy as np
import pytest
import torch
from torch import nn

from edgekit.export.qat import export_qat_onnx, prepare_qat
from edgekit.runtime import load_runner

SHAPE = (1, 3, 32, 32)


class Tiny(nn.Module):
    """Conv-BN-ReLU, a depthwise residual block (Add), a strided conv with ReLU6, pooling, a linear classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU6())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.down(torch.relu(x + self.dw(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def trained_qat(**kw):
    """A calibrated QAT model after a few steps that move its weights and ranges; (model, its float source)."""
    torch.manual_seed(0)
    m = Tiny().train()
    with torch.no_grad():
        for _ in range(3):  # BatchNorm statistics that are not the identity
            m(torch.randn(16, *SHAPE[1:]) * 2)
    m.eval()
    with torch.no_grad():
        m.stem[0].weight[0].abs_()  # a channel of one sign: its weights must still be symmetric (zero point 0)
    qm = prepare_qat(m, SHAPE, **kw)
    qm.calibrate(torch.randn(16, *SHAPE[1:]) for _ in range(4))
    before = {k: v.clone() for k, v in qm.state_dict().items() if k.endswith(".scale")}
    qm.train()
    opt = torch.optim.SGD(qm.parameters(), lr=0.05)
    for _ in range(6):
        x = torch.randn(16, *SHAPE[1:])
        loss = (qm(x) - m(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    qm.eval()
    moved = [k for k, v in qm.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert moved, "training moved no scale: the test would not show that learned scales are exported"
    return qm, m


def run(path, runtime, x):
    r = load_runner(runtime, path, threads=1)
    return np.concatenate([r.run(x[i:i + 1]) for i in range(len(x))])


def float_logits_tolerance(qm) -> float:
    """With float logits: every input of the logits layer one quantum off, through its int8 weights."""
    conv = qm.converted()
    nodes = {n.name: n for n in conv.graph.nodes}
    linear = next(n for n in nodes.values() if n.target == torch.ops.aten.linear.default)
    x_dq = linear.args[0]
    s_x = float(x_dq.args[1] if not hasattr(x_dq.args[1], "op") else getattr(conv, x_dq.args[1].target))
    w = conv.fc.weight.detach()
    return s_x * float(w.abs().sum(1).max()) * 1.01


def test_qdq_onnx_and_tflite_reproduce_the_fake_quant_model_within_one_quantum(tmp_path):
    """uint8 activations (the x86 layout), 7-bit per-channel weights, int8 logits: one quantum of the logits."""
    qm, _ = trained_qat(per_channel=True, reduce_range=True, activation_type="uint8", int8_logits=True)
    x = torch.randn(48, *SHAPE[1:]) * 1.5
    with torch.no_grad():
        ref = qm(x).numpy()
    scale = qm.output_scale()
    assert scale is not None and scale < np.abs(ref).max() / 20  # a quantum is small next to the logits
    onnx_path = export_qat_onnx(qm, tmp_path / "q.onnx", SHAPE, "uint8")
    got = run(onnx_path, "onnxruntime", x.numpy())
    assert np.abs(got - ref).max() <= scale * 1.0001
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.95

    import onnx

    g = onnx.load(str(onnx_path)).graph
    inits = {i.name: i for i in g.initializer}
    dq_inputs = [inits[n.input[0]] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    types = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in dq_inputs}
    assert {np.dtype(np.int8), np.dtype(np.int32)} <= types  # int8 weights and int32 biases stored, not float
    w = [onnx.numpy_helper.to_array(t) for t in dq_inputs if t.data_type == onnx.TensorProto.INT8]
    assert max(int(np.abs(a).max()) for a in w) <= 64  # 7-bit weights
    w_zps = [onnx.numpy_helper.to_array(inits[n.input[2]]) for n in g.node if n.op_type == "DequantizeLinear"
             and n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert w_zps and all(not z.any() for z in w_zps)  # symmetric, as int8 kernels require
    zps = [onnx.numpy_helper.to_array(inits[n.input[2]]) for n in g.node
           if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert zps and all(z.dtype == np.uint8 for z in zps)
    # the learned input scale is in the file, not one ORT calibrated
    q_in = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    s_in = float(onnx.numpy_helper.to_array(inits[q_in.input[1]]))
    assert s_in == pytest.approx(float(qm.graph.activation_post_process_0.scale), rel=1e-6)
    # conv+ReLU6 is observed after the clip, so ORT drops the Clip and every conv runs as an int8 kernel
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") == 4 and "Conv" not in ops and "Clip" not in ops, ops

    from edgekit.export.qat import convert_qat_tflite

    convert_qat_tflite(qm, tmp_path / "q.tflite", SHAPE)
    got = run(tmp_path / "q.tflite", "litert", x.numpy())
    assert np.abs(got - ref).max() <= scale * 1.0001


def test_float_logits_int8_activations_per_tensor(tmp_path):
    """int8 activations (ARM), per-tensor weights, float logits, NHWC TFLite: within one input quantum of the
    logits layer through its weights."""
    qm, _ = trained_qat(per_channel=False, reduce_range=False, activation_type="int8", int8_logits=False)
    assert qm.output_scale() is None
    x = torch.randn(48, *SHAPE[1:])
    with torch.no_grad():
        ref = qm(x).numpy()
    tol = float_logits_tolerance(qm)
    assert tol < np.abs(ref).max() / 4  # the bound is tighter than the logits themselves
    got = run(export_qat_onnx(qm, tmp_path / "q.onnx", SHAPE, "int8"), "onnxruntime", x.numpy())
    assert np.abs(got - ref).max() <= tol

    from edgekit.export.qat import convert_qat_tflite

    convert_qat_tflite(qm, tmp_path / "q.tflite", SHAPE, nhwc=True)  # NHWC input, as cameras deliver it
    got = run(tmp_path / "q.tflite", "litert", x.numpy())  # the runner transposes NCHW input itself
    assert np.abs(got - ref).max() <= tol


def test_recipe_checking_knows_the_step_without_torch():
    from edgekit.errors import EdgekitError
    from edgekit.steps.params import STEP_PARAMS

    p = STEP_PARAMS.get("qat").model_validate({"epochs": 0.5})
    assert (p.teacher, p.alpha, p.int8_logits) == ("baseline", 1.0, False)
    from edgekit.steps import build_step

    with pytest.raises(EdgekitError, match="teacher"):
        build_step("qat", {"teacher": "resnet18"})
    from types import SimpleNamespace

    from edgekit.steps import validate_steps

    specs = [SimpleNamespace(kind="qat", params={}), SimpleNamespace(kind="svd", params={})]
    with pytest.raises(EdgekitError, match="'qat' must be the last step"):
        validate_steps(specs)
    assert len(validate_steps(specs[::-1])) == 2


QAT_RECIPE = """description: qat test recipe
train: {epochs: 1}
steps:
  - qat: {epochs: 0.2, num_calib: 64}
variants:
  - {format: onnx, precision: int8, options: {search: none}}
  - {format: tflite, precision: int8}
accuracy_budget_pp: 5.0
"""


@pytest.mark.slow
def test_compress_with_a_qat_step_exports_the_learned_scales(tmp_path):
    """``edgekit compress`` with a qat step (~50 s on 2 shared cores): both int8 files, the step in report.json."""
    import json

    from typer.testing import CliRunner

    from edgekit.cli import app

    recipe = tmp_path / "qat.yaml"
    recipe.write_text(QAT_RECIPE)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["compress", "shufflenetv2-x0.5", "--recipe", str(recipe), "--input-size", "32",
                                   "--out", str(out), "--runs", "10"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    step = r["steps"][0]
    assert step["kind"] == "qat" and step["teacher"] == "fp32 baseline" and step["scheme"]["per_channel"] is True
    by_format = {v["format"]: v for v in r["variants"] if v["precision"] == "int8"}
    assert set(by_format) == {"onnx", "tflite"}
    for v in by_format.values():
        assert v["status"] == "ok", v
        assert v["details"]["quantization"]["tool"].startswith("QAT, learned scales")
        # the files compute what the trained fake-quant model computed: the same accuracy within a few images
        assert abs(v["accuracy"] - step["acc_after"]) <= 0.02, (v["accuracy"], step)
    assert (out / by_format["onnx"]["path"]).is_file() and (out / by_format["tflite"]["path"]).is_file()


QAT_TORCHRUN = """
import sys
from pathlib import Path
import torch
from edgekit import distributed, zoo
from edgekit.data import load_task
from edgekit.steps import StepContext, build_step
from edgekit.train import recording

out = Path(sys.argv[1])
task = load_task("mnist", input_size=32)
torch.manual_seed(0)
baseline = zoo.create("shufflenetv2-x0.5", num_classes=10).eval()
ctx = StepContext(task=task, baseline=baseline, model_name="shufflenetv2-x0.5", device=None)
with recording() as log:
    step = build_step("qat", {"epochs": 0.05, "num_calib": 32, "evaluate": False})
    qm = step.apply(baseline, ctx)
torch.save({"state": qm.state_dict(), "training": log.summary()}, out / f"rank{distributed.rank()}.pt")
distributed.shutdown()
"""


@pytest.mark.slow
def test_qat_under_torchrun_keeps_the_ranks_identical(tmp_path):
    """DDP over the fake-quantized graph (gloo, 2 processes, ~40 s): weights and learned scales agree on both ranks."""
    from test_distributed import torchrun

    script = tmp_path / "job.py"
    script.write_text(QAT_TORCHRUN)
    res = torchrun([script, tmp_path], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["training"]["world_size"] == 2 and r0["training"]["fits"][-1]["description"] == "qat"
    assert r0["state"].keys() == r1["state"].keys()
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert any(k.endswith(".scale") for k in r0["state"])


@pytest.mark.slow
def test_qat_on_few_images_says_so_and_says_when_training_lowered_agreement(small_task):
    """64 training images and a learning rate that wrecks the model: both notes, figures from the step's own
    before / after scores on the eval split (the step never undoes training on what it scored with)."""
    import dataclasses

    from torch.utils.data import Subset

    from edgekit.steps import StepContext, build_step

    task = dataclasses.replace(small_task, splits={**small_task.splits,
                                                   "train": Subset(small_task.splits["train"], range(64))})
    from edgekit.train import FitConfig, fit

    torch.manual_seed(0)
    model = fit(Tiny(), task, FitConfig(epochs=30, lr=1e-2)).eval()  # a baseline whose answers differ by image
    ctx = StepContext(task=task, baseline=copy.deepcopy(model), model_name="tiny", device=None)
    build_step("qat", {"epochs": 2, "lr": 1.0, "teacher": "none", "num_calib": 64}).apply(model, ctx)
    info = ctx.info["qat"]
    assert info["train_images"] == 64
    assert any("fine-tuned on 64 training images" in n for n in ctx.notes), ctx.notes
    assert info["agreement_after"] < info["agreement_before"], info
    lowered = next(n for n in ctx.notes if "training lowered" in n)
    assert f"{info['agreement_before']:.1%} -> {info['agreement_after']:.1%}" in lowered
