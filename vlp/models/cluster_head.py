"""The MLCD cluster head: K learnable, normalised centers scoring unit-norm features.

Shapes: B rows, D embedding dim, K centers, S active centers this step (S <= K).

The ``mlcd`` objective (``vlp/objectives/mlcd.py``) picks the centers scored each step
(all positives of the global batch plus sampled negatives, PartialFC style) in its
``begin_step`` and hands their ids to the head with ``set_active``; the head then outputs
``cluster_cos`` (B, S), the cosines to those centers in that order. Without an active set
(e.g. a forward outside training) it scores all K. The scale and margin are the loss's
settings (as insightface's PartialFC keeps its margin in the loss, not in the FC layer).

Large K: by default the head is an ordinary replicated parameter, so DeepSpeed owns it; ZeRO-3
partitions the K×D matrix across ranks (each holds about K/W rows at rest and gathers it for
the forward). With ``sharded: true`` the trainer splits it (``ClusterHead.split``): each rank
keeps only its rows in a ``ShardedClusterHead``, which is no submodule of the model, so
DeepSpeed never sees (averages, partitions, gathers) them; ``vlp/engine/sharded.py`` steps
them with their own optimizer, and the objective scores them in its cross-sample part against
the gathered batch (``vlp.objectives.mlcd.sharded_rows``). Everything that loads a finished run
builds the whole head (the checkpoint's model.safetensors holds all K rows).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

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
    # true: in training each rank holds and optimizes only its K/W rows, outside DeepSpeed (PartialFC)
    sharded: bool = False


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
        self.sharded = cfg.sharded
        self.weight = nn.Parameter(_initial_centers(cfg, embed_dim))  # (K, D), normalised in forward
        self.active: Optional[torch.Tensor] = None  # (S,) center ids, set per step by the objective
        self.shard: Optional[ShardedClusterHead] = None  # this rank's rows once ``split``

    def set_active(self, ids: Optional[torch.Tensor]) -> None:
        """Score only these center ids (S,), in this order; None = all K."""
        self.active = ids
        if self.shard is not None:
            self.shard.set_active(ids)

    def split(self, rank: int, world: int) -> ShardedClusterHead:
        """Keep rows ``[lo, hi)`` of this rank in ``self.shard`` and drop the whole matrix."""
        shard = ShardedClusterHead(self.weight.data, rank, world)
        del self.weight
        # not a submodule: the model's parameters (what DeepSpeed owns) must not include the shard
        self.__dict__["shard"] = shard
        return shard

    def forward(self, out: Tensors, inputs: Tensors) -> Tensors:
        if self.input not in out:
            raise ValueError(f"mlcd_cluster scores model output {self.input!r}, which this forward lacks")
        if self.shard is not None:  # the cosines need the global batch: the objective's cross-sample part
            return {}
        x = out[self.input]  # (B, D) unit-norm
        w = self.weight if self.active is None else self.weight[self.active.to(self.weight.device)]
        w = F.normalize(w, dim=-1)  # (S, D)
        return {"cluster_cos": x @ w.to(x.dtype).T}  # (B, S)


@HEADS.register("mlcd_cluster", ClusterHeadConfig)
def _cluster_head(cfg: ClusterHeadConfig, embed_dim: int) -> nn.Module:
    return ClusterHead(cfg, embed_dim)


def shard_rows(k: int, rank: int, world: int) -> Tuple[int, int]:
    """Rows ``[lo, hi)`` of ``rank``: K // W each, the last rank also takes the K % W left over."""
    if k < world:
        raise ValueError(f"a sharded mlcd_cluster head needs num_centers >= ranks, got {k} centers on {world} ranks")
    per = k // world
    return rank * per, (k if rank == world - 1 else (rank + 1) * per)


class ShardedClusterHead(nn.Module):
    """This rank's rows ``[lo, hi)`` of the K centers (``shard_rows``).

    ``forward(x)`` with this rank's unit-norm rows x (b, D) gathers the global batch
    (differentiably) and returns its cosines to the active centers of this shard
    (W·b, S_r) together with their global ids (S_r,). ``vlp.objectives.mlcd.sharded_rows``
    turns those into the loss of this rank's rows.
    """

    def __init__(self, centers: torch.Tensor, rank: Optional[int] = None, world: Optional[int] = None):
        super().__init__()
        rank, world = dist.rank() if rank is None else rank, dist.world_size() if world is None else world
        self.num_centers = centers.shape[0]
        self.lo, self.hi = shard_rows(self.num_centers, rank, world)
        self.weight = nn.Parameter(centers[self.lo : self.hi].clone())  # (K_r, D)
        self.active: Optional[torch.Tensor] = None

    def set_active(self, ids: Optional[torch.Tensor]) -> None:
        self.active = ids

    def forward(self, x: torch.Tensor):
        x_all = dist.all_gather_with_grad(x)  # (N, D)
        ids = torch.arange(self.lo, self.hi) if self.active is None else self.active.cpu()
        ids = ids[(ids >= self.lo) & (ids < self.hi)]  # (S_r,) this shard's active ids, in order
        w = F.normalize(self.weight[ids.to(self.weight.device) - self.lo], dim=-1)  # (S_r, D)
        return x_all.to(w.dtype) @ w.T, ids  # (N, S_r) in the rows' precision (fp32 masters), (S_r,)
