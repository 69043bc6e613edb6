"""Knowledge distillation: the model learns from a teacher's soft targets (Hinton et al. 2015).

The teacher is the fp32 baseline (``ctx.baseline``: after ``prune`` or ``svd``
the compressed model learns back from the model it came from) or any zoo model
named by ``teacher:`` (created for the task and trained on it first with
``edgekit.train.fit``, unless ``teacher_weights`` gives a state dict).

Loss: ``alpha * T^2 * KL(student/T || teacher/T) + (1 - alpha) * CE(labels)``,
plus, with ``feature_weight > 0``, a feature term: the student's last-stage
feature map, globally pooled and mapped by a 1x1 adapter to the teacher's
width, is pulled towards the teacher's (MSE relative to the teacher features'
mean square). The adapter is trained with the student and discarded afterwards.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdgekitError
from .common import default_lr, detection_outputs, find_classifier, record
from .params import DistillParams
from .registry import Step, StepContext, register_step


# ----------------------------------------------------------------------------- feature taps


class FeatureTap:
    """Keeps the last 4-D feature map a model produces before its classifier runs (its last stage)."""

    def __init__(self, model: nn.Module, classifier: Optional[nn.Module]):
        self.feat: Optional[torch.Tensor] = None
        self._done = False
        self._hooks = []
        for m in model.modules():
            if m is model or len(list(m.children())) > 0:
                continue
            self._hooks.append(m.register_forward_hook(self._keep))
        if classifier is not None:
            self._hooks.append(classifier.register_forward_pre_hook(self._stop))
        self._hooks.append(model.register_forward_pre_hook(self._reset))

    def _reset(self, mod, args):
        self.feat, self._done = None, False

    def _keep(self, mod, args, out):
        if not self._done and isinstance(out, torch.Tensor) and out.dim() == 4:
            self.feat = out

    def _stop(self, mod, args):
        self._done = True

    def pooled(self) -> torch.Tensor:
        if self.feat is None:
            raise EdgekitError("distill: no 4-D feature map found before the classifier for feature distillation")
        return self.feat.mean((2, 3))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


class _WithAdapter(nn.Module):
    """The student plus the 1x1 adapter of feature distillation, so that one optimizer trains both."""

    def __init__(self, student: nn.Module, adapter: nn.Module):
        super().__init__()
        self.student, self.adapter = student, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


@torch.no_grad()
def _pooled_width(model: nn.Module, tap: FeatureTap, shape) -> int:
    model.eval()(torch.zeros(shape))
    return tap.pooled().shape[1]


def _feature_loss(student: nn.Module, teacher: nn.Module, s_tap: FeatureTap, t_tap: FeatureTap,
                  adapter: nn.Module, weight: float):
    """The feature term for ``fit(extra_loss=...)`` and the hook handle to remove afterwards."""
    seen = {"x": None}

    def grab(mod, args):
        seen["x"] = args[0]

    handle = student.register_forward_pre_hook(grab)

    def loss(_model: nn.Module) -> torch.Tensor:
        s = s_tap.pooled()
        if t_tap.feat is None or t_tap.feat.shape[0] != s.shape[0]:
            with torch.no_grad():  # alpha == 0: fit did not run the teacher on this batch
                teacher(seen["x"])
        t = t_tap.pooled().detach()
        pred = adapter(s[:, :, None, None]).flatten(1)
        return weight * F.mse_loss(pred, t) / (t.pow(2).mean() + 1e-8)

    return loss, handle


# ----------------------------------------------------------------------------- the step


def _accuracy_and_agreement(model: nn.Module, task, teacher_logits: Optional[np.ndarray], labels: np.ndarray):
    from ..evaluate import agreement, top1
    from ..train import predict

    logits = predict(model, task)
    return top1(logits, labels), (agreement(logits, teacher_logits) if teacher_logits is not None else None)


@register_step
class Distill(Step):
    """Hinton soft-target distillation from the baseline or a named zoo teacher (optional feature term)."""

    name = "distill"
    Params = DistillParams

    def build_teacher(self, ctx: StepContext) -> tuple[nn.Module, dict]:
        from .. import zoo
        from ..train import FitConfig, fit

        p: DistillParams = self.params
        if p.teacher is None:
            if ctx.baseline is None:
                raise EdgekitError("distill: no baseline to learn from; name a zoo model with 'teacher:'")
            return ctx.baseline.eval(), {"teacher": ctx.model_name, "teacher_source": "baseline"}
        task = ctx.task
        if p.teacher_weights is not None:
            t = zoo.create(p.teacher, num_classes=task.num_classes, in_chans=task.in_chans, weights=p.teacher_weights)
            return t.eval(), {"teacher": p.teacher, "teacher_source": f"weights {p.teacher_weights}"}
        spec = zoo.get_spec(p.teacher)
        torch.manual_seed(ctx.seed)
        t = zoo.create(spec.name, num_classes=task.num_classes, in_chans=task.in_chans)
        lr = p.teacher_lr or float(spec.train.get("lr", 1e-2))
        fit(t, task, FitConfig(epochs=p.teacher_epochs, lr=lr, seed=ctx.seed, batch_size=p.batch_size,
                               device=ctx.train_device), description=f"train teacher {spec.name}")
        return t.eval(), {"teacher": spec.name, "teacher_source": f"trained {p.teacher_epochs:g} epochs, lr {lr:g}"}

    def apply(self, model: nn.Module, ctx: StepContext) -> nn.Module:
        from ..train import FitConfig, fit, predict

        p: DistillParams = self.params
        task = ctx.task
        if task is None:
            raise EdgekitError("distill: needs a task (training data)")
        if detection_outputs(model) is not None:
            return self._apply_detector(model, ctx)
        teacher, info = self.build_teacher(ctx)
        labels = task.labels("eval") if p.evaluate else None
        t_logits = predict(teacher, task) if p.evaluate else None
        if p.evaluate:
            from ..evaluate import top1

            info["teacher_acc"] = round(top1(t_logits, labels), 4)
            acc, agr = _accuracy_and_agreement(model, task, t_logits, labels)
            info.update(student_acc_before=round(acc, 4), agreement_before=round(agr, 4))
        lr = p.lr or default_lr(ctx.model_name)
        cfg = FitConfig(epochs=p.epochs, lr=lr, batch_size=p.batch_size, seed=ctx.seed, temperature=p.temperature,
                        alpha=p.alpha, device=ctx.train_device)
        if p.feature_weight > 0:
            s_tap = FeatureTap(model, find_classifier(model, ctx.model_name))
            t_tap = FeatureTap(teacher, find_classifier(teacher, p.teacher or ctx.model_name))
            handle = None
            try:
                shape = tuple(task.input_shape)
                cs, ct = _pooled_width(model, s_tap, shape), _pooled_width(teacher, t_tap, shape)
                adapter = nn.Conv2d(cs, ct, 1)
                extra, handle = _feature_loss(model, teacher, s_tap, t_tap, adapter, p.feature_weight)
                # the teacher goes to fit even with alpha 0: the feature term runs it, on the training device
                fit(_WithAdapter(model, adapter), task, cfg, teacher=teacher, description="distill",
                    extra_loss=extra)
            finally:
                s_tap.remove()
                t_tap.remove()
                if handle is not None:
                    handle.remove()
            info["feature"] = {"student_channels": cs, "teacher_channels": ct, "weight": p.feature_weight}
        else:
            fit(model, task, cfg, teacher=teacher if p.alpha > 0 else None, description="distill")
        model.eval()
        if p.evaluate:
            acc, agr = _accuracy_and_agreement(model, task, t_logits, labels)
            info.update(student_acc_after=round(acc, 4), agreement_after=round(agr, 4))
            who = (f"the {info['teacher']} baseline" if info["teacher_source"] == "baseline"
                   else f"{info['teacher']} ({info['teacher_source']})")
            ctx.notes.append(f"distill from {who} (top-1 {info['teacher_acc']:.1%}): "
                             f"student top-1 {info['student_acc_before']:.1%} -> "
                             f"{acc:.1%}, agreement with teacher {info['agreement_before']:.1%} -> {agr:.1%}")
        info.update(method="Hinton soft targets" + (" + pooled feature MSE (1x1 adapter)" if p.feature_weight else ""),
                    epochs=p.epochs, lr=lr, alpha=p.alpha, temperature=p.temperature)
        if p.alpha == 0 and p.feature_weight == 0:
            ctx.notes.append("distill: alpha 0 and no feature term: this was a plain fine-tune on the labels")
        record(ctx, self.name, info)
        return model

    def _apply_detector(self, model: nn.Module, ctx: StepContext) -> nn.Module:
        """A detector learns back from its baseline by mimicking its prediction maps (``fit_detector``)."""
        from ..detect.train import fit_detector
        from ..train import FitConfig

        p: DistillParams = self.params
        if p.teacher is not None or p.feature_weight > 0:
            raise EdgekitError("distill: a detector learns from its own baseline's prediction maps; 'teacher' and "
                               "'feature_weight' apply to classifiers")
        if ctx.baseline is None:
            raise EdgekitError("distill: no baseline to learn from")
        lr = p.lr or default_lr(ctx.model_name)
        cfg = FitConfig(epochs=p.epochs, lr=lr, batch_size=p.batch_size, seed=ctx.seed, alpha=p.alpha,
                        device=ctx.train_device)
        trained = fit_detector(model, ctx.task, cfg, description="distill", teacher=ctx.baseline.eval())
        info = {"teacher": ctx.model_name, "teacher_source": "baseline", "epochs": p.epochs, "lr": lr,
                "alpha": p.alpha, "method": "prediction-map mimicking (MSE relative to the teacher's)", "fit": trained}
        if "mimic_first" in trained:
            ctx.notes.append(f"distill from the {ctx.model_name} baseline: prediction-map mimic error (relative MSE) "
                             f"{trained['mimic_first']:.3f} -> {trained['mimic_last']:.3f} over {p.epochs:g} epochs")
        else:
            ctx.notes.append("distill: alpha 0: this was a plain fine-tune on the boxes")
        record(ctx, self.name, info)
        return model
