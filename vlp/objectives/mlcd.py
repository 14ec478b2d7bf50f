"""MLCD: multi-label cluster discrimination (An et al., 2024), and the coupled MLC baseline.

Each image carries its l nearest cluster centers as positive labels (``cluster_ids``,
written by ``vlp cluster`` and joined onto the stream by ``data.cluster_labels``). The
``mlcd_cluster`` head (``vlp/models/cluster_head.py``) scores the image against the
centers active this step; with cosines c, scale s, margin m, P_i the positives of row i and
N_i the sampled negatives (active centers that are not positives of row i):

    mlcd:  L_i = log(1 + Σ_{p∈P_i} e^{-s(c_p - m)}) + log(1 + Σ_{n∈N_i} e^{s·c_n})
    mlc:   L_i = log(1 + Σ_{p∈P_i} Σ_{n∈N_i} e^{s(c_n - c_p + m)})

(one positive p, one negative n: mlcd = softplus(-s(p - m)) + softplus(s·n), mlc =
softplus(s(n - p + m))). In mlcd the gradient of the positive term does not depend on the
negatives; in mlc every positive competes with every negative.

Negative sampling (PartialFC): ``begin_step`` gathers the positives of the global batch,
keeps them all, and adds ceil(r·(K - #positives)) of the other centers drawn with the
step's shared generator, so every rank and chunk scores the same S centers. The loss is
per-sample (summed over each chunk; the step divides by the local batch), so it runs in
the gradient-cached step unchanged. ``contrastive_weight`` > 0 adds that multiple of the
CLIP InfoNCE loss on image/text as the cross-sample part (``weight`` scales the cluster loss).

A sharded head (``sharded: true``: each rank holds K/W centers, ``vlp/engine/sharded.py``)
turns the cluster loss into a cross-sample one: each rank scores the gathered batch against
its own active centers and a differentiable all-reduce adds the shards' sums
(``sharded_rows``), so it runs once per step on the cached representations.

Shapes: c rows in a chunk, l positives per row, K centers, S active centers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from vlp import dist
from vlp.objectives.base import OBJECTIVES, Objective, StepContext, Tensors
from vlp.objectives.contrastive import InfoNCE, InfoNCEConfig

_SAMPLE_SALT = 5  # ctx.generator salt of the negative draw


# ------------------------------------------------------------------ the losses, per row
def _log1p_sum_exp(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(1 + Σ_{j: mask_ij} e^{z_ij}) per row i (c,), stable; 0 for an empty row."""
    zeros = z.new_zeros(z.shape[0], 1)
    return torch.logsumexp(torch.cat([zeros, z.masked_fill(~mask, -math.inf)], dim=1), dim=1)


def _logsumexp_masked(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log Σ_{j: mask_ij} e^{z_ij} per row (c,); -inf (zero gradient) for an empty row."""
    has = mask.any(dim=1)
    filled = torch.where(has[:, None], z.masked_fill(~mask, -math.inf), torch.zeros_like(z))
    return torch.where(has, torch.logsumexp(filled, dim=1), torch.full_like(has, -math.inf, dtype=z.dtype))


def mlcd_rows(cos: torch.Tensor, pos: torch.Tensor, scale: float, margin: float = 0.0,
              neg: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MLCD loss per row (c,) from cosines (c, S) and a positive mask (c, S); negatives
    are ``neg`` (default: every column that is not a positive)."""
    neg = ~pos if neg is None else neg
    return _log1p_sum_exp(-scale * (cos - margin), pos) + _log1p_sum_exp(scale * cos, neg)


def mlc_rows(cos: torch.Tensor, pos: torch.Tensor, scale: float, margin: float = 0.0,
             neg: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Coupled MLC loss per row (c,): log(1 + Σ_p Σ_n e^{s(c_n - c_p + m)}) = softplus(LSE_p + LSE_n)."""
    neg = ~pos if neg is None else neg
    return F.softplus(_logsumexp_masked(-scale * (cos - margin), pos) + _logsumexp_masked(scale * cos, neg))


def positive_mask(cluster_ids: torch.Tensor, columns: torch.Tensor, num_active: int) -> torch.Tensor:
    """(c, S) bool: row i's positive centers (ids (c, l)) among the active columns.

    ``columns`` (K,) maps a center id to its active column (-1: not active)."""
    col = columns.to(cluster_ids.device)[cluster_ids]  # (c, l)
    if bool((col < 0).any()):  # begin_step keeps every positive of the global batch
        raise AssertionError("a positive center is not among the active centers")
    return torch.zeros(cluster_ids.shape[0], num_active, dtype=torch.bool, device=col.device).scatter_(1, col, True)


# ------------------------------------------------------------------ negative sampling
def sample_active(positives: torch.Tensor, num_centers: int, ratio: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Sorted active center ids (S,): every id in ``positives`` plus ceil(ratio·rest) of the rest."""
    is_pos = torch.zeros(num_centers, dtype=torch.bool)
    is_pos[positives.flatten().cpu()] = True
    rest = (~is_pos).nonzero().flatten()  # (K - P,)
    take = min(len(rest), math.ceil(ratio * len(rest)))
    drawn = rest[torch.randperm(len(rest), generator=generator)[:take]]
    return torch.cat([is_pos.nonzero().flatten(), drawn]).sort().values


# ------------------------------------------------------------------ the objective
@dataclass
class MLCDConfig:
    head: str = "cluster"  # the key of the mlcd_cluster head in model.heads
    scale: float = 32.0  # s
    margin: float = 0.0  # m, subtracted from the positives' cosines
    sample_ratio: float = 0.1  # r: fraction of the non-positive centers scored per step (1 = all)
    weight: float = 1.0  # weight of the cluster loss
    contrastive_weight: float = 0.0  # > 0: add this times CLIP InfoNCE on image/text


class MLCD(Objective):
    """Cluster discrimination as a per-sample loss; optional InfoNCE as the cross-sample part."""

    def __init__(self, cfg: MLCDConfig, coupled: bool = False):
        super().__init__()
        if cfg.scale <= 0 or not 0.0 <= cfg.sample_ratio <= 1.0:
            raise ValueError(f"mlcd needs scale > 0 and 0 <= sample_ratio <= 1, got {cfg.scale}, {cfg.sample_ratio}")
        if cfg.weight < 0 or cfg.contrastive_weight < 0:
            raise ValueError(f"mlcd weights must be >= 0, got {cfg.weight}, {cfg.contrastive_weight}")
        self.cfg = cfg
        self.rows = mlc_rows if coupled else mlcd_rows
        self.name = "mlc" if coupled else "mlcd"
        self.clip = InfoNCE(InfoNCEConfig()) if cfg.contrastive_weight > 0 else None
        self.rep_keys = ("image", "text") if self.clip else ("image",)
        self.batch_keys = ()  # ("cluster_ids",) once begin_step meets a sharded head
        self.scalar_keys = ("logit_scale",) if self.clip else ()
        self._columns: Optional[torch.Tensor] = None  # (K,) center id -> active column, -1 if not active
        self._num_active = 0
        self._shard = None  # the head's ShardedClusterHead when it is sharded

    def begin_step(self, ctx: StepContext) -> None:
        head = self._head(ctx.model)
        ids = (ctx.batch or {}).get("cluster_ids")
        if ids is None:
            raise ValueError(f"{self.name} needs per-sample cluster_ids: set data.cluster_labels to the "
                             "assignments written by `vlp cluster`")
        k = head.num_centers
        if bool((ids < 0).any()) or bool((ids >= k).any()):
            raise ValueError(f"cluster_ids must lie in [0, {k}) for a head of {k} centers")
        self._shard = head.shard
        self.batch_keys = ("cluster_ids",) if self._shard is not None else ()
        device = (self._shard or head).weight.device
        positives = dist.all_gather_no_grad(ids.to(device)).cpu()  # (N, l)
        active = sample_active(positives, k, self.cfg.sample_ratio, ctx.generator(_SAMPLE_SALT))  # (S,)
        self._columns = torch.full((k,), -1, dtype=torch.long)
        self._columns[active] = torch.arange(len(active))
        self._num_active = len(active)
        head.set_active(active)

    def _head(self, model):
        heads = getattr(model, "heads", {})
        if self.cfg.head not in heads:
            raise ValueError(f"{self.name} needs an mlcd_cluster head model.heads.{self.cfg.head}; "
                             f"the model has heads {sorted(heads.keys()) if hasattr(heads, 'keys') else []}")
        return heads[self.cfg.head]

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        losses = {"loss": (reps["image"] * 0).sum()}  # no cross-sample part: a zero the cached step can differentiate
        if self._shard is not None:
            cos, shard_ids = self._shard(reps["image"])  # (N, S_r), (S_r,)
            rows = sharded_rows(cos, shard_ids, reps["cluster_ids"], self.cfg.scale, self.cfg.margin,
                                coupled=self.name == "mlc")  # (b,)
            losses = {"loss": self.cfg.weight * rows.mean()}
            losses[self.name] = losses["loss"].detach()
        if self.clip is not None:
            clip = self.clip.cross_sample(reps, scalars)["loss"]
            losses["loss"] = losses["loss"] + self.cfg.contrastive_weight * clip
            losses["contrastive"] = clip.detach()
        return losses

    def per_sample(self, out: Tensors, batch: Dict) -> Tensors:
        if self._columns is None:
            raise AssertionError(f"{self.name}: begin_step must run before the forward")
        if self._shard is not None:  # scored in cross_sample
            return {}
        cos = out["cluster_cos"]  # (c, S)
        if cos.shape[1] != self._num_active:
            raise AssertionError("the head scored other centers than begin_step chose")
        pos = positive_mask(batch["cluster_ids"].to(cos.device), self._columns, cos.shape[1])  # (c, S)
        rows = self.rows(cos, pos, self.cfg.scale, self.cfg.margin)  # (c,)
        return {self.name: self.cfg.weight * rows.sum()}


@OBJECTIVES.register("mlcd", MLCDConfig)
def _mlcd(cfg: MLCDConfig) -> Objective:
    return MLCD(cfg)


@OBJECTIVES.register("mlc", MLCDConfig)
def _mlc(cfg: MLCDConfig) -> Objective:
    return MLCD(cfg, coupled=True)


# ------------------------------------------------------------------ centers sharded over ranks
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward sums the ranks' gradients (each rank's loss is a summand)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return dist.all_reduce_sum(x.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return dist.all_reduce_sum(grad.contiguous().clone())


def sharded_rows(cos: torch.Tensor, shard_ids: torch.Tensor, cluster_ids: torch.Tensor, scale: float,
                 margin: float = 0.0, coupled: bool = False) -> torch.Tensor:
    """The loss of this rank's b rows (b,) from its shard of the centers.

    ``cos`` (N, S_r): the global batch against this rank's active centers ``shard_ids``
    (S_r,), as ``ShardedClusterHead`` returns them; ``cluster_ids`` (b, l): this rank's
    positives. Each rank sums e^{-s(c-m)} over its positive and e^{s·c} over its negative
    centers for all N rows; a differentiable all-reduce adds the shards' sums, and each rank
    keeps its own rows. With the engine's averaging of the towers' gradients, and each
    shard's gradient divided by W, this equals the unsharded loss (tests/test_mlcd.py).
    """
    ids_all = dist.all_gather_no_grad(cluster_ids)  # (N, l)
    pos = (ids_all[:, :, None] == shard_ids.to(ids_all.device)[None, None, :]).any(dim=1)  # (N, S_r)
    c = scale * (1.0 + abs(margin))  # exponents are <= c: sums of e^{z - c} cannot overflow
    p = _AllReduceSum.apply(torch.where(pos, torch.exp(-scale * (cos - margin) - c), 0.0).sum(1))  # (N,)
    q = _AllReduceSum.apply(torch.where(pos, 0.0, torch.exp(scale * cos - c)).sum(1))  # (N,)
    b = cluster_ids.shape[0]
    p, q = p[dist.rank() * b : (dist.rank() + 1) * b], q[dist.rank() * b : (dist.rank() + 1) * b]  # (b,)
    if coupled:  # log(1 + P·Q), P = e^c·p, Q = e^c·q
        return 2 * c + torch.log(math.exp(-2 * c) + p * q)
    return 2 * c + torch.log(math.exp(-c) + p) + torch.log(math.exp(-c) + q)
