"""Contrastive losses with soft targets or extra geometric terms: CWCL and CLIP + alignment/uniformity.

Shapes: b = rows on this rank, N = W*b rows in the global batch, D = embedding dim.
As in ``infonce``, each rank scores its b rows against all N gathered columns; the
differentiable gather returns column gradients to their owners.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlp import dist
from vlp.objectives.base import OBJECTIVES, Objective, Tensors
from vlp.objectives.contrastive import InfoNCE, InfoNCEConfig, _local_labels

_MODALITIES = ("image", "text")
_BLOCK = 4096  # rows per block when a global N×N statistic is summed without a graph


# --------------------------------------------------------------------------- CWCL
@dataclass
class CWCLConfig:
    frozen: str = "image"  # the pre-trained (locked) modality whose similarities weight the targets


class CWCL(Objective):
    """Continuously Weighted Contrastive Loss (Srinivasa et al., 2023).

    With f = the frozen modality's embeddings (detached), x, y image and text, s the logit scale:
        W_ij = (1 + f_i·f_j) / 2 ∈ [0, 1]          (W_ii = 1)
        P_ij = W_ij / Σ_k W_ik                     (each row sums to 1)
        L = ½ [ -(1/N) Σ_i Σ_j P_ij log softmax_j(s·x_i·Yᵀ)
              - (1/N) Σ_i Σ_j P_ij log softmax_j(s·y_i·Xᵀ) ]
    i.e. cross-entropy against the soft targets P in both directions (W is symmetric, so the
    same rows serve both). P = I is InfoNCE.
    """

    def __init__(self, cfg: CWCLConfig):
        super().__init__()
        if cfg.frozen not in _MODALITIES:
            raise ValueError(f"cwcl: frozen must be one of {list(_MODALITIES)}, got {cfg.frozen!r}")
        self.frozen = cfg.frozen

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        x, y, scale = reps["image"], reps["text"], scalars["logit_scale"]  # (b, D), (b, D), (1,)
        x_all, y_all = dist.all_gather_with_grad(x), dist.all_gather_with_grad(y)  # (N, D)
        f, f_all = (x, x_all) if self.frozen == "image" else (y, y_all)
        # targets carry no gradient: the frozen tower only defines what counts as similar
        w = (1.0 + f.detach() @ f_all.detach().T) / 2  # (b, N)
        targets = w / w.sum(dim=1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(scale * x @ y_all.T, targets) + F.cross_entropy(scale * y @ x_all.T, targets))
        return {"loss": loss, "contrastive": loss.detach()}


@OBJECTIVES.register("cwcl", CWCLConfig)
def _cwcl(cfg: CWCLConfig) -> Objective:
    return CWCL(cfg)


# ------------------------------------------------------------ alignment and uniformity
@dataclass
class UniformAlignConfig:
    clip: float = 1.0  # weight of the InfoNCE term
    align: float = 1.0  # weight of the alignment term
    uniform: float = 1.0  # weight of ½[U(x, x) + U(y, y)]
    cross_uniform: float = 0.0  # weight of U(x, y) over non-matching image-text pairs (off by default)
    alpha: float = 2.0  # alignment exponent
    t: float = 2.0  # uniformity kernel sharpness


def _log_kernel_sum(a: torch.Tensor, c: torch.Tensor, skip: torch.Tensor, t: float) -> torch.Tensor:
    """log Σ_i Σ_{j ≠ skip_i} exp(-t‖a_i - c_j‖²) for a (m, D), c (N, D), skip (m,) columns."""
    sq = (a * a).sum(-1, keepdim=True) + (c * c).sum(-1) - 2 * a @ c.T  # (m, N) squared distances
    mask = torch.zeros_like(sq, dtype=torch.bool).scatter_(1, skip[:, None], True)
    return torch.logsumexp((-t * sq).masked_fill(mask, -math.inf).flatten(), dim=0)


def log_mean_kernel(a: torch.Tensor, a_all: torch.Tensor, c_all: torch.Tensor, t: float) -> torch.Tensor:
    """U(a, c) = log (1/(N(N-1))) Σ_{i≠j} exp(-t‖a_i - c_j‖²) over the global batch.

    a: this rank's rows (b, D); a_all, c_all: gathered (N, D), c_all with grad. The value
    is the global U on every rank (so it averages over ranks to itself). Its gradient goes
    through this rank's share only, S_r = Σ_{i∈rank} Σ_{j≠i} k_ij, as W·∂(S_r/S): the
    gather's reduce-scatter sums the ranks' shares and the engine divides by W, giving
    (1/S)·Σ_r ∂S_r = ∂U, without any rank building an N×N graph.
    """
    n = a_all.shape[0]
    if n < 2:
        raise ValueError("uniform_align needs a global batch of at least 2 rows for uniformity")
    log_share = _log_kernel_sum(a, c_all, _local_labels(a.shape[0], a.device), t)  # log S_r, with grad
    with torch.no_grad():  # the global normaliser S, block by block
        rows = torch.arange(n, device=a.device)
        blocks = [
            _log_kernel_sum(a_all[i : i + _BLOCK], c_all, rows[i : i + _BLOCK], t) for i in range(0, n, _BLOCK)
        ]
        log_s = torch.logsumexp(torch.stack(blocks), dim=0)
    share = torch.exp(log_share - log_s)  # S_r / S
    return (log_s - math.log(n * (n - 1))) + dist.world_size() * (share - share.detach())


class UniformAlign(Objective):
    """CLIP + alignment + uniformity (Wang & Isola, 2020) on unit-norm x (image), y (text):

        A = (1/N) Σ_i ‖x_i - y_i‖^α
        U(a, c) = log (1/(N(N-1))) Σ_{i≠j} exp(-t‖a_i - c_j‖²)
        L = clip·InfoNCE + align·A + uniform·½[U(x, x) + U(y, y)] + cross_uniform·U(x, y)

    U is computed over every pair of the gathered global batch (see ``log_mean_kernel``).
    """

    def __init__(self, cfg: UniformAlignConfig):
        super().__init__()
        weights = {k: getattr(cfg, k) for k in ("clip", "align", "uniform", "cross_uniform")}
        if min(weights.values()) < 0:
            raise ValueError(f"uniform_align: weights must be >= 0, got {weights}")
        if cfg.alpha <= 0 or cfg.t <= 0:
            raise ValueError(f"uniform_align: alpha and t must be > 0, got alpha={cfg.alpha}, t={cfg.t}")
        self.cfg = cfg
        self.clip = InfoNCE(InfoNCEConfig())

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        cfg, x, y = self.cfg, reps["image"], reps["text"]  # (b, D)
        clip = self.clip.cross_sample(reps, scalars)["loss"]
        # ‖·‖² first: a norm's sqrt would have no gradient at x_i = y_i
        align = ((x - y) ** 2).sum(-1).pow(cfg.alpha / 2).mean()  # mean over local rows averages to global
        x_all, y_all = dist.all_gather_with_grad(x), dist.all_gather_with_grad(y)  # (N, D)
        uniform = 0.5 * (log_mean_kernel(x, x_all, x_all, cfg.t) + log_mean_kernel(y, y_all, y_all, cfg.t))
        loss = cfg.clip * clip + cfg.align * align + cfg.uniform * uniform
        out = {"contrastive": clip.detach(), "align": align.detach(), "uniform": uniform.detach()}
        if cfg.cross_uniform:
            cross = log_mean_kernel(x, x_all, y_all, cfg.t)
            loss = loss + cfg.cross_uniform * cross
            out["cross_uniform"] = cross.detach()
        return {"loss": loss, **out}


@OBJECTIVES.register("uniform_align", UniformAlignConfig)
def _uniform_align(cfg: UniformAlignConfig) -> Objective:
    return UniformAlign(cfg)
