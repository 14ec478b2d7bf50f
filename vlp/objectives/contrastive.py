"""CLIP (InfoNCE) and SigLIP on the global batch.

Shapes: b = rows on this rank, N = W*b rows in the global batch, D = embedding dim.
Each rank scores its b rows against all N columns (open_clip's ``local_loss`` with
``gather_with_grad``); the differentiable gather sends column gradients back to their
owners, so after the engine averages parameter gradients over ranks they equal the
gradient of the single-process loss on the concatenated batch.

Above ``tile_above`` global rows InfoNCE switches to the tiled loss of
``vlp.objectives.tiled`` (same value and gradients, no (b, N) logits in memory).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlp.engine import dist
from vlp.objectives.base import OBJECTIVES, Objective, Tensors
from vlp.objectives.tiled import rows_infonce, symmetric_infonce


def _local_labels(b: int, device) -> torch.Tensor:
    return torch.arange(b, device=device) + dist.rank() * b  # (b,) positives' global columns


@dataclass
class InfoNCEConfig:
    label_smoothing: float = 0.0
    tile_above: int = 4096  # global batch N above which the loss is tiled (no (b, N) logits)
    tile_size: int = 2048  # T: rows and columns of one logit tile; memory ~ 2·T² floats (32 MB fp32)


class InfoNCE(Objective):
    """L = ½ [CE(s·x_i·Yᵀ, i) + CE(s·y_i·Xᵀ, i)] averaged over rows i (x, y unit-norm)."""

    def __init__(self, cfg: InfoNCEConfig):
        super().__init__()
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise ValueError(f"infonce label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
        if cfg.tile_above < 0 or cfg.tile_size < 1:
            raise ValueError(
                f"infonce needs tile_above >= 0 and tile_size >= 1, got {cfg.tile_above} and {cfg.tile_size}"
            )
        self.cfg = cfg
        self.label_smoothing = cfg.label_smoothing

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        x, y, scale = reps["image"], reps["text"], scalars["logit_scale"]  # (b, D), (b, D), ()
        x_all, y_all = dist.all_gather_with_grad(x), dist.all_gather_with_grad(y)  # (N, D)
        if x_all.shape[0] > self.cfg.tile_above:
            loss = self._tiled(x, y, x_all, y_all, scale)
        else:
            labels = _local_labels(x.shape[0], x.device)
            ce = lambda logits: F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)  # noqa: E731
            loss = 0.5 * (ce(scale * x @ y_all.T) + ce(scale * y @ x_all.T))  # (b, N) logits each
        return {"loss": loss, "contrastive": loss.detach()}

    def _tiled(self, x, y, x_all, y_all, scale):
        t, eps = self.cfg.tile_size, self.label_smoothing
        if dist.world_size() == 1:  # s·Y·Xᵀ is the transpose of s·X·Yᵀ: one pass serves both directions
            return symmetric_infonce(x, y, scale, t, eps)
        # local rows against global columns: the two directions are different (b, N) slabs
        return 0.5 * (rows_infonce(x, y, y_all, scale, t, eps) + rows_infonce(y, x, x_all, scale, t, eps))


@OBJECTIVES.register("infonce", InfoNCEConfig)
@OBJECTIVES.register("clip", InfoNCEConfig)
def _infonce(cfg: InfoNCEConfig) -> Objective:
    return InfoNCE(cfg)


class SigLIP(Objective):
    """L = -(1/b) Σ_i Σ_j log σ(z_ij (s·x_i·y_j + t)), z_ij = +1 on positives, -1 elsewhere."""

    scalar_keys = ("logit_scale", "logit_bias")

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        x, y = reps["image"], reps["text"]  # (b, D)
        if "logit_bias" not in scalars:
            raise ValueError("siglip needs a logit bias: set model.init_logit_bias (e.g. -10)")
        y_all = dist.all_gather_with_grad(y)  # (N, D): every text block meets every image block
        logits = scalars["logit_scale"] * x @ y_all.T + scalars["logit_bias"]  # (b, N)
        z = -torch.ones_like(logits)
        z[torch.arange(x.shape[0]), _local_labels(x.shape[0], x.device)] = 1.0
        loss = -F.logsigmoid(z * logits).sum() / x.shape[0]
        return {"loss": loss, "contrastive": loss.detach()}


@OBJECTIVES.register("siglip")
def _siglip() -> Objective:
    return SigLIP()
