"""Multi-view contrastive losses: MV-InfoNCE and MV-DHEL (Koromilas et al., 2025).

Each sample i has M views u_i1..u_iM (unit-norm), read from the rep keys listed in the
``views`` setting (modalities or augmentations); s is the logit scale (1/τ).
Shapes: b = samples on this rank, N = W*b samples in the global batch, M = views,
D = embedding dim. Each rank computes the terms of its b samples against the gathered
views of all N samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F

from vlp import dist
from vlp.objectives.base import OBJECTIVES, Objective, Tensors
from vlp.objectives.contrastive import _local_labels


@dataclass
class MultiViewConfig:
    views: List[str] = field(default_factory=lambda: ["image", "text"])  # rep keys, one per view


def _off_diagonal(m: int, device) -> torch.Tensor:
    return ~torch.eye(m, dtype=torch.bool, device=device)  # (M, M)


class _MultiView(Objective):
    def __init__(self, cfg: MultiViewConfig, name: str):
        super().__init__()
        views = list(cfg.views)
        if len(views) < 2 or len(set(views)) != len(views):
            raise ValueError(f"{name}: views must name at least 2 distinct rep keys, got {views}")
        self.rep_keys = tuple(views)

    def _views(self, reps: Tensors):
        """This rank's views (b, M, D), all views (M, N, D) gathered, and the b global rows."""
        local = torch.stack([reps[k] for k in self.rep_keys], dim=1)  # (b, M, D)
        every = torch.stack([dist.all_gather_with_grad(reps[k]) for k in self.rep_keys])  # (M, N, D)
        return local, every, _local_labels(local.shape[0], local.device)

    @staticmethod
    def _positive_logits(local: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return scale * torch.einsum("bld,bmd->blm", local, local)  # (b, M, M): s·u_il·u_im


class MVInfoNCE(_MultiView):
    """One multi-positive softmax term per sample over all views of all samples:

        L = -(1/N) Σ_i log [ Σ_{l≠m} exp(s·u_il·u_im) / Σ_l Σ_{(j,m)≠(i,l)} exp(s·u_il·u_jm) ]

    The numerator holds every ordered pair of the sample's own views; the denominator every
    view u_il against every other embedding in the batch (other samples in any view, and
    the sample's own other views), self-similarities excluded. As in the authors' code.
    """

    def __init__(self, cfg: MultiViewConfig):
        super().__init__(cfg, "mv_infonce")

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        local, every, rows = self._views(reps)
        (_, m, _), n, scale = local.shape, every.shape[1], scalars["logit_scale"]
        pos = self._positive_logits(local, scale)[:, _off_diagonal(m, local.device)]  # (b, M(M-1))
        # every view u_il against every embedding u_jm, column k = m·N + j of the view-major batch
        den = scale * torch.einsum("bld,kd->blk", local, every.flatten(0, 1))  # (b, M, M·N)
        self_col = torch.arange(m, device=local.device)[None, :] * n + rows[:, None]  # (b, M): u_il itself
        is_self = torch.zeros_like(den, dtype=torch.bool).scatter_(2, self_col[..., None], True)
        den = den.masked_fill(is_self, -math.inf).flatten(1)  # (b, M·M·N)
        loss = (torch.logsumexp(den, dim=1) - torch.logsumexp(pos, dim=1)).mean()
        return {"loss": loss, "contrastive": loss.detach()}


class MVDHEL(_MultiView):
    """Decoupled hyperspherical energy loss over M views: alignment over the sample's view
    pairs, uniformity with negatives from the same view only (no positive in a denominator):

        L = (1/N) Σ_i [ Σ_l log Σ_{j≠i} exp(s·u_il·u_jl) - log Σ_{l<m} exp(s·u_il·u_im) ]

    For M = 2 (views x, y) this is two-view DHEL:
        L = -(1/N) Σ_i log [ e^{s·x_i·y_i} / (Σ_{j≠i} e^{s·x_i·x_j} · Σ_{j≠i} e^{s·y_i·y_j}) ]
    """

    def __init__(self, cfg: MultiViewConfig):
        super().__init__(cfg, "mv_dhel")

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        local, every, rows = self._views(reps)
        (_, m, _), n, scale = local.shape, every.shape[1], scalars["logit_scale"]
        upper = torch.triu(torch.ones(m, m, dtype=torch.bool, device=local.device), diagonal=1)
        align = -torch.logsumexp(self._positive_logits(local, scale)[:, upper], dim=1)  # (b,)
        same_view = scale * torch.einsum("bld,ljd->blj", local, every)  # (b, M, N): u_il · u_jl
        is_self = F.one_hot(rows, n).bool()[:, None, :]  # (b, 1, N)
        uniform = torch.logsumexp(same_view.masked_fill(is_self, -math.inf), dim=2).sum(1)  # (b,)
        loss = (align + uniform).mean()
        return {"loss": loss, "align": align.mean().detach(), "uniform": uniform.mean().detach()}


@OBJECTIVES.register("mv_infonce", MultiViewConfig)
def _mv_infonce(cfg: MultiViewConfig) -> Objective:
    return MVInfoNCE(cfg)


@OBJECTIVES.register("mv_dhel", MultiViewConfig)
def _mv_dhel(cfg: MultiViewConfig) -> Objective:
    return MVDHEL(cfg)
