"""COCONUT: continual contrastive learning with replay (Cappellazzo et al., "Continual
Contrastive Spoken Language Understanding"), for any tower (image or audio) paired with text.

Shapes: b = rows on this rank, N = W*b rows in the global batch, D = embedding dim,
C = classes of the classifier head.

The loss of one step is

    L = w_c · InfoNCE(x, y)              all rows (x: the ``modality`` features, y: text)
      + w_n · NSPT(x, t)                 rehearsal rows only (t: the frozen teacher's features)
      + w_s · CE(class_logits, label)    all rows, over the classes seen so far

NSPT (negative-student / positive-teacher), for rehearsal anchors i ∈ R:

    ℓ_i = -(1/|P(i)|) Σ_{p∈P(i)} log[ exp(x_i·t_p/τ) / Σ_{a≠i} exp(x_i·x_a/τ) ]

P(i): the other rehearsal rows with i's label (p ≠ i; with ``self_positive`` also i's own
teacher feature); a runs over every other row of the global batch (new and rehearsal).
NSPT is the mean of ℓ_i over the anchors with at least one positive, so with t = x it is
Khosla et al.'s SupCon (L_out) on the rehearsal rows. Teacher features carry no gradient.

Where the inputs come from (``vlp.continual.ContinualTrainer`` builds them):
- ``label`` (b,): a batch key (every row needs one);
- ``rehearsal`` (b,) long 0/1 and ``teacher`` (b, D): optional batch fields, read in
  ``begin_step`` from the local batch (``Step`` requires every ``batch_keys`` field, and
  a batch without rehearsal rows, e.g. the first task or a generic labelled batch, must
  work: NSPT is then exactly zero);
- ``class_logits`` (b, C): the ``coconut_classifier`` head's output (``vlp/models/classifier.py``:
  the one classifier head, linear, output ``class_logits``; a model head so that it runs inside
  the engine's forward). Without the head the supervised term is off (a warning says so).

The supervised term is a linear classifier head (class-incremental: cross-entropy over
the classes seen so far, ``set_seen_classes``); it is per-sample, so the gradient cache
needs nothing for it. InfoNCE and NSPT are cross-sample on the gathered batch, so
they are exact under the gradient cache like every other objective.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from vlp import dist
from vlp.objectives.base import OBJECTIVES, Objective, StepContext, Tensors
from vlp.objectives.contrastive import InfoNCE, InfoNCEConfig, _local_labels

MODALITIES = ("image", "audio")


def nspt_rows(x: torch.Tensor, x_all: torch.Tensor, t_all: torch.Tensor, pos: torch.Tensor,
              self_col: torch.Tensor, temperature: float) -> torch.Tensor:
    """(b,) ℓ_i (module docstring); 0 for rows without positives.

    x (b, D) local student rows, x_all (N, D) gathered student, t_all (N, D) gathered
    teacher, pos (b, N) bool positives, self_col (b,) each row's own global column."""
    b, n = pos.shape
    own = self_col[:, None] == torch.arange(n, device=x.device)[None, :]  # (b, N)
    neg_logits = (x @ x_all.T / temperature).masked_fill(own, float("-inf"))  # (b, N), a ≠ i
    denom = neg_logits.logsumexp(-1)  # (b,)
    pos_logits = x @ t_all.T / temperature  # (b, N)
    count = pos.sum(-1)  # (b,)
    # mean over positives of (denom - pos_logit); masked_fill, not multiply, keeps it finite
    summed = (denom[:, None] - pos_logits).masked_fill(~pos, 0.0).sum(-1)  # (b,)
    return summed / count.clamp_min(1)


def nspt_loss(x: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, rehearsal: torch.Tensor,
              temperature: float, self_positive: bool = False) -> torch.Tensor:
    """NSPT on the global batch, as this rank's share: mean over ranks = the single-process loss.

    x (b, D) this rank's student features (with grad), teacher (b, D), labels (b,),
    rehearsal (b,) 0/1. Returns W · Σ_{local anchors} ℓ_i / (global anchors with positives)."""
    x_all = dist.all_gather_with_grad(x)  # (N, D)
    t_all = dist.all_gather_no_grad(teacher.to(x.dtype))  # (N, D)
    y_all = dist.all_gather_no_grad(labels)  # (N,)
    r_all = dist.all_gather_no_grad(rehearsal.long()).bool()  # (N,)
    b = x.shape[0]
    self_col = _local_labels(b, x.device)  # (b,) own global column
    r = rehearsal.bool()  # (b,)
    pos = r[:, None] & r_all[None, :] & (labels[:, None] == y_all[None, :])  # (b, N)
    if not self_positive:
        pos = pos & (self_col[:, None] != torch.arange(x_all.shape[0], device=x.device)[None, :])
    anchors = pos.any(-1)  # (b,) rehearsal rows with a positive
    n_anchors = dist.all_reduce_sum(anchors.sum().to(torch.float64).reshape(1))  # global count
    if float(n_anchors) == 0:
        return x.sum() * 0.0  # keeps the graph (and a zero gradient) on every rank
    rows = nspt_rows(x, x_all, t_all, pos, self_col, temperature)  # (b,)
    return rows[anchors].sum() * dist.world_size() / n_anchors.to(x.dtype).squeeze()


@dataclass
class CoconutConfig:
    modality: str = "image"  # the tower NSPT and the classifier read: image or audio (paired with text)
    temperature: float = 0.1  # τ of NSPT (fixed, as in the paper)
    nspt_weight: float = 1.0  # 0: replay without NSPT
    contrastive_weight: float = 1.0  # InfoNCE modality-text on every row (learnable logit scale)
    supervised_weight: float = 1.0  # classifier CE over the seen classes (needs the coconut_classifier head)
    self_positive: bool = False  # also count i's own teacher feature as a positive of anchor i


class Coconut(Objective):
    """InfoNCE on all rows + NSPT on rehearsal rows + class-incremental classifier CE."""

    batch_keys = ("label",)

    def __init__(self, cfg: CoconutConfig):
        super().__init__()
        if cfg.modality not in MODALITIES:
            raise ValueError(f"coconut modality must be one of {', '.join(MODALITIES)}, got {cfg.modality!r}")
        if not cfg.temperature > 0:
            raise ValueError(f"coconut temperature must be > 0, got {cfg.temperature}")
        for name in ("nspt_weight", "contrastive_weight", "supervised_weight"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"coconut {name} must be >= 0, got {getattr(cfg, name)}")
        self.cfg = cfg
        self.modality = cfg.modality
        self.rep_keys = (cfg.modality, "text")
        self.contrastive = InfoNCE(InfoNCEConfig(modalities=[cfg.modality, "text"]))
        self.seen: Optional[torch.Tensor] = None  # (C',) seen class ids; None = every class
        self._rehearsal: Optional[torch.Tensor] = None  # (b,) of the current step
        self._teacher: Optional[torch.Tensor] = None  # (b, D)
        self._warned = False

    def set_seen_classes(self, classes: Optional[Sequence[int]]) -> None:
        """Restrict the classifier CE to these class ids (class-incremental); None: all."""
        self.seen = None if classes is None else torch.tensor(sorted(set(classes)), dtype=torch.long)

    def begin_step(self, ctx: StepContext) -> None:
        batch = ctx.batch or {}
        self._rehearsal = batch.get("rehearsal")
        self._teacher = batch.get("teacher")
        if (self._rehearsal is None) != (self._teacher is None):
            raise ValueError("coconut needs both batch fields 'rehearsal' and 'teacher', or neither")

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        x, labels = reps[self.modality], reps["label"]  # (b, D), (b,)
        contrastive = self.contrastive.cross_sample({self.modality: x, "text": reps["text"]}, scalars)["loss"]
        rehearsal, teacher = self._rehearsal, self._teacher
        if rehearsal is None or rehearsal.shape[0] != x.shape[0]:  # no rehearsal fields this step
            rehearsal, teacher = torch.zeros_like(labels), torch.zeros_like(x)
        nspt = nspt_loss(x, teacher.to(x.device), labels, rehearsal.to(x.device), self.cfg.temperature,
                         self.cfg.self_positive)
        loss = self.cfg.contrastive_weight * contrastive + self.cfg.nspt_weight * nspt
        return {"loss": loss, "contrastive": contrastive.detach(), "nspt": nspt.detach()}

    def per_sample(self, out: Tensors, batch: Dict) -> Tensors:
        if not self.cfg.supervised_weight:
            return {}
        if "class_logits" not in out:
            if not self._warned:
                warnings.warn("coconut: the model has no coconut_classifier head (model.heads); "
                              "the supervised term is off")
                self._warned = True
            return {}
        logits = out["class_logits"]  # (b, C)
        labels = batch["label"].to(logits.device)  # (b,)
        if self.seen is not None:  # class-incremental: only the classes seen so far compete
            allowed = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
            allowed[self.seen.to(logits.device)] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
        ce = F.cross_entropy(logits, labels, reduction="sum")  # a sum over the chunk (see base.py)
        return {"supervised": self.cfg.supervised_weight * ce}


@OBJECTIVES.register("coconut", CoconutConfig)
def _coconut(cfg: CoconutConfig) -> Objective:
    return Coconut(cfg)
