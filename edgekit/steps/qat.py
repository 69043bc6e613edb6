"""Quantization-aware training: fine-tune with the int8 rounding the exported files will compute.

The fake quantizers (``edgekit.export.qat``) follow the device profile: per-channel or per-tensor int8 weights,
7-bit where its int8 kernels saturate (``int8_reduce_range``), activations stored as its activation type. Their
initial ranges come from the calibration split; training then moves them with the activations, and the exports
(``onnx int8``, ``tflite int8``) write exactly those scales instead of calibrating again. The loss is distillation
from the fp32 baseline by default: the int8 model learns to answer as the float one does. Training goes through
``edgekit.train.fit``, so it runs on the CPU, a CUDA GPU or under torchrun like every other step; in float32 (no
AMP), since float16 activations would shift the ranges the int8 files keep.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import EdgekitError
from .params import QatParams
from .registry import Step, StepContext, register_step


# Below this many training images the step says QAT may overfit them (EfficientNet-Lite0 trained 4 epochs on 80
# photo crops fell to 50% agreement with fp32 where post-training int8 kept 97.5%: bench/results/int8_peers).
FEW_TRAIN_IMAGES = 1000


@register_step
class Qat(Step):
    """Fake-quantize as the device's int8 will, calibrate, fine-tune (distilling from the fp32 baseline)."""

    name = "qat"
    Params = QatParams

    def apply(self, model: nn.Module, ctx: StepContext) -> nn.Module:
        from .. import distributed
        from ..evaluate import agreement, top1
        from ..export.onnx import int8_reduce_range
        from ..export.qat import is_qat, prepare_qat
        from ..train import FitConfig, fit, predict
        from .common import default_lr, record

        p: QatParams = self.params
        task = ctx.task
        if task is None:
            raise EdgekitError("qat: needs a task (training data)")
        if is_qat(model):
            raise EdgekitError("qat: the model is already quantization-aware; give one qat step")
        teacher = None
        if p.teacher == "baseline" and p.alpha > 0:
            if ctx.baseline is None:
                raise EdgekitError("qat: no fp32 baseline to distil from; use teacher: none")
            teacher = ctx.baseline.eval()
        q = getattr(ctx.device, "quantization", None)
        if q is not None and q.weight_type != "int8":
            raise EdgekitError(f"qat: trains int8 symmetric weights; device {ctx.device.name} asks for "
                               f"{q.weight_type} weights")
        per_channel = True if q is None else bool(q.per_channel)
        reduce_range = False if ctx.device is None else int8_reduce_range(ctx.device)
        act = "int8" if q is None else q.activation_type
        qm = prepare_qat(model, tuple(task.input_shape), per_channel=per_channel, reduce_range=reduce_range,
                         activation_type=act, int8_logits=p.int8_logits)
        calib, _ = task.arrays("calib", limit=p.num_calib)
        if len(calib) == 0:
            raise EdgekitError("qat: the calibration split is empty; its images set the initial ranges")
        qm.calibrate(torch.from_numpy(np.ascontiguousarray(calib[i:i + p.batch_size]))
                     for i in range(0, len(calib), p.batch_size))
        info: dict = {"scheme": dict(qm.scheme), "num_calib": len(calib),
                      "teacher": "fp32 baseline" if teacher is not None else None}
        labels = task.labels("eval") if p.evaluate else None
        ref = predict(ctx.baseline, task) if p.evaluate and ctx.baseline is not None else None

        def score(stage: str) -> None:
            logits = predict(qm, task)
            if getattr(task, "labelled", True):
                info[f"acc_{stage}"] = round(top1(logits, labels), 4)
            if ref is not None:
                info[f"agreement_{stage}"] = round(agreement(ref, logits), 4)

        if p.evaluate:
            if ref is not None and getattr(task, "labelled", True):
                info["fp32_acc"] = round(top1(ref, labels), 4)
            score("before")  # the calibrated fake-quant model: post-training quantization with these ranges
        lr = p.lr or float(f"{default_lr(ctx.model_name) / 10:.3g}")
        cfg = FitConfig(epochs=p.epochs, lr=lr, batch_size=p.batch_size, seed=ctx.seed, temperature=p.temperature,
                        alpha=p.alpha if teacher is not None else 0.0, device=ctx.train_device, amp=False)
        fit(qm, task, cfg, teacher=teacher, description="qat")
        # Under torchrun DDP syncs buffers before each forward, so each rank's last batch left its own ranges:
        # rank 0's go to every rank, as fit does with BatchNorm statistics (one process: nothing happens).
        distributed.broadcast_state(qm, params=False)
        qm.eval()  # ranges frozen from here on
        n_train = task.size("train")
        info["train_images"] = n_train
        if n_train < FEW_TRAIN_IMAGES:
            ctx.notes.append(f"qat: fine-tuned on {n_train} training images; with so few the int8 model can fit "
                             "them and drift from fp32 on other images: compare it with post-training int8")
        if p.evaluate:
            score("after")
            moved = {k: f"{label} {info[f'{k}_before']:.1%} -> {info[f'{k}_after']:.1%}"
                     for k, label in (("acc", "top-1"), ("agreement", "agreement with fp32")) if f"{k}_before" in info}
            lowered = [text for k, text in moved.items() if info[f"{k}_after"] < info[f"{k}_before"]]
            if lowered:
                ctx.notes.append("qat: training lowered " + " and ".join(lowered) + ": the calibrated fake-quant "
                                 "model was closer before training; try fewer epochs or a lower lr, or ship "
                                 "post-training int8")
            if "fp32_acc" in info and "acc" in moved:
                moved["acc"] += f" (fp32 {info['fp32_acc']:.1%})"
            ctx.notes.append("qat (fake-quant before -> after training): " + ", ".join(moved.values()))
        info.update(epochs=p.epochs, lr=lr, alpha=cfg.alpha, temperature=p.temperature)
        record(ctx, self.name, info)
        return qm
