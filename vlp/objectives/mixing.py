"""Hard negative mixing (MoCHi, Kalantidis et al., 2020) for image-text InfoNCE.

Shapes: b = queries on this rank, N = W*b keys in the global batch, D = embedding dim,
K = hardest negatives used per query, S = mixes of two negatives, Q = mixes of the
query with a negative.

Random draws are a function of (seed, direction, global row) only: they do not depend on
how rows are split over ranks or chunks, and ``cross_sample`` stays a pure function of
its inputs (the gradient cache calls it once on cached representations). The draws for a
row position therefore repeat from step to step; the negatives they mix do not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

from vlp import dist
from vlp.objectives.base import OBJECTIVES, Objective, Tensors
from vlp.objectives.contrastive import _local_labels

_M64 = 2**64 - 1


def _seed32(*values: int) -> int:
    """A 32-bit seed mixing non-negative ints (splitmix64 steps): torch's CPU generator
    keeps only the low 32 bits of a seed, so (seed, direction, row) must be hashed, not packed."""
    z = 0
    for v in values:
        z = (z + v + 0x9E3779B97F4A7C15) & _M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        z ^= z >> 31
    return z >> 32


@dataclass
class HardNegativeMixingConfig:
    hardest: int = 16  # K: the query's hardest negatives that get mixed (capped at N - 1)
    mixes: int = 16  # S: synthetic negatives α·n_a + (1-α)·n_b per query, α ~ U(0, 1)
    query_mixes: int = 8  # Q: synthetic negatives β·q + (1-β)·n_c per query, β ~ U(0, ½)
    seed: int = 0  # salt of the mixing draws (shared by all ranks)


class HardNegativeMixing(Objective):
    """InfoNCE whose negatives are extended, per query, by points mixed from its hardest ones.

    For a query q_i (x_i for image→text, y_i for text→image) with keys k (the other
    modality, global batch) and H_i = its K highest-scoring negatives k_j, j ≠ i:
        h  = normalize(α·n_a + (1-α)·n_b),  n_a, n_b ∈ H_i,  α ~ U(0, 1)     (S of them)
        h' = normalize(β·q_i + (1-β)·n_c),  n_c ∈ H_i,       β ~ U(0, ½)     (Q of them)
    all detached (no gradient through synthetic points, as in MoCHi), and only in q_i's row:
        L_i = CE([s·q_i·kᵀ (N) | s·q_i·hᵀ (S) | s·q_i·h'ᵀ (Q)], i)
        L = ½ [ (1/N) Σ_i L_i^{image→text} + (1/N) Σ_i L_i^{text→image} ]
    With S = Q = 0 this is InfoNCE. h' lies on the shorter great-circle arc from n_c to q_i,
    so q_i·h' ≥ q_i·n_c; β < ½ keeps it nearer n_c than q_i (and β·q + (1-β)·n ≠ 0).
    """

    def __init__(self, cfg: HardNegativeMixingConfig):
        super().__init__()
        counts = {k: getattr(cfg, k) for k in ("hardest", "mixes", "query_mixes")}
        if cfg.hardest < 1 or min(counts.values()) < 0:
            raise ValueError(f"hard_negative_mixing: need hardest >= 1, mixes >= 0, query_mixes >= 0; got {counts}")
        if cfg.seed < 0:
            raise ValueError(f"hard_negative_mixing: seed must be >= 0, got {cfg.seed}")
        self.cfg = cfg

    def _uniforms(self, rows: torch.Tensor, direction: int, n: int) -> torch.Tensor:
        """(b, n) float64 draws in [0, 1), one generator per (seed, direction, global row)."""
        out = torch.empty(len(rows), n, dtype=torch.float64)
        gen = torch.Generator()
        for k, row in enumerate(rows.tolist()):
            gen.manual_seed(_seed32(self.cfg.seed, direction, row))
            out[k] = torch.rand(n, generator=gen, dtype=torch.float64)
        return out.to(rows.device)

    def synthesize(self, q: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, direction: int) -> Dict:
        """Synthetic negatives for queries q (b, D) against keys (N, D); rows (b,) are the
        queries' global rows (their positive keys). Returns detached ``mix`` (b, S, D),
        ``query_mix`` (b, Q, D), ``query_mix_cols`` (b, Q): the key each h' mixes, and
        ``hard`` (b, K): the hardest negatives' key columns."""
        q, keys, cfg = q.detach(), keys.detach(), self.cfg
        k = min(cfg.hardest, keys.shape[0] - 1)
        s, nq = (cfg.mixes, cfg.query_mixes) if k > 0 else (0, 0)
        scores = (q @ keys.T).scatter(1, rows[:, None], -torch.inf)  # (b, N): the positive is no negative
        hard = scores.topk(k, dim=1).indices  # (b, K)
        u = self._uniforms(rows, direction, 3 * s + 2 * nq)  # (b, 3S + 2Q)
        pick = lambda v: hard.gather(1, (v * k).long().clamp_max(k - 1))  # noqa: E731  U[0,1) -> a column of H_i
        alpha = u[:, 2 * s : 3 * s, None].to(q.dtype)  # (b, S, 1)
        mix = alpha * keys[pick(u[:, :s])] + (1 - alpha) * keys[pick(u[:, s : 2 * s])]  # (b, S, D)
        cols = pick(u[:, 3 * s : 3 * s + nq])  # (b, Q)
        beta = 0.5 * u[:, 3 * s + nq :, None].to(q.dtype)  # (b, Q, 1)
        query_mix = beta * q[:, None, :] + (1 - beta) * keys[cols]  # (b, Q, D)
        return {"mix": F.normalize(mix, dim=-1), "query_mix": F.normalize(query_mix, dim=-1),
                "query_mix_cols": cols, "hard": hard}

    def _direction(self, q, keys, rows, scale, direction: int) -> torch.Tensor:
        syn = self.synthesize(q, keys, rows, direction)
        extra = torch.cat([syn["mix"], syn["query_mix"]], dim=1)  # (b, S + Q, D), no grad
        logits = torch.cat([q @ keys.T, torch.einsum("bd,bkd->bk", q, extra)], dim=1)  # (b, N + S + Q)
        return F.cross_entropy(scale * logits, rows)

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        x, y, scale = reps["image"], reps["text"], scalars["logit_scale"]  # (b, D), (b, D), (1,)
        x_all, y_all = dist.all_gather_with_grad(x), dist.all_gather_with_grad(y)  # (N, D)
        rows = _local_labels(x.shape[0], x.device)
        loss = 0.5 * (self._direction(x, y_all, rows, scale, 0) + self._direction(y, x_all, rows, scale, 1))
        return {"loss": loss, "contrastive": loss.detach()}


@OBJECTIVES.register("hard_negative_mixing", HardNegativeMixingConfig)
def _hard_negative_mixing(cfg: HardNegativeMixingConfig) -> Objective:
    return HardNegativeMixing(cfg)
