"""The MLCD cluster head: K learnable, normalised centers scoring unit-norm features.

Shapes: B rows, D embedding dim, K centers, S active centers this step (S <= K).

The ``mlcd`` objective (``vlp/objectives/mlcd.py``) picks the centers scored each step
(all positives of the global batch plus sampled negatives, PartialFC style) in its
``begin_step`` and hands their ids to the head with ``set_active``; the head then outputs
``cluster_cos`` (B, S), the cosines to those centers in that order. Without an active set
(e.g. a forward outside training) it scores all K. The scale and margin are the loss's
settings (as insightface's PartialFC keeps its margin in the loss, not in the FC layer).

Large K: the head is an ordinary replicated parameter, so DeepSpeed owns it; ZeRO-3
partitions the K×D matrix across ranks (each holds about K/W rows at rest and gathers it
for the forward). ``ShardedClusterHead`` is the model-parallel alternative (each rank
holds and scores only its K/W rows against the gathered batch, the loss combines per-shard
sums with a differentiable all-reduce): it is exact (tests/test_mlcd.py, 2 gloo ranks) but
its rows must not be averaged across ranks, so it needs an optimizer outside the DeepSpeed
engine, which the trainer does not wire yet; it is not registered as a config head.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlp import dist
from vlp.models.heads import HEADS

Tensors = Dict[str, torch.Tensor]
CENTERS_KEY = "centers"  # the tensor name in centers.safetensors (written by `vlp cluster`)


@dataclass
class ClusterHeadConfig:
    num_centers: int = 1000  # K
    # centers.safetensors from `vlp cluster` ((K, D) under "centers"); None = random unit rows
    centers: Optional[str] = None
    input: str = "image"  # which unit-norm model output the head scores


def load_centers(path: str) -> torch.Tensor:
    """(K, D) float centers from a ``centers.safetensors`` file."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"cluster centers not found: {path} (write them with `vlp cluster`)")
    tensors = load_file(path)
    if CENTERS_KEY not in tensors or tensors[CENTERS_KEY].ndim != 2:
        raise ValueError(f"{path} has no (K, D) tensor named {CENTERS_KEY!r}")
    return tensors[CENTERS_KEY].float()


def _initial_centers(cfg: ClusterHeadConfig, embed_dim: int) -> torch.Tensor:
    if cfg.num_centers < 1:
        raise ValueError(f"mlcd_cluster num_centers must be >= 1, got {cfg.num_centers}")
    if cfg.centers is None:
        return F.normalize(torch.randn(cfg.num_centers, embed_dim), dim=-1)
    centers = load_centers(cfg.centers)
    if tuple(centers.shape) != (cfg.num_centers, embed_dim):
        raise ValueError(
            f"{cfg.centers} holds centers of shape {tuple(centers.shape)}; the head needs "
            f"(num_centers={cfg.num_centers}, embed_dim={embed_dim})"
        )
    return F.normalize(centers, dim=-1)


class ClusterHead(nn.Module):
    """``forward(out, inputs) -> {"cluster_cos": (B, S)}``: cosines of ``out[input]`` to the active centers."""

    def __init__(self, cfg: ClusterHeadConfig, embed_dim: int):
        super().__init__()
        self.input = cfg.input
        self.num_centers = cfg.num_centers
        self.weight = nn.Parameter(_initial_centers(cfg, embed_dim))  # (K, D), normalised in forward
        self.active: Optional[torch.Tensor] = None  # (S,) center ids, set per step by the objective

    def set_active(self, ids: Optional[torch.Tensor]) -> None:
        """Score only these center ids (S,), in this order; None = all K."""
        self.active = ids

    def forward(self, out: Tensors, inputs: Tensors) -> Tensors:
        if self.input not in out:
            raise ValueError(f"mlcd_cluster scores model output {self.input!r}, which this forward lacks")
        x = out[self.input]  # (B, D) unit-norm
        w = self.weight if self.active is None else self.weight[self.active.to(self.weight.device)]
        w = F.normalize(w, dim=-1)  # (S, D)
        return {"cluster_cos": x @ w.to(x.dtype).T}  # (B, S)


@HEADS.register("mlcd_cluster", ClusterHeadConfig)
def _cluster_head(cfg: ClusterHeadConfig, embed_dim: int) -> nn.Module:
    return ClusterHead(cfg, embed_dim)


class ShardedClusterHead(nn.Module):
    """This rank's rows ``[lo, hi)`` of the K centers (K/W each, the last rank takes the rest).

    ``forward(x)`` with this rank's unit-norm rows x (b, D) gathers the global batch
    (differentiably) and returns its cosines to the active centers of this shard
    (W·b, S_r) together with their global ids (S_r,). ``vlp.objectives.mlcd.sharded_mlcd_loss``
    turns those into the loss of this rank's rows.
    """

    def __init__(self, centers: torch.Tensor, rank: Optional[int] = None, world: Optional[int] = None):
        super().__init__()
        rank, world = dist.rank() if rank is None else rank, dist.world_size() if world is None else world
        k = centers.shape[0]
        per = k // world
        self.lo, self.hi = rank * per, (k if rank == world - 1 else (rank + 1) * per)
        self.num_centers = k
        self.weight = nn.Parameter(centers[self.lo : self.hi].clone())  # (K_r, D)
        self.active: Optional[torch.Tensor] = None

    def set_active(self, ids: Optional[torch.Tensor]) -> None:
        self.active = ids

    def forward(self, x: torch.Tensor):
        x_all = dist.all_gather_with_grad(x)  # (N, D)
        ids = torch.arange(self.lo, self.hi) if self.active is None else self.active
        ids = ids[(ids >= self.lo) & (ids < self.hi)]  # (S_r,) this shard's active ids, in order
        w = F.normalize(self.weight[ids - self.lo], dim=-1)  # (S_r, D)
        return x_all @ w.T, ids  # (N, S_r), (S_r,)
