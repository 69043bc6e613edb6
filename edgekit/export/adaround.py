"""AdaRound on ORT's QDQ graph (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization"; AIMET's ``Adaround``).

:func:`adaround`: after quantization, each int8 weight of a Conv / Gemm / MatMul is rounded up or down as learned
per layer, on the layer's fp32 inputs, to bring its output closer to fp32 than ORT's round-to-nearest; scales stay
ORT's. Minutes on a 224 px model, so an option. The graph helpers are :mod:`edgekit.export.ptq`'s.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..errors import EdgekitError
from .ptq import QUANT_SUFFIX, _attr, _clip_bounds, _Graph, tensor_session

# AIMET's constants and defaults (aimet_common.defs.AdaroundConstants; aimet_torch.adaround AdaroundParameters):
# the rectified sigmoid's stretch, the regulariser's weight lambda, its beta annealed 20 -> 2 (cosine) after a
# warm start of 20% of the iterations, during which only the reconstruction loss counts.
ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1
ADAROUND_REG = 0.01
ADAROUND_BETA = (20.0, 2.0)
ADAROUND_WARM_START = 0.2
# Per layer. AIMET's 10,000 would take about 40 minutes for EfficientNet-Lite0 at 224 px on 2 cores at this batch
# (1,000 took 231 s); 500 took 129 s and reached the same eval SQNR as 1,000 (22.96 vs 22.93 dB; 300: 21.04 dB,
# 76 s; 1,000 of 256 positions: 23.01 dB, 173 s).
ADAROUND_ITERATIONS = 500
ADAROUND_BATCH = 512  # output positions (or rows of a Gemm / MatMul) per iteration
ADAROUND_IMAGES = 64  # calibration inputs the layer inputs are sampled from
ADAROUND_CROP = 16  # a crop of a conv's input covers at most this many output positions a side
ADAROUND_CROPS_PER_IMAGE = 8
ADAROUND_LAYER_FLOATS = 1 << 22  # float32 values of one layer's sampled inputs kept (16 MB)
ADAROUND_CHUNK_FLOATS = 1 << 26  # ... and of the layers gathered in one pass of the fp32 model (256 MB)
ADAROUND_OPS = ("Conv", "Gemm", "MatMul")


class _Rounding:
    """One int8 weight whose rounding AdaRound learns: its fp32 layer, ORT's integers and their grid."""

    def __init__(self, node, qname: str, w: np.ndarray, bias: Optional[np.ndarray], scale: np.ndarray,
                 zp: np.ndarray, q: np.ndarray, act: Optional[tuple]):
        self.node, self.qname, self.act = node, qname, act
        self.w = w.astype(np.float32)
        self.bias = None if bias is None else bias.astype(np.float32)
        self.scale, self.zp, self.q = scale, zp, q
        # floor(W / s) + zp in float64; where ORT's float32 division landed on the other side of an integer, its
        # value is the one kept as a candidate, so the learned integer is always ORT's or one step from it.
        base = np.floor(w.astype(np.float64) / scale) + zp
        qi = q.astype(np.float64)
        self.base = np.where(qi < base, qi, np.where(qi > base + 1, qi - 1, base))
        self.frac = np.clip(w.astype(np.float64) / scale + zp - self.base, 0.0, 1.0)
        # The integers stay inside the range ORT used for this tensor: +-max|q| when symmetric (so 7-bit
        # reduce_range weights stay 7-bit), else its own min..max; and inside the type.
        info = np.iinfo(q.dtype)
        if not np.any(zp):
            m = int(np.abs(qi).max())
            self.lo, self.hi = max(-m, info.min), min(m, info.max)
        else:
            self.lo, self.hi = int(qi.min()), int(qi.max())
        self.input = node.input[0]

    @property
    def is_conv(self) -> bool:
        return self.node.op_type == "Conv"


def _per_axis(dq_node, value: np.ndarray, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    if value.ndim == 1 and value.size > 1:
        shape[_attr(dq_node, "axis", 1)] = -1
    return value.astype(np.float64).reshape(shape)


def _activation(graph: _Graph, node) -> Optional[tuple]:
    """The Relu / Clip that alone follows ``node`` in the fp32 graph: AIMET's loss is on the activation's output."""
    nxt = graph.only_consumer(node.output[0])
    if nxt is None:
        return None
    if nxt.op_type == "Relu":
        return ("clip", 0.0, None)
    if nxt.op_type == "Clip":
        bounds = _clip_bounds(graph, nxt)
        return None if bounds is None else ("clip", *bounds)
    return None


def _rounding_jobs(fp: _Graph, q: _Graph) -> List[_Rounding]:
    """The Conv (2-D) / Gemm / MatMul of the QDQ model whose weight is an int8 ``<name>_quantized`` initializer
    dequantized for that node alone, matched by weight name to the fp32 node it came from."""
    producer = {o: n for n in q.g.node for o in n.output}
    fp_nodes = {n.input[1]: n for n in fp.g.node if n.op_type in ADAROUND_OPS and len(n.input) > 1}
    jobs = []
    for n in q.g.node:
        if n.op_type not in ADAROUND_OPS or len(n.input) < 2:
            continue
        wdq = producer.get(n.input[1])
        if wdq is None or wdq.op_type != "DequantizeLinear" or not wdq.input[0].endswith(QUANT_SUFFIX):
            continue
        qname = wdq.input[0]
        if len(q.consumers.get(qname, [])) != 1 or len(q.consumers.get(wdq.output[0], [])) != 1:
            continue  # a weight shared by several nodes: its rounding cannot serve one of them alone
        node = fp_nodes.get(qname[:-len(QUANT_SUFFIX)])
        if node is None or node.op_type != n.op_type or len(fp.consumers.get(node.input[1], [])) != 1:
            continue
        w, qv, scale = fp.array(node.input[1]), q.array(qname), q.array(wdq.input[1])
        zp = q.array(wdq.input[2]) if len(wdq.input) > 2 and wdq.input[2] else np.zeros(1, np.int64)
        if w is None or qv is None or scale is None or zp is None or qv.shape != w.shape \
                or qv.dtype not in (np.int8, np.uint8):
            continue
        if n.op_type == "Conv":
            auto_pad = _attr(node, "auto_pad", b"NOTSET")
            if w.ndim != 4 or (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in ("NOTSET",
                                                                                                      "VALID"):
                continue
        elif w.ndim != 2 or (n.op_type == "Gemm" and _attr(node, "transA", 0)):
            continue
        scale, zp = _per_axis(wdq, scale, w.ndim), _per_axis(wdq, zp, w.ndim)
        if not np.all(scale > 0):
            continue
        bias = None
        if n.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
            bias = fp.array(node.input[2])
            if bias is None:
                continue
        jobs.append(_Rounding(node, qname, w, bias, scale, zp, qv, _activation(fp, node)))
    return jobs


class _Sampler:
    """Where one layer's input samples come from: crops of a conv's padded input (each covering up to
    ``ADAROUND_CROP``^2 output positions: k^2 fewer values kept than unfolded patches), or rows of a Gemm /
    MatMul input; how many per image so that the layer keeps at most ``ADAROUND_LAYER_FLOATS`` values."""

    def __init__(self, job: _Rounding, shape: tuple, images: int):
        self.job = job
        if job.is_conv:
            c, h, w = shape[1:]
            t, l, b, r = list(_attr(job.node, "pads", [0, 0, 0, 0]))
            kh, kw = job.w.shape[2:]
            self.s, self.d = list(_attr(job.node, "strides", [1, 1])), list(_attr(job.node, "dilations", [1, 1]))
            self.pads = ((0, 0), (t, b), (l, r))
            self.out = [(h + t + b - (kh - 1) * self.d[0] - 1) // self.s[0] + 1,
                        (w + l + r - (kw - 1) * self.d[1] - 1) // self.s[1] + 1]
            self.r = [min(ADAROUND_CROP, o) for o in self.out]
            self.span = [(self.r[0] - 1) * self.s[0] + (kh - 1) * self.d[0] + 1,
                         (self.r[1] - 1) * self.s[1] + (kw - 1) * self.d[1] + 1]
            self.floats, self.positions = c * self.span[0] * self.span[1], self.r[0] * self.r[1]
            whole = self.r == self.out
            per_image = 1 if whole else ADAROUND_CROPS_PER_IMAGE
        else:
            self.floats, self.positions = shape[-1], 1
            rows = int(np.prod(shape[:-1]))
            per_image = min(rows, ADAROUND_BATCH)
        self.total = max(1, min(images * per_image, ADAROUND_LAYER_FLOATS // self.floats))
        self.per_image = -(-self.total // images)
        self.samples: List[np.ndarray] = []

    def add(self, x: np.ndarray, rng: np.random.Generator) -> None:
        take = min(self.per_image, self.total - sum(len(s) for s in self.samples))
        if take <= 0:
            return
        if not self.job.is_conv:
            rows = x.reshape(-1, x.shape[-1])
            self.samples.append(rows[np.sort(rng.choice(len(rows), size=min(take, len(rows)), replace=False))])
            return
        xp = np.pad(x[0], self.pads)
        crops = []
        for _ in range(take):
            oy, ox = (int(rng.integers(0, o - r + 1)) for o, r in zip(self.out, self.r))
            y0, x0 = oy * self.s[0], ox * self.s[1]
            crops.append(xp[:, y0:y0 + self.span[0], x0:x0 + self.span[1]])
        self.samples.append(np.stack(crops))

    def data(self) -> np.ndarray:
        return np.ascontiguousarray(np.concatenate(self.samples).astype(np.float32))


def _layer_fn(job: _Rounding):
    """The layer as a torch function of (sampled input, weight), its bias and following Relu / Clip included."""
    import torch
    import torch.nn.functional as F

    bias = None if job.bias is None else torch.from_numpy(job.bias)
    lo, hi = (job.act[1], job.act[2]) if job.act else (None, None)
    node = job.node
    if job.is_conv:
        stride, dil, groups = tuple(_attr(node, "strides", [1, 1])), tuple(_attr(node, "dilations", [1, 1])), \
            _attr(node, "group", 1)

        def linear(x, w):
            return F.conv2d(x, w, bias, stride=stride, dilation=dil, groups=groups)
    elif node.op_type == "Gemm":
        alpha, beta, trans_b = _attr(node, "alpha", 1.0), _attr(node, "beta", 1.0), _attr(node, "transB", 0)

        def linear(x, w):
            y = alpha * (x @ (w.t() if trans_b else w))
            return y if bias is None else y + beta * bias.reshape(-1)
    else:
        def linear(x, w):
            return x @ w

    def fn(x, w):
        y = linear(x, w)
        return y if lo is None else torch.clamp(y, min=lo, max=hi)
    return fn


def _recon(a, b):
    """AIMET's reconstruction loss: squared Frobenius norm over the channel axis, mean over samples and positions."""
    return ((a - b) ** 2).sum(dim=1).mean()


def _learn_rounding(job: _Rounding, x: np.ndarray, positions: int, iterations: int, batch: int, lr: float,
                    seed: int) -> dict:
    """Optimise V of W_q = s (clip(floor(W/s) + h(V)) - zp) on the sampled inputs ``x`` (Adam, AIMET's loss);
    returns the new integers (or ORT's, when the learned ones reconstruct worse) and the layer's MSEs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    fn = _layer_fn(job)
    xt = torch.from_numpy(x)
    w = torch.from_numpy(job.w)
    scale, zp = torch.from_numpy(job.scale.astype(np.float32)), torch.from_numpy(job.zp.astype(np.float32))
    base = torch.from_numpy(job.base.astype(np.float32))
    frac = torch.from_numpy(job.frac.astype(np.float32)).clamp(1e-4, 1 - 1e-4)
    zeta, gamma = ADAROUND_ZETA, ADAROUND_GAMMA
    v = torch.nn.Parameter(-torch.log((zeta - gamma) / (frac - gamma) - 1))  # h(V) = W/s - floor(W/s) at start
    opt = torch.optim.Adam([v], lr=lr)
    started = time.perf_counter()
    batch = max(1, batch // positions)  # samples (crops or rows) per iteration
    warm = int(ADAROUND_WARM_START * iterations)

    def weights(h):
        return (torch.clamp(base + h, job.lo, job.hi) - zp) * scale

    with torch.no_grad():  # the fp32 outputs, once, when they fit the layer's budget too
        refs = None
        if fn(xt[:1], w).numel() * len(xt) <= ADAROUND_LAYER_FLOATS:
            refs = torch.cat([fn(xt[i:i + 4 * batch], w) for i in range(0, len(xt), 4 * batch)])
    for it in range(iterations):
        idx = torch.randint(0, len(xt), (min(batch, len(xt)),), generator=gen)
        xb = xt[idx]
        if refs is not None:
            ref = refs[idx]
        else:
            with torch.no_grad():
                ref = fn(xb, w)
        h = torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0, 1)
        loss = _recon(fn(xb, weights(h)), ref)
        if it >= warm:
            rel = (it - warm) / max(1, iterations - warm)
            b = ADAROUND_BETA[1] + 0.5 * (ADAROUND_BETA[0] - ADAROUND_BETA[1]) * (1 + np.cos(rel * np.pi))
            loss = loss + ADAROUND_REG * (1 - (2 * h - 1).abs().pow(b)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        learned = torch.clamp(base + (v >= 0).float(), job.lo, job.hi)
        nearest = torch.from_numpy(job.q.astype(np.float32))
        xe = xt[torch.randperm(len(xt), generator=gen)[:4 * batch]]
        ref = fn(xe, w)
        mse_near = float(_recon(fn(xe, (nearest - zp) * scale), ref))
        mse_ada = float(_recon(fn(xe, (learned - zp) * scale), ref))
    kept = mse_ada < mse_near
    q = learned.numpy().astype(job.q.dtype) if kept else job.q
    return {"q": q, "mse_nearest": mse_near, "mse_adaround": min(mse_ada, mse_near), "kept": kept,
            "changed": int((q != job.q).sum()), "weights": int(q.size),
            "seconds": round(time.perf_counter() - started, 2)}


def adaround_model(fp32_path: str | Path, qmodel, calib: np.ndarray, iterations: int = ADAROUND_ITERATIONS,
                   images: int = ADAROUND_IMAGES, batch: int = ADAROUND_BATCH, lr: Optional[float] = None,
                   seed: int = 0) -> dict:
    """AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"; AIMET's
    ``Adaround``) of the QDQ model ``qmodel`` (changed in place) that ORT quantized from ``fp32_path``.

    For each Conv / Gemm / MatMul with int8 (or uint8) weights, per channel or per tensor, it learns whether each
    weight rounds down or up: W_q = s (clip(floor(W/s) + zp + h(V), lo, hi) - zp), h the rectified sigmoid, by
    Adam on the MSE between the layer's fp32 output and its output with W_q (the Relu / Clip after it included)
    on the fp32 model's input to that layer, plus AIMET's regulariser (lambda 0.01, beta 20 -> 2 after a 20% warm
    start) that drives h to 0 or 1. The learned integers replace the ``_quantized`` initializer; scales and zero
    points stay ORT's, and each integer stays ORT's or one step from it. A layer whose learned rounding
    reconstructs its sampled output worse than ORT's nearest rounding keeps ORT's.

    Cost is bounded for a small machine: the layer inputs are sampled from ``images`` calibration inputs (crops of
    the padded conv input, at most ``ADAROUND_LAYER_FLOATS`` values a layer, gathered in passes of the fp32 model
    over groups of layers); ``iterations`` per layer of ``batch`` output positions (or Gemm rows) each (AIMET:
    10,000 of 32 whole images), with Adam's step ``lr`` (default: AIMET's 1e-3 scaled by 10,000 / ``iterations``,
    so that V can travel as far). The defaults took 115-131 s on EfficientNet-Lite0 at 224 px (49 layers, 64
    images) on a 2-core x86 machine and raised its eval logits SQNR from 16.3 to 23.0 dB, 23.6 with bias correction
    after it (bias correction alone: 22.3; ``bench/int8_ptq.py``).
    """
    import onnx

    if len(calib) == 0:
        raise EdgekitError("AdaRound needs at least one calibration input")
    if min(iterations, images, batch) < 1:
        raise EdgekitError(f"AdaRound needs iterations, images and batch >= 1, not {iterations}, {images}, {batch}")
    started = time.perf_counter()
    lr = 1e-3 * 10000 / iterations if lr is None else lr
    fp_model = onnx.load(str(fp32_path))
    fp, q = _Graph(fp_model), _Graph(qmodel)
    jobs = _rounding_jobs(fp, q)
    if not jobs:
        return {"layers": 0, "seconds": round(time.perf_counter() - started, 2)}
    pick = np.unique(np.linspace(0, len(calib) - 1, min(images, len(calib))).round().astype(int))
    x = np.ascontiguousarray(calib[pick], dtype=np.float32)
    tensors = sorted({j.input for j in jobs})
    probe = tensor_session(fp_model, tensors)
    name = probe.get_inputs()[0].name
    shapes = dict(zip(tensors, (o.shape for o in probe.run(tensors, {name: x[:1]}))))
    del probe
    samplers = [_Sampler(j, shapes[j.input], len(x)) for j in jobs]
    chunks, size = [[]], 0
    for s in samplers:  # groups of layers whose samples fit ADAROUND_CHUNK_FLOATS: one fp32 pass each
        if chunks[-1] and size + s.total * s.floats > ADAROUND_CHUNK_FLOATS:
            chunks.append([])
            size = 0
        chunks[-1].append(s)
        size += s.total * s.floats
    rng = np.random.default_rng(seed)
    stats, sampling = [], time.perf_counter() - started
    for chunk in chunks:
        t0 = time.perf_counter()
        wanted = sorted({s.job.input for s in chunk})
        sess = tensor_session(fp_model, wanted)
        for i in range(len(x)):
            outs = dict(zip(wanted, sess.run(wanted, {name: x[i:i + 1]})))
            for s in chunk:
                s.add(outs[s.job.input], rng)
        del sess, outs
        sampling += time.perf_counter() - t0
        for s in chunk:
            r = _learn_rounding(s.job, s.data(), s.positions, iterations, batch, lr, seed + len(stats))
            s.samples = []
            q.set(s.job.qname, r.pop("q"))
            stats.append(r)
    ratios = [r["mse_adaround"] / r["mse_nearest"] for r in stats if r["mse_nearest"] > 0]
    return {"layers": len(stats), "kept_nearest": sum(not r["kept"] for r in stats),
            "changed_weights": round(sum(r["changed"] for r in stats) / sum(r["weights"] for r in stats), 4),
            "median_mse_ratio": round(float(np.median(ratios)), 4) if ratios else 1.0,
            "images": len(x), "iterations": iterations, "passes": len(chunks),
            "seconds": round(time.perf_counter() - started, 2), "sampling_seconds": round(sampling, 2),
            "per_layer": stats}


def adaround(fp32_path: str | Path, q_path: str | Path, calib: np.ndarray, out_path: Optional[str | Path] = None,
             **kwargs) -> dict:
    """:func:`adaround_model` on the file ``q_path``, written to ``out_path`` (default: ``q_path`` itself)."""
    import onnx

    model = onnx.load(str(q_path))
    info = adaround_model(fp32_path, model, calib, **kwargs)
    onnx.save(model, str(out_path or q_path))
    return info
