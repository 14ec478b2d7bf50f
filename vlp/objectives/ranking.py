"""Ranking losses: the Mann-Whitney (AUC) loss of Sheikholeslami et al., 2025.

Shapes: b = rows on this rank, N = W*b rows in the global batch, D = embedding dim.
Scores are raw cosine similarities (unit-norm embeddings); the paper fixes the
temperature, so the model's logit scale is not read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlp import dist
from vlp.objectives.base import OBJECTIVES, Objective, Tensors
from vlp.objectives.contrastive import _local_labels


@dataclass
class MWAUCConfig:
    tau: float = 0.01  # temperature of the pairwise sigmoid


def mw_rows(scores: torch.Tensor, pos: torch.Tensor, tau: float) -> torch.Tensor:
    """(1/b) Σ_i Σ_{j≠pos_i} -log σ((s_{i,pos_i} - s_ij)/τ) for scores (b, N), pos (b,) columns."""
    s_pos = scores.gather(1, pos[:, None])  # (b, 1)
    pair = -F.logsigmoid((s_pos - scores) / tau)  # (b, N): one BCE term per (positive, negative) pair
    pair = pair.masked_fill(F.one_hot(pos, scores.shape[1]).bool(), 0.0)  # the positive is no negative
    return pair.sum() / scores.shape[0]


class MWAUC(Objective):
    """L = ½ [ MW(X·Yᵀ) + MW(Y·Xᵀ) ],  MW(S) = -(1/N) Σ_i Σ_{j≠i} log σ((S_ii - S_ij)/τ).

    Each query's positive is compared with each of its N-1 in-batch negatives (summed, not
    averaged, as in the paper). Per query this depends on the scores only through the
    margins S_ii - S_ij, so like InfoNCE it is unchanged by adding a constant to all of one
    query's scores; unlike InfoNCE, which sees a query's negatives only through
    log Σ_j exp(S_ij/τ), it penalises every mis-ranked pair separately.
    """

    scalar_keys = ()

    def __init__(self, cfg: MWAUCConfig):
        super().__init__()
        if cfg.tau <= 0:
            raise ValueError(f"mw_auc: tau must be > 0, got {cfg.tau}")
        self.tau = cfg.tau

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        x, y = reps["image"], reps["text"]  # (b, D)
        x_all, y_all = dist.all_gather_with_grad(x), dist.all_gather_with_grad(y)  # (N, D)
        pos = _local_labels(x.shape[0], x.device)
        loss = 0.5 * (mw_rows(x @ y_all.T, pos, self.tau) + mw_rows(y @ x_all.T, pos, self.tau))  # (b, N) each
        return {"loss": loss, "ranking": loss.detach()}


@OBJECTIVES.register("mw_auc", MWAUCConfig)
def _mw_auc(cfg: MWAUCConfig) -> Objective:
    return MWAUC(cfg)
