"""CLIP (InfoNCE) and SigLIP on the global batch.

Shapes: b = rows on this rank, N = W*b rows in the global batch, D = embedding dim.
Each rank scores its b rows against all N columns (open_clip's ``local_loss`` with
``gather_with_grad``); the differentiable gather sends column gradients back to their
owners, so after the engine averages parameter gradients over ranks they equal the
gradient of the single-process loss on the concatenated batch.

Above ``tile_above`` global rows InfoNCE switches to the tiled loss of
``vlp.objectives.tiled`` (same value and gradients, no (b, N) logits in memory).

``modalities`` names what is contrasted: one pair (``[audio, text]``; default
``[image, text]``) or, for a model with three towers, a list of pairs
(``[[image, text], [audio, text], [image, audio]]``). With several pairs the loss is the
mean of the pairs' losses (one shared logit scale/bias), each also reported as
``contrastive_<a>_<b>``; ``rep_keys`` are the modalities the pairs name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Tuple

import torch
import torch.nn.functional as F

from vlp import dist
from vlp.objectives.base import OBJECTIVES, Objective, Tensors
from vlp.objectives.tiled import rows_infonce, symmetric_infonce


def _local_labels(b: int, device) -> torch.Tensor:
    return torch.arange(b, device=device) + dist.rank() * b  # (b,) positives' global columns


MODALITIES = ("image", "text", "audio")
Pairs = Tuple[Tuple[str, str], ...]


def modality_pairs(modalities: List[Any]) -> Pairs:
    """``[a, b]`` -> ((a, b),); ``[[a, b], [c, d]]`` -> ((a, b), (c, d)); ValueError otherwise."""
    items = list(modalities)
    pairs = [items] if items and all(isinstance(m, str) for m in items) else [list(p) for p in items]
    for pair in pairs:
        if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(MODALITIES):
            raise ValueError(
                f"objective modalities must be a pair or a list of pairs of distinct names from "
                f"{', '.join(MODALITIES)} (e.g. [audio, text]), got {list(modalities)}"
            )
    if not pairs:
        raise ValueError("objective modalities is empty; e.g. [image, text]")
    return tuple((str(a), str(b)) for a, b in pairs)


def _rep_keys(pairs: Pairs) -> Tuple[str, ...]:
    return tuple(dict.fromkeys(m for pair in pairs for m in pair))  # the modalities, first-seen order


@dataclass
class InfoNCEConfig:
    modalities: List[Any] = field(default_factory=lambda: ["image", "text"])  # a pair, or a list of pairs
    label_smoothing: float = 0.0  # of the cross-entropy over the global batch
    tile_above: int = 4096  # global batch N above which the loss is tiled (no (b, N) logits)
    tile_size: int = 2048  # T: rows and columns of one logit tile; memory ~ 2·T² floats (32 MB fp32)
    tile_keep_mb: float = 0.0  # logit tiles kept for the backward, up to this many MB (all: N² floats; faster)


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
        if cfg.tile_keep_mb < 0:
            raise ValueError(f"infonce tile_keep_mb must be >= 0, got {cfg.tile_keep_mb}")
        self.cfg = cfg
        self.label_smoothing = cfg.label_smoothing
        self.pairs = modality_pairs(cfg.modalities)
        self.rep_keys = _rep_keys(self.pairs)

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        scale = scalars["logit_scale"]  # ()
        gathered = {k: dist.all_gather_with_grad(reps[k]) for k in self.rep_keys}  # (N, D) each
        out, total = {}, 0.0
        for a, b in self.pairs:
            loss = self._pair(reps[a], reps[b], gathered[a], gathered[b], scale)
            total = total + loss
            if len(self.pairs) > 1:
                out[f"contrastive_{a}_{b}"] = loss.detach()
        loss = total / len(self.pairs)
        return {"loss": loss, "contrastive": loss.detach(), **out}

    def _pair(self, x, y, x_all, y_all, scale):
        # x, y: (b, D) this rank's rows; x_all, y_all: (N, D) the global batch
        if x_all.shape[0] > self.cfg.tile_above:
            return self._tiled(x, y, x_all, y_all, scale)
        labels = _local_labels(x.shape[0], x.device)
        ce = lambda logits: F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)  # noqa: E731
        return 0.5 * (ce(scale * x @ y_all.T) + ce(scale * y @ x_all.T))  # (b, N) logits each

    def _tiled(self, x, y, x_all, y_all, scale):
        t, eps, keep = self.cfg.tile_size, self.label_smoothing, int(self.cfg.tile_keep_mb * 2**20)
        if dist.world_size() == 1:  # s·Y·Xᵀ is the transpose of s·X·Yᵀ: one pass serves both directions
            return symmetric_infonce(x, y, scale, t, eps, keep)
        # local rows against global columns: the two directions are different (b, N) slabs (half the budget each)
        return 0.5 * (rows_infonce(x, y, y_all, scale, t, eps, keep // 2)
                      + rows_infonce(y, x, x_all, scale, t, eps, keep // 2))


@OBJECTIVES.register("infonce", InfoNCEConfig)
@OBJECTIVES.register("clip", InfoNCEConfig)
def _infonce(cfg: InfoNCEConfig) -> Objective:
    return InfoNCE(cfg)


@dataclass
class SigLIPConfig:
    modalities: List[Any] = field(default_factory=lambda: ["image", "text"])  # a pair, or a list of pairs


class SigLIP(Objective):
    """L = -(1/b) Σ_i Σ_j log σ(z_ij (s·x_i·y_j + t)), z_ij = +1 on positives, -1 elsewhere."""

    scalar_keys = ("logit_scale", "logit_bias")

    def __init__(self, cfg: SigLIPConfig = None):
        super().__init__()
        self.pairs = modality_pairs((cfg or SigLIPConfig()).modalities)
        self.rep_keys = _rep_keys(self.pairs)

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        if "logit_bias" not in scalars:
            raise ValueError("siglip needs a logit bias: set model.init_logit_bias (e.g. -10)")
        out, total = {}, 0.0
        for a, b in self.pairs:
            loss = self._pair(reps[a], reps[b], scalars)
            total = total + loss
            if len(self.pairs) > 1:
                out[f"contrastive_{a}_{b}"] = loss.detach()
        loss = total / len(self.pairs)
        return {"loss": loss, "contrastive": loss.detach(), **out}

    @staticmethod
    def _pair(x, y, scalars):
        # x, y: (b, D)
        y_all = dist.all_gather_with_grad(y)  # (N, D): every y block meets every x block
        logits = scalars["logit_scale"] * x @ y_all.T + scalars["logit_bias"]  # (b, N)
        z = -torch.ones_like(logits)
        z[torch.arange(x.shape[0]), _local_labels(x.shape[0], x.device)] = 1.0
        return -F.logsigmoid(z * logits).sum() / x.shape[0]


@OBJECTIVES.register("siglip", SigLIPConfig)
def _siglip(cfg: SigLIPConfig) -> Objective:
    return SigLIP(cfg)
