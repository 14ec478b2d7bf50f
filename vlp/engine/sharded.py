"""Heads sharded over ranks (``model.heads.<key>.sharded: true``): each rank holds K/W rows and
their optimizer state, outside the DeepSpeed engine (docs/methods/mlcd.md, "Sharded head").

Why outside: DeepSpeed averages every gradient it owns over the data-parallel ranks (and at
ZeRO-3 gathers whole parameters for the forward), but rank r's rows exist on rank r only.
So ``ShardedHeads.split`` takes them out of the model before the engine is built; the step
backpropagates into them (plain step: the engine's backward reaches them as ordinary leaves;
cached step: ``vlp/engine/step.py`` adds them to the cross-sample gradient), and
``ShardedHeads.step`` applies their own optimizer and schedule beside the engine's.

Gradient scale: each rank's loss is the mean over its b rows, and the loss of the global
batch is the mean of the W ranks' losses; a shard's rows receive the gradient of all W
losses (the all-reduce of ``sharded_rows`` sums them in its backward), so ``step`` divides
by W, where the engine averages. Clipping (``optim.grad_clip``) uses the whole head's norm
(the shards' squares summed over ranks), separate from the engine's norm of the rest.

Checkpoints: ``save`` writes ``heads_rank{r}.pt`` (rows, weights, optimizer and schedule
state); ``load`` on the same ranks restores each rank's own file, on another number of ranks
re-shards: rows and every row-shaped optimizer tensor (Adam moments, momentum) are cut from
the files that hold them. ``full_weights`` gathers every head whole for model.safetensors.
"""
from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional

import torch
from torch import nn

from vlp import dist
from vlp.engine.optim import OptimConfig, build_optimizer, build_scheduler
from vlp.models.cluster_head import ShardedClusterHead

FILE = "heads_rank{}.pt"


class ShardedHeads:
    def __init__(self, shards: Dict[str, ShardedClusterHead], optim: OptimConfig):
        self.shards = nn.ModuleDict(shards)
        self.optimizer = build_optimizer(self.shards, optim)
        self.scheduler = build_scheduler(self.optimizer, optim)
        self.grad_clip = optim.grad_clip
        # the optimizer's state_dict numbers parameters in group order: index -> head key
        key_of = {id(s.weight): k for k, s in self.shards.items()}
        self._order = [key_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    @classmethod
    def split(cls, model: nn.Module, optim: OptimConfig, precision: str = "fp32") -> Optional["ShardedHeads"]:
        """Take this rank's rows of every ``sharded`` head out of ``model``; None when it has none."""
        heads = getattr(model, "heads", {})
        keys = [k for k, h in heads.items() if getattr(h, "sharded", False)]
        if not keys:
            return None
        if "fp16" in precision:  # the engine's loss scale would reach these gradients unscaled
            raise ValueError(f"model.heads.{keys[0]}.sharded needs engine.precision fp32, bf16 or amp_bf16, "
                             f"got {precision}")
        return cls({k: heads[k].split(dist.rank(), dist.world_size()) for k in keys}, optim)

    def parameters(self) -> List[nn.Parameter]:
        return [s.weight for s in self.shards.values()]

    def step(self) -> None:
        """One optimizer and schedule step of this rank's rows (after the engine's)."""
        params = [p for p in self.parameters() if p.grad is not None]
        for p in params:
            p.grad.div_(dist.world_size())
        if self.grad_clip > 0 and params:
            sq = torch.stack([p.grad.float().pow(2).sum() for p in params]).sum().reshape(1)
            norm = float(dist.all_reduce_sum(sq)) ** 0.5  # the whole head's gradient norm
            if norm > self.grad_clip:
                for p in params:
                    p.grad.mul_(self.grad_clip / (norm + 1e-6))  # torch's clip_grad_norm_ factor
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- whole weights -------------------------------------------------------------------
    def full_weights(self) -> Dict[str, torch.Tensor]:
        """``{"heads.<key>.weight": (K, D)}`` on every rank, gathered (a collective)."""
        return {f"heads.{k}.weight": _gather_rows(s.weight.detach()) for k, s in self.shards.items()}

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self, folder: str) -> None:
        state = {"rows": {k: (s.lo, s.hi) for k, s in self.shards.items()},
                 "weights": {k: s.weight.detach().cpu() for k, s in self.shards.items()},
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        torch.save(state, os.path.join(folder, FILE.format(dist.rank())))

    def load(self, folder: str) -> None:
        """Restore from the ``heads_rank*.pt`` of checkpoint ``folder``, re-sharded when needed."""
        files = sorted(glob.glob(os.path.join(folder, FILE.format("*"))))
        if not files:
            raise ValueError(f"checkpoint {folder} has no {FILE.format('*')}: it was saved without sharded heads")
        mine = {k: (s.lo, s.hi) for k, s in self.shards.items()}
        own = os.path.join(folder, FILE.format(dist.rank()))
        state = torch.load(own, map_location="cpu", weights_only=True) if os.path.isfile(own) else None
        if len(files) != dist.world_size() or state is None or state["rows"] != mine:
            # another split: every file holding some of this rank's rows (mapped, read where cut)
            state = self._cut([torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files], mine)
        with torch.no_grad():
            for k, s in self.shards.items():
                s.weight.copy_(state["weights"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def _cut(self, saved: List[dict], mine: Dict[str, tuple]) -> dict:
        """This rank's rows of the saved ranks' weights and optimizer tensors (any saved split)."""
        first = saved[0]["optimizer"]
        state = {"weights": {}, "scheduler": saved[0]["scheduler"],
                 "optimizer": {"param_groups": first["param_groups"], "state": {}}}
        for k, (lo, hi) in mine.items():
            state["weights"][k] = _rows(saved, k, lo, hi, lambda s: s["weights"][k])
        for i, k in enumerate(self._order):
            lo, hi = mine[k]
            if i not in first["state"]:  # no step taken yet
                continue
            weight = saved[0]["weights"][k]
            state["optimizer"]["state"][i] = {
                name: _rows(saved, k, lo, hi, lambda s, n=name: s["optimizer"]["state"][i][n])
                if _row_shaped(value, weight) else (value.clone() if isinstance(value, torch.Tensor) else value)
                for name, value in first["state"][i].items()}
        return state


def _row_shaped(value, weight: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == weight.shape


def _rows(saved: List[dict], key: str, lo: int, hi: int, tensor_of) -> torch.Tensor:
    """Rows [lo, hi) of head ``key`` from the saved shards that hold them."""
    parts = []
    for s in saved:
        a, b = s["rows"][key]
        if a < hi and lo < b:
            parts.append(tensor_of(s)[max(lo, a) - a : min(hi, b) - a])
    return torch.cat(parts).clone()


def _gather_rows(w: torch.Tensor) -> torch.Tensor:
    """The (K, D) concatenation of every rank's rows (K_r, D); shards may differ in length (padded)."""
    if dist.world_size() == 1:
        return w.cpu().clone()
    n = torch.tensor([w.shape[0]], device=w.device)
    counts = dist.all_gather_no_grad(n).tolist()
    padded = torch.zeros(max(counts), *w.shape[1:], dtype=w.dtype, device=w.device)
    padded[: w.shape[0]] = w
    parts = dist.all_gather_no_grad(padded).split(max(counts))
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()
