"""Decoupled and multi-positive contrastive losses: DCL, DCL-W, decoupled softmax,
soft top-K and supervised contrastive (SupCon), on the global batch.

Shapes: b = rows on this rank, N = W*b rows in the global batch, D = embedding dim.
z (b, N): logits of this rank's anchors against every candidate of the other modality;
pos (b, N) bool: the anchors' positives (their own pair, or every candidate with the
same label). Each loss is ½ (image→text + text→image), each a mean over this rank's
anchors, so the mean over ranks is the single-process loss on the concatenated batch
(the scheme of ``contrastive.py``: local rows against gathered columns).

Per-row terms, with LSE = log Σ exp over the named columns and P_i = pos[i]:
    InfoNCE      ℓ_i  = -z_ip + LSE_{all j} z_ij
    DCL          ℓ_i  = -w_i z_ip + LSE_{j ≠ p} z_ij          (w_i = 1; DCL-W: w_i detached)
    decoupled    ℓ_ij = -z_ij + log(e^{z_ij} + Σ_{n ∉ P_i} e^{z_in}),  j ∈ P_i
    SupCon       ℓ_ij = -z_ij + LSE_{all n} z_in,                    j ∈ P_i
Multi-positive rows average ℓ_ij over j ∈ P_i (soft top-K: a weighted average, see
``SoftTopK``). With one positive per row decoupled, SupCon and soft top-K all equal
InfoNCE at the same temperature; DCL differs from it by log(1 + e^{z_ip} / Σ_{j≠p} e^{z_ij}).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from vlp import dist
from vlp.objectives.base import OBJECTIVES, Objective, Tensors
from vlp.objectives.contrastive import _local_labels

RowLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z (b, N), pos (b, N)) -> (b,)


# ---------------------------------------------------------------- shared pieces


def _both_directions(reps: Tensors, pos: torch.Tensor, scale, row_loss: RowLoss) -> torch.Tensor:
    """½ [mean_i row_loss(scale·x_i·Yᵀ) + mean_i row_loss(scale·y_i·Xᵀ)] over this rank's rows."""
    x, y = reps["image"], reps["text"]  # (b, D)
    x_all, y_all = dist.all_gather_with_grad(x), dist.all_gather_with_grad(y)  # (N, D)
    # one mask serves both directions: pairs share a label, so text i's positives among
    # the images are image i's among the texts
    return 0.5 * (row_loss(scale * x @ y_all.T, pos).mean() + row_loss(scale * y @ x_all.T, pos).mean())


def _pair_mask(reps: Tensors) -> torch.Tensor:
    """(b, N) bool: each local row's own pair in the gathered (rank-major) batch."""
    b, device = reps["image"].shape[0], reps["image"].device
    n = b * dist.world_size()
    if n < 2:
        raise ValueError("a contrastive loss needs at least 2 rows in the global batch")
    return _local_labels(b, device)[:, None] == torch.arange(n, device=device)[None, :]


def _label_mask(reps: Tensors) -> torch.Tensor:
    """(b, N) bool: same label; includes each row's own pair."""
    if "label" not in reps:
        raise ValueError("this objective needs batch labels: reps['label'] (b,) long")
    labels = reps["label"]  # (b,)
    return labels[:, None] == dist.all_gather_no_grad(labels)[None, :]


def _scale(scalars: Tensors, temperature: Optional[float]):
    return 1.0 / temperature if temperature is not None else scalars["logit_scale"]


def _check_positive(name: str, value: Optional[float]) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _negatives_lse(z: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(b, 1) log Σ_{n ∉ P_i} e^{z_in}; -inf for a row with no negatives (its loss is then 0)."""
    return z.masked_fill(pos, float("-inf")).logsumexp(-1, keepdim=True)


def _average_over_positives(per_pair: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(b,) Σ_j a_ij ℓ_ij; ``weights`` (b, N) sum to 1 over each row's positives, 0 elsewhere."""
    return (weights * per_pair).sum(-1)


def _uniform_over(pos: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    w = pos.to(like.dtype)  # not bool / long, which would give float32 weights
    return w / w.sum(-1, keepdim=True)  # (b, N): 1/|P_i| on positives


# ---------------------------------------------------------------- DCL and DCL-W


def dcl_rows(z: torch.Tensor, pos: torch.Tensor, w: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(b,) ℓ_i = -w_i z_ip + LSE_{j ≠ p} z_ij, one positive p per row (w_i = 1 without ``w``)."""
    z_pos = (z * pos).sum(-1)  # (b,)
    w = 1.0 if w is None else w
    return _negatives_lse(z, pos).squeeze(-1) - w * z_pos


def dclw_weights(s: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N,) w_i = 2 - exp(s_ii/σ) / mean_j exp(s_jj/σ) = 2 - N softmax(s/σ)_i; mean 1.

    ``s`` (N,) are the positive pairs' cosine similarities over the GLOBAL batch (the mean
    must not depend on how rows are split over ranks). Detached, as in Yeh et al."""
    s = s.detach()
    return 2.0 - s.shape[0] * torch.softmax(s / sigma, dim=0)


@dataclass
class DCLConfig:
    temperature: Optional[float] = None  # None: τ = 1/logit_scale (learnable); else fixed τ


@dataclass
class DCLWConfig:
    temperature: Optional[float] = None  # None: τ = 1/logit_scale (learnable); else fixed τ
    sigma: float = 0.5  # σ of the positive-pair weighting


class DCL(Objective):
    """Decoupled contrastive learning (Yeh et al.): InfoNCE with the positive pair removed
    from the softmax denominator,

        L = ½ mean_i [ -w_i z_ii + log Σ_{j≠i} e^{z_ij} ]_{image→text} + ½ [ ... ]_{text→image},
        z_ij = x_i·y_j / τ.

    Only cross-modal negatives (CLIP's setting; the paper's SimCLR version also has
    same-view negatives). DCL: w_i = 1. DCL-W (``sigma`` set): w_i = 2 - exp(s_ii/σ) /
    mean_j exp(s_jj/σ), detached, s_ii = x_i·y_i over the global batch, so mean_i w_i = 1.
    """

    def __init__(self, temperature: Optional[float], sigma: Optional[float] = None):
        super().__init__()
        _check_positive("temperature", temperature)
        _check_positive("sigma", sigma)
        self.temperature, self.sigma = temperature, sigma
        if temperature is not None:  # the learnable scale is not read
            self.scalar_keys = ()

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        pos = _pair_mask(reps)  # (b, N)
        w = self._weights(reps) if self.sigma is not None else None  # (b,)
        loss = _both_directions(reps, pos, _scale(scalars, self.temperature), lambda z, p: dcl_rows(z, p, w))
        return {"loss": loss, "contrastive": loss.detach()}

    def _weights(self, reps: Tensors) -> torch.Tensor:
        s = (reps["image"] * reps["text"]).sum(-1).detach()  # (b,) positive cosines
        w_all = dclw_weights(dist.all_gather_no_grad(s), self.sigma)  # (N,): normalised over the global batch
        return w_all[dist.rank() * s.shape[0] : (dist.rank() + 1) * s.shape[0]]  # this rank's rows


@OBJECTIVES.register("dcl", DCLConfig)
def _dcl(cfg: DCLConfig) -> Objective:
    return DCL(cfg.temperature)


@OBJECTIVES.register("dclw", DCLWConfig)
def _dclw(cfg: DCLWConfig) -> Objective:
    return DCL(cfg.temperature, cfg.sigma)


# ---------------------------------------------------------------- decoupled softmax


def decoupled_pairs(z: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(b, N) ℓ_ij = -z_ij + log(e^{z_ij} + Σ_{n ∉ P_i} e^{z_in}): each positive competes
    with the negatives only, never with the other positives (meaningful where pos)."""
    return torch.logaddexp(z, _negatives_lse(z, pos)) - z


def decoupled_softmax_rows(z: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return _average_over_positives(decoupled_pairs(z, pos), _uniform_over(pos, z))  # (b,)


@dataclass
class DecoupledSoftmaxConfig:
    temperature: float = 0.05  # fixed τ (Gupta et al. use a fixed temperature)


class DecoupledSoftmax(Objective):
    """Decoupled softmax (Gupta et al., "Dual-Encoders for Extreme Multi-Label
    Classification"): positives are the candidates with the anchor's label,

        L = ½ mean_i (1/|P_i|) Σ_{j∈P_i} -log( e^{z_ij} / (e^{z_ij} + Σ_{n∉P_i} e^{z_in}) )
            (image→text) + ½ (text→image),   z_ij = x_i·y_j / τ, τ fixed.
    """

    batch_keys = ("label",)
    scalar_keys = ()

    def __init__(self, cfg: DecoupledSoftmaxConfig):
        super().__init__()
        _check_positive("temperature", cfg.temperature)
        self.temperature = cfg.temperature

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        loss = _both_directions(reps, _label_mask(reps), 1.0 / self.temperature, decoupled_softmax_rows)
        return {"loss": loss, "contrastive": loss.detach()}


@OBJECTIVES.register("decoupled_softmax", DecoupledSoftmaxConfig)
def _decoupled_softmax(cfg: DecoupledSoftmaxConfig) -> Objective:
    return DecoupledSoftmax(cfg)


# ---------------------------------------------------------------- soft top-K


@torch.no_grad()
def soft_topk_threshold(z: torch.Tensor, k: float, alpha: float, n_iter: int) -> torch.Tensor:
    """(b, 1) t with Σ_j σ(α (z_ij - t_i)) = k, by bisection (the sum falls as t rises)."""
    margin = 40.0 / alpha  # σ(±40) is 1 or 0 to 4e-18: the root lies inside [lo, hi]
    lo = z.min(-1, keepdim=True).values - margin  # sum ≈ N > k
    hi = z.max(-1, keepdim=True).values + margin  # sum ≈ 0 < k
    for _ in range(n_iter):
        mid = 0.5 * (lo + hi)
        above = torch.sigmoid(alpha * (z - mid)).sum(-1, keepdim=True) > k  # t must rise
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


class LogSoftTopK(torch.autograd.Function):
    """log p_ij, p_ij = σ(α (z_ij - t_i)) with Σ_j p_ij = k: soft top-k membership.

    Backward by the implicit-function theorem on the constraint (not through the
    bisection): dt_i/dz_ij = v_ij / Σ_m v_im, v = α σ'(α(z - t)), so with u = g α (1 - p)
        ∂L/∂z_ij = u_ij - v_ij Σ_m u_im / Σ_m v_im.
    The threshold is found in at least float32 (bf16 bisection cannot reach the root).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, k: float, alpha: float, n_iter: int) -> torch.Tensor:
        zc = z.to(torch.promote_types(z.dtype, torch.float32))
        a = alpha * (zc - soft_topk_threshold(zc, k, alpha, n_iter))  # (b, N)
        ctx.save_for_backward(a)
        ctx.alpha = alpha
        return F.logsigmoid(a).to(z.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        (a,) = ctx.saved_tensors
        p = torch.sigmoid(a)
        v = ctx.alpha * p * (1 - p)  # dσ/dz at the root, (b, N)
        u = g.to(a.dtype) * ctx.alpha * (1 - p)  # g · ∂ log p/∂z with t held fixed
        s = v.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
        grad = u - v * u.sum(-1, keepdim=True) / s
        return grad.to(g.dtype), None, None, None


def log_soft_topk(z: torch.Tensor, k: float, alpha: float, n_iter: int = 64) -> torch.Tensor:
    return LogSoftTopK.apply(z, k, alpha, n_iter)


@dataclass
class SoftTopKConfig:
    k: int = 5  # K of the soft top-K (clipped to N-1 for a smaller global batch, with a warning)
    alpha: float = 2.0  # sigmoid sharpness α (in logit units)
    temperature: float = 0.05  # fixed τ, as decoupled_softmax
    n_iter: int = 64  # bisection steps: the bracket shrinks 2^-64, float64 precision


class SoftTopK(Objective):
    """Soft top-K multi-positive loss: the decoupled softmax averaged over positives with
    weights from their soft top-K memberships instead of uniformly,

        L_i = Σ_{j∈P_i} ω_ij ℓ_ij,   ω_ij = p_ij / Σ_{q∈P_i} p_iq,   p_ij = σ(α (z_ij - t_i)),
        Σ_{j=1..N} σ(α (z_ij - t_i)) = K (t_i by bisection; gradient via LogSoftTopK),

    ℓ_ij the decoupled softmax term, z_ij = x_i·y_j / τ, ½ (image→text + text→image).
    The soft top-K operator (sigmoid threshold, bisection, implicit backward) is Gupta et
    al.'s (DEXML, ICLR 2024, "soft top-k operator-based loss"); their loss is
    -mean_{j∈P_i} log p_ij, which does not reduce to InfoNCE with one positive. Here the
    memberships only re-weight the positives: with one positive ω = 1 (and its gradient
    0), so the loss is exactly InfoNCE at τ; with more positives than K it concentrates
    on the ones the model ranks in its top K (precision@K: the rest need not be
    retrieved), and its gradient through ω moves weight toward them.
    """

    batch_keys = ("label",)
    scalar_keys = ()

    def __init__(self, cfg: SoftTopKConfig):
        super().__init__()
        for name in ("k", "alpha", "temperature", "n_iter"):
            _check_positive(name, getattr(cfg, name))
        self.cfg = cfg

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        pos = _label_mask(reps)  # (b, N)
        k = self._k(pos.shape[1])
        rows = lambda z, p: self.rows(z, p, k)  # noqa: E731
        loss = _both_directions(reps, pos, 1.0 / self.cfg.temperature, rows)
        return {"loss": loss, "contrastive": loss.detach()}

    def rows(self, z: torch.Tensor, pos: torch.Tensor, k: float) -> torch.Tensor:
        log_p = log_soft_topk(z, k, self.cfg.alpha, self.cfg.n_iter)  # (b, N)
        omega = torch.softmax(log_p.masked_fill(~pos, float("-inf")), dim=-1)  # p / Σ_pos p, 0 off P_i
        return _average_over_positives(decoupled_pairs(z, pos), omega)  # (b,)

    def _k(self, n: int) -> int:
        if self.cfg.k < n:
            return self.cfg.k
        warnings.warn(f"soft_topk: k={self.cfg.k} needs more than {n} rows in the global batch; using k={n - 1}")
        return n - 1


@OBJECTIVES.register("soft_topk", SoftTopKConfig)
def _soft_topk(cfg: SoftTopKConfig) -> Objective:
    return SoftTopK(cfg)


# ---------------------------------------------------------------- SupCon


def supcon_rows(z: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(b,) (1/|P_i|) Σ_{j∈P_i} [-z_ij + LSE_{all n} z_in]."""
    return _average_over_positives(z.logsumexp(-1, keepdim=True) - z, _uniform_over(pos, z))


class SupCon(Objective):
    """Supervised contrastive loss (Khosla et al., L_out) across the two modalities:

        L = ½ mean_i (1/|P_i|) Σ_{j∈P_i} -log( e^{z_ij} / Σ_n e^{z_in} ) (image→text)
            + ½ (text→image),   z_ij = s·x_i·y_j, s the learnable logit scale,

    P_i the candidates with the anchor's label. Every candidate of the other modality is
    in the denominator (there is no self-pair to drop across modalities).
    """

    batch_keys = ("label",)

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        loss = _both_directions(reps, _label_mask(reps), scalars["logit_scale"], supcon_rows)
        return {"loss": loss, "contrastive": loss.detach()}


@OBJECTIVES.register("supcon")
def _supcon() -> Objective:
    return SupCon()

