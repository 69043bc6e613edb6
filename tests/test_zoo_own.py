"""edgekit's own architectures (``source == "edgekit"``): build, run at the task size, match the
papers' parameter/MAC figures at 224x224, export to ONNX and match torch in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgekit import zoo
from edgekit.export.onnx import export_onnx
from edgekit.runtime import load_runner
from edgekit.zoo.own.condensenet import CondenseNet, LearnedGroupConv, condensation_complete, deployed_params
from edgekit.zoo.own.convs import DualConv, HetConv
from edgekit.zoo.own.micronet import StaticShiftMax, _shift_index

torch.set_num_threads(1)

OWN = [s for s in zoo.list_models() if s.source == "edgekit"]
OWN_NAMES = [s.name for s in OWN]
WITH_REFERENCE = [s.name for s in OWN if s.reference]

# Allowed relative deviation (below, above) of our count from the paper's figure. Default ±10%;
# the exceptions are explained in each entry's ModelSpec.notes and module docstring.
DEFAULT_TOL = (0.10, 0.10)
TOLERANCE = {
    # Table 1's own layers give ~468M; the published 407M is not reproducible (params match).
    ("channelnet-v1", "macs_m"): (0.10, 0.20),
    # static Shift-Max has no dynamic-coefficient MLPs (~0.23M of the paper's 1.8M).
    ("micronet-m1", "params_m"): (0.20, 0.05),
    # the paper's 4.8M also prunes half the inputs of the 1000-way classifier (1.03M); we do not.
    ("condensenet-g4c4", "params_m"): (0.10, 0.25),
}


def test_own_entries_are_registered():
    expected = {"shufflenetv1-g3", "shufflenetv1-g8", "squeezenext-1.0-23", "igcv3", "channelnet-v1", "micronet-m1",
                "condensenet-g4c4", "vgg16-hetconv-p4", "vgg16-dualconv-g4"}
    assert expected <= set(OWN_NAMES)
    for spec in OWN:
        assert spec.paper and spec.classifier and spec.notes
        assert set(spec.reference) <= {"params_m", "macs_m"}
    for (name, key) in TOLERANCE:
        assert key in zoo.get_spec(name).reference


@pytest.mark.parametrize("name", OWN_NAMES)
def test_builds_and_runs_at_task_size(name):
    torch.manual_seed(0)
    model = zoo.create(name, num_classes=10)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    head = model.get_submodule(zoo.get_spec(name).classifier)
    assert isinstance(head, nn.Linear) and head.out_features == 10
    gray = zoo.create(name, num_classes=10, in_chans=1)
    with torch.no_grad():
        assert gray(torch.randn(1, 1, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_paper_figures_at_224(name):
    spec = zoo.get_spec(name)
    model = spec.build(1000)
    stats = zoo.model_stats(model, (3, 224, 224))
    ours = {"params_m": deployed_params(model) / 1e6, "macs_m": stats["macs"] / 1e6}
    for key, paper in spec.reference.items():
        below, above = TOLERANCE.get((name, key), DEFAULT_TOL)
        assert paper * (1 - below) <= ours[key] <= paper * (1 + above), \
            f"{name} {key}: {ours[key]:.3f} vs paper {paper} (allowed -{below:.0%}/+{above:.0%})"


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics, so that BN folding at export is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.mark.slow
@pytest.mark.parametrize("name", OWN_NAMES)
def test_onnx_export_matches_torch(name, tmp_path):
    torch.manual_seed(0)
    model = zoo.create(name, num_classes=10)
    _randomize_bn(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x).numpy()
    path = export_onnx(model, tmp_path / f"{name}.onnx", (1, 3, 64, 64))
    got = load_runner("onnxruntime", path, threads=1).run(x.numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    allowed = {"Conv", "Relu", "Clip", "HardSwish", "Add", "Concat", "Reshape", "Transpose", "MaxPool",
               "AveragePool", "GlobalAveragePool", "Flatten", "Gemm", "Gather"}
    if name.startswith("condensenet"):
        allowed.add("BatchNormalization")  # DenseNet's pre-activation BN (after concatenation) cannot fold
    assert ops <= allowed, f"{name} exports {sorted(ops - allowed)}"


def test_condensenet_condenses_during_training_and_deploys_group_convs(tmp_path):
    torch.manual_seed(0)
    model = CondenseNet(10, stages=(2, 2), growth=(8, 16), condense_every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(6):  # C - 1 = 3 stages, one every 2 steps
        loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert condensation_complete(model)
    lgcs = [m for m in model.modules() if isinstance(m, LearnedGroupConv)]
    for lgc in lgcs:  # every group keeps exactly in/C input channels
        assert lgc.mask.sum(1).tolist() == [lgc.in_ch // lgc.condense] * lgc.groups
    model.eval()
    lgc = lgcs[-1]
    x = torch.randn(2, lgc.in_ch, 8, 8)
    with torch.no_grad():  # the deployed Gather + group conv computes the trained masked dense conv
        dense = F.conv2d(lgc.relu(lgc.norm(x)),
                         lgc.weight * lgc.mask.repeat_interleave(lgc.out_ch // lgc.groups, 0)[:, :, None, None])
        assert torch.allclose(lgc(x), dense, atol=1e-6)
    path = export_onnx(model, tmp_path / "c.onnx", (1, 3, 32, 32))
    graph = onnx.load(str(path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    lgc_convs = [n for n in graph.node if n.op_type == "Conv" and producers.get(n.input[0]) is not None
                 and producers[n.input[0]].op_type == "Gather"]
    assert len(lgc_convs) == len(lgcs)
    for node, lgc in zip(lgc_convs, lgcs):
        group = next(a.i for a in node.attribute if a.name == "group")
        assert group == lgc.groups
        assert list(inits[node.input[1]].dims) == [lgc.out_ch, lgc.in_ch // lgc.condense, 1, 1]
    assert deployed_params(model) < 0.75 * sum(p.numel() for p in model.parameters())


def test_hetconv_is_a_heterogeneous_kernel_conv_with_the_papers_weight_count():
    torch.manual_seed(0)
    m, n, p = 16, 8, 4
    het = HetConv(m, n, 3, p=p).eval()
    assert sum(q.numel() for q in het.parameters()) == (9 * m // p + m - m // p) * n  # (k²M/P + M - M/P)·N
    # the same layer as one dense 3x3 conv: filter group j has 3x3 kernels on input block j, 1x1 elsewhere
    dense = torch.zeros(n, m, 3, 3)
    pw = het.pointwise_weight()[:, :, 0, 0]
    bm, bn = m // p, n // p
    for o in range(n):
        j = o // bn
        dense[o, j * bm:(j + 1) * bm] = het.gwc.weight[o]
        others = [c for c in range(m) if not j * bm <= c < (j + 1) * bm]
        assert torch.all(pw[o, j * bm:(j + 1) * bm] == 0)
        dense[o, others, 1, 1] = pw[o, others]
    x = torch.randn(2, m, 9, 9)
    with torch.no_grad():
        assert torch.allclose(het(x), F.conv2d(x, dense, padding=1), atol=1e-5)


def test_dualconv_weight_count_and_bn_folding():
    torch.manual_seed(0)
    m, n, g = 16, 8, 4
    dual = DualConv(m, n, 3, g=g)
    assert sum(q.numel() for q in dual.parameters()) == (9 * m // g + m) * n  # (k²M/G + M)·N
    bn = nn.BatchNorm2d(n)
    _randomize_bn(bn)
    bn.eval()
    x = torch.randn(2, m, 9, 9)
    with torch.no_grad():
        for layer in (dual, HetConv(m, n, 3, p=g)):
            assert torch.allclose(layer.forward_bn(x, bn), bn(layer(x)), atol=1e-5)


def test_static_shift_max():
    # the paper's shift: in a (G, C/G) view, channel (i, j) reads (i+1 mod G, j+1 mod C/G)
    assert _shift_index(6, 2).tolist() == [4, 5, 3, 1, 2, 0]
    x = torch.randn(2, 12, 5, 5)
    two, one = StaticShiftMax(12, 3, two_branch=True), StaticShiftMax(12, 3, two_branch=False)
    with torch.no_grad():
        assert torch.equal(two(x), torch.relu(x))  # initialised as ReLU
        assert torch.equal(one(x), x)  # and as identity
        for conv in (two.u, two.v):
            conv.weight.normal_()
        # y = v + relu(u) is max(z1, z2) with z1 = u + v, z2 = v, each a per-channel mix of x and shift(x)
        s = x[:, _shift_index(12, 3)]
        u = two.u.weight[:, 0, 0, 0].view(1, -1, 1, 1) * x + two.u.weight[:, 1, 0, 0].view(1, -1, 1, 1) * s
        v = two.v.weight[:, 0, 0, 0].view(1, -1, 1, 1) * x + two.v.weight[:, 1, 0, 0].view(1, -1, 1, 1) * s
        assert torch.allclose(two(x), torch.maximum(u + v, v), atol=1e-6)


def test_condensenet_freezes_its_deployed_index_for_torch_export():
    """torch.export (litert-torch's front end) cannot trace deploy_index's nonzero(); freeze_for_export fixes it as
    constants, and train() drops it so a later training step condenses again from the buffers."""
    torch.manual_seed(0)
    model = CondenseNet(10, stages=(2, 2), growth=(8, 16), condense_every=2).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(Exception):
        torch.export.export(model, (x,))
    lgcs = [m for m in model.modules() if isinstance(m, LearnedGroupConv)]
    for m in lgcs:
        m.freeze_for_export()
    exported = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        assert torch.allclose(exported(x), model(x), atol=1e-5)
    model.train()
    assert all(m._frozen_keep is None for m in lgcs)


def test_condensenet_export_form_matches_deployed_forward():
    """freeze_for_export (which the TFLite exporter calls on every module) runs each learned group conv as
    Gather -> depthwise 1x1 (its input BN) -> ReLU -> group conv (the following BN folded), with constant weights:
    the deployed eval outputs, no BatchNorm in front of a group conv and no weight arithmetic left for PT2E to
    quantize; train() and load_state_dict drop it."""
    torch.manual_seed(0)
    model = CondenseNet(10, stages=(2, 2), growth=(8, 16), condense_every=2)
    x = torch.randn(4, 3, 32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):  # condense part of the way (the rest is finished virtually) and move the BN statistics
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        ref = model(x)
    for m in model.modules():  # what edgekit.export.tflite._prepare does
        if callable(getattr(m, "freeze_for_export", None)):
            m.freeze_for_export()
    lgcs = [m for m in model.modules() if isinstance(m, LearnedGroupConv)]
    assert all(m._frozen_forms for m in lgcs)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)
    gm = torch.export.export(model, (x[:1],)).module()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert sum("batch_norm" in str(t) for t in targets) == 1  # only the final BN (after the last concat)
    assert sum(t == torch.ops.aten.index_select.default for t in targets) == len(lgcs)
    with torch.no_grad():
        assert torch.allclose(gm(x[:1]), ref[:1], atol=1e-5)
    model.load_state_dict(model.state_dict())
    assert all(m._frozen_forms is None and m._frozen_keep is None for m in lgcs)
    for m in lgcs:
        m.freeze_for_export()
    model.train()
    assert all(m._frozen_forms is None and m._frozen_keep is None for m in lgcs)
