"""CoCa: ``clip_loss_weight · contrastive + caption_loss_weight · caption cross-entropy``.

Shapes: b rows on this rank, L-1 caption positions, V vocabulary.

The contrastive part is a registered cross-sample objective (InfoNCE by default, so it
gets the cross-rank gather and the tiled path) run on the gathered representations; the
caption cross-entropy is the per-sample part, computed inside each chunk's forward.

Like open_clip's ``CoCaLoss`` the caption loss is the mean over the non-pad target
tokens of the batch, not over samples. The step divides a per-sample sum by the local
batch size b, so ``per_sample`` returns ``Σ_tokens CE · b·W / N_tok``, with ``N_tok`` the
non-pad targets of the *global* batch, counted once per step in ``begin_step`` from the
whole local batch (and summed over the W ranks). Chunks then add up to the exact
token mean, and after the engine averages gradients over ranks, W ranks equal one
process on the concatenated batch. With W = 1 the value equals ``CoCaLoss`` on the
same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

import torch
import torch.nn.functional as F

from vlp import dist
from vlp.objectives.base import OBJECTIVES, Objective, StepContext, Tensors

# the model's caption_labels at padding: vlp.models.coca.IGNORE_INDEX (torch's default), not
# imported from there because that module imports open_clip, slow for `import vlp.objectives`
IGNORE_INDEX = -100


@dataclass
class CoCaLossConfig:
    clip_loss_weight: float = 1.0  # weight of the contrastive term
    caption_loss_weight: float = 2.0  # weight of the caption cross-entropy
    # the cross-sample objective (a registry spec): infonce (CoCa's), siglip (needs model.init_logit_bias), ...
    contrastive: Dict[str, Any] = field(default_factory=lambda: {"name": "infonce"})
    pad_id: int = 0  # the tokenizer's pad id: batch text tokens not counted as caption targets
    label_smoothing: float = 0.0  # of the caption cross-entropy


class CoCaLoss(Objective):
    def __init__(self, cfg: CoCaLossConfig):
        super().__init__()
        if cfg.clip_loss_weight < 0 or cfg.caption_loss_weight < 0:
            raise ValueError(f"coca loss weights must be >= 0, got clip {cfg.clip_loss_weight} "
                             f"and caption {cfg.caption_loss_weight}")
        if cfg.contrastive.get("name") == "coca":
            raise ValueError("coca: objective.contrastive cannot be coca itself")
        self.cfg = cfg
        self.contrastive = OBJECTIVES.build(cfg.contrastive)
        self.rep_keys = self.contrastive.rep_keys
        self.batch_keys = self.contrastive.batch_keys
        self.scalar_keys = self.contrastive.scalar_keys
        self._scale = None  # b·W / N_tok of this step

    def begin_step(self, ctx: StepContext) -> None:
        self.contrastive.begin_step(ctx)
        text = ctx.batch["text"]  # (b, L): the whole local batch, all chunks
        # on the model's device: NCCL reduces device tensors only
        device = next(ctx.model.parameters()).device if ctx.model is not None else torch.device("cpu")
        counts = torch.tensor([float((text[:, 1:] != self.cfg.pad_id).sum()), float(len(text))],
                              dtype=torch.float64, device=device)
        n_tokens, n_rows = dist.all_reduce_sum(counts).tolist()  # global targets and rows
        self._scale = n_rows / max(n_tokens, 1.0)  # = b·W / N_tok (every rank has b rows)

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        losses = self.contrastive.cross_sample(reps, scalars)
        out = {k: v for k, v in losses.items() if k != "loss"}
        out["contrastive"] = losses["loss"].detach()
        out["loss"] = self.cfg.clip_loss_weight * losses["loss"]
        return out

    def per_sample(self, out: Tensors, batch: Dict) -> Tensors:
        if "caption_logits" not in out:
            raise ValueError("objective coca needs a captioning model: set model.kind: coca")
        if self._scale is None:
            raise RuntimeError("CoCaLoss.per_sample before begin_step: the step counts the caption tokens there")
        logits, labels = out["caption_logits"], out["caption_labels"]  # (c, L-1, V), (c, L-1)
        targets = int((labels != IGNORE_INDEX).sum())
        if "text" in batch and targets != int((batch["text"][:, 1:] != self.cfg.pad_id).sum()):
            raise ValueError(f"objective.pad_id {self.cfg.pad_id} is not the model's pad id "
                             "(the caption targets it counts differ from the model's caption_labels)")
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the log-softmax over V in fp32
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="sum", label_smoothing=self.cfg.label_smoothing)  # Σ over the chunk's tokens
        terms = dict(self.contrastive.per_sample(out, batch))
        terms["caption"] = self.cfg.caption_loss_weight * ce * self._scale
        return terms


@OBJECTIVES.register("coca", CoCaLossConfig)
def _coca(cfg: CoCaLossConfig) -> Objective:
    return CoCaLoss(cfg)
