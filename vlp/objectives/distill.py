"""Distillation from a frozen teacher (open_clip_train's ``--distill-model``): ``base + weight · KL term``.

``loss = base objective + weight · ½ [H(softmax(t·X̂·Ŷᵀ), s·X·Yᵀ) + H(softmax(t·Ŷ·X̂ᵀ), s·Y·Xᵀ)]``: the base
objective (a registry spec, InfoNCE by default) plus the distillation term of open_clip's
``DistillClipLoss`` (its own ``dist_loss``: the cross-entropy of the student's logits against the
teacher's softmax), on the student's (X, Y; scale s) and the teacher's (X̂, Ŷ; scale t) unit-norm features.

Shapes: b rows on this rank, N = W·b in the global batch. The teacher (``vlp/models/teacher.py``:
``open_clip:NAME[:PRETRAINED]``, a run folder, or an open_clip export folder) is loaded on first use, held
outside the module tree (not a parameter, not in DeepSpeed, not in checkpoints) and run under
``torch.no_grad`` in ``begin_step`` on the whole local batch; its features are gathered across ranks
without gradient. The student's rows are gathered with gradient, so each rank's term is the mean over its
local rows of the global-batch logits: W ranks equal one process (the cross-sample contract,
docs/design.md, "Objectives"). With W = 1 the term equals ``DistillClipLoss``'s ``distill_loss``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from open_clip.loss import DistillClipLoss

from vlp import dist
from vlp.models.teacher import check_teacher, load_teacher
from vlp.objectives.base import OBJECTIVES, Objective, StepContext, Tensors


@dataclass
class DistillConfig:
    teacher: str = ""  # open_clip:NAME[:PRETRAINED], a vlp run folder, or an open_clip export folder
    # the objective distillation is added to (a registry spec): infonce (open_clip_train's), siglip, ...
    base: Dict[str, Any] = field(default_factory=lambda: {"name": "infonce"})
    weight: float = 1.0  # weight of the distillation term


class Distill(Objective):
    def __init__(self, cfg: DistillConfig):
        super().__init__()
        check_teacher(cfg.teacher)
        if cfg.weight < 0:
            raise ValueError(f"objective.weight must be >= 0, got {cfg.weight}")
        if cfg.base.get("name") == "distill":
            raise ValueError("objective.base cannot be distill itself")
        self.cfg = cfg
        self.base = OBJECTIVES.build(cfg.base)
        self.rep_keys = tuple(dict.fromkeys((*self.base.rep_keys, "image", "text")))
        self.batch_keys = self.base.batch_keys
        self.scalar_keys = tuple(dict.fromkeys(("logit_scale", *self.base.scalar_keys)))
        self._teacher: Optional[list] = None  # [module]: a list keeps it out of the module tree
        self._targets: Optional[Tensors] = None  # this step's teacher features and scale
        self._kl = DistillClipLoss()  # open_clip's, for its dist_loss

    @property
    def teacher(self) -> torch.nn.Module:
        if self._teacher is None:
            self._teacher = [load_teacher(self.cfg.teacher)]
        return self._teacher[0]

    def begin_step(self, ctx: StepContext) -> None:
        self.base.begin_step(ctx)
        device = next(ctx.model.parameters()).device if ctx.model is not None else torch.device("cpu")
        teacher = self.teacher.to(device)
        dtype = next(teacher.parameters()).dtype
        with torch.no_grad():
            image = teacher.encode_image(ctx.batch["image"].to(device, dtype), normalize=True)
            text = teacher.encode_text(ctx.batch["text"].to(device), normalize=True)
            self._targets = {"image": image, "text": text, "logit_scale": teacher.logit_scale.exp().reshape(())}

    def teacher_term(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The distillation term on this rank's rows (b, D) of student features, the teacher's set in begin_step."""
        if self._targets is None:
            raise RuntimeError("Distill.cross_sample before begin_step: the teacher runs there")
        dtype = torch.promote_types(image.dtype, torch.float32)  # fp32, or fp64 (the gradient-cache tests)
        image, text, scale = image.to(dtype), text.to(dtype), scale.to(dtype)
        t = {k: v.to(dtype) for k, v in self._targets.items()}
        if t["image"].shape[0] != image.shape[0]:
            raise RuntimeError(f"the teacher saw {t['image'].shape[0]} rows, the student {image.shape[0]}")
        image_all, text_all = dist.all_gather_with_grad(image), dist.all_gather_with_grad(text)  # (N, D)
        t_image_all, t_text_all = dist.all_gather_no_grad(t["image"]), dist.all_gather_no_grad(t["text"])
        scale = scale.reshape(())
        student_i, student_t = scale * image @ text_all.T, scale * text @ image_all.T  # (b, N) each
        teacher_i = t["logit_scale"] * t["image"] @ t_text_all.T
        teacher_t = t["logit_scale"] * t["text"] @ t_image_all.T
        return 0.5 * (self._kl.dist_loss(teacher_i, student_i) + self._kl.dist_loss(teacher_t, student_t))

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        losses = dict(self.base.cross_sample(reps, scalars))
        kl = self.teacher_term(reps["image"], reps["text"], scalars["logit_scale"])
        base = losses.pop("loss")
        return {**losses, "base": base.detach(), "distill": kl.detach(), "loss": base + self.cfg.weight * kl}

    def per_sample(self, out: Tensors, batch: Dict) -> Tensors:
        return self.base.per_sample(out, batch)

    def set_seen_classes(self, classes) -> None:
        self.base.set_seen_classes(classes)


@OBJECTIVES.register("distill", DistillConfig)
def _distill(cfg: DistillConfig) -> Objective:
    return Distill(cfg)
