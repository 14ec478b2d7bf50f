"""M3CoL (Kumar, Singhal et al., 2024): classifier cross-entropies plus a mixup contrastive loss.

Shapes: b = rows on this rank, N = W*b rows in the global batch, D = embedding dim,
C = classes. Features are the model's unit-norm ``image``/``text`` outputs; the
classifier logits come from the heads of ``vlp/models/classifier.py``.

    L = CE(text head) + CE(image head) + CE(fusion head) + weight · L_contrastive

* per-sample part: the cross-entropies of the ``logits_*`` heads against ``label``,
  summed over the chunk (heads the model lacks are skipped);
* cross-sample part, on the gathered global batch, for the first ``mixup_fraction`` of
  training (M3Co, the mixup loss): for the mixed modality m and the other one o,
      m̃_i = normalize(λ_i·m_i + (1-λ_i)·m_π(i)),  λ_i ~ Beta(α, α) with probability p, else 1
      P   = diag(λ) + (1-λ_i) at [i, π(i)]   (π(i) = i gives P[i, i] = 1: rows sum to 1)
      L_m = ½ [ H(P, softmax(m̃·oᵀ/τ)) + H(Pᵀ, softmax(o·m̃ᵀ/τ)) ]    (H: soft cross-entropy, row mean)
  and L_contrastive = ½ (L_image + L_text): image mixed against unmixed text and text
  mixed against unmixed images (the paper). With λ ≡ 1 it is symmetric InfoNCE at τ.
  ``mix_both: true`` reproduces the public code (RaghavSinghal10/M3CoL, ``model/model.py``):
  its ``mixco_image``/``mixco_text`` mix the two clones *in place* before either loss
  term is computed, so each term pairs the mixed modality with the *mixed* other one
  (targets from the first modality's draw only). Its ``P[i, π(i)] = 1-λ_i`` also
  overwrites the diagonal when π(i) = i; here that row gets λ_i + (1-λ_i) = 1. And it
  sums the two terms where this averages them: its λ_mixup = 0.1 is ``weight: 0.2`` here.
* afterwards (SoftCLIP, the public code's ``soft_clip_loss``): targets Q = softmax(o·oᵀ/τ'),
      L_m = ½ [ H(Q, softmax(m·oᵀ/τ')) + H(Q, softmax(o·mᵀ/τ')) ],  L = ½ (L_image + L_text).

Draws: a permutation, a Bernoulli(p) mask and Beta(α, α) weights per mixed modality,
from ``StepContext.generator`` in ``begin_step``: the same numbers on every rank and in
every chunk, and in the plain and the gradient-cached step (they are made once per step
and global batch size, then reused).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from vlp import dist
from vlp.objectives.base import OBJECTIVES, Objective, StepContext, Tensors

_SALT = 0x3C01  # this objective's generator stream


@dataclass
class M3CoLConfig:
    weight: float = 0.1  # of the contrastive term against the CEs; 0 = classifier heads only
    mix_prob: float = 0.5  # p: probability a row is mixed
    alpha: float = 0.15  # Beta(α, α) mixing weights
    temperature: float = 0.1  # τ of the mixup loss
    soft_clip_temperature: float = 0.125  # τ' of the SoftCLIP loss
    mixup_fraction: float = 0.33  # the mixup loss before this fraction of optim.steps, SoftCLIP after
    mix_both: bool = False  # the public code's behaviour: both sides mixed (see module docstring)
    detach_soft_targets: bool = False  # SoftCLIP targets without gradient (the public code keeps it)
    # the model outputs whose cross-entropy with the label is added (the classifier heads' logits)
    heads: List[str] = field(default_factory=lambda: ["logits_image", "logits_text", "logits_fusion"])


@dataclass
class MixDraw:
    """One modality's mix over the global batch: m̃_i = λ_i·m_i + (1-λ_i)·m_perm[i]."""

    perm: torch.Tensor  # (N,) long: π
    lam: torch.Tensor  # (N,) float64: 1 where the row is not mixed
    mixed: torch.Tensor  # (N,) bool: the Bernoulli(p) draw

    def targets(self) -> torch.Tensor:
        """(N, N) float64 soft targets P: λ_i at [i, i], 1-λ_i added at [i, π(i)]; rows sum to 1."""
        n = len(self.perm)
        p = torch.diag(self.lam)
        return p.index_put((torch.arange(n), self.perm), 1.0 - self.lam, accumulate=True)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """normalize(λ·x + (1-λ)·x[π]) for x (N, D); rows not drawn for mixing are only normalised."""
        lam = self.lam.to(x.device, x.dtype)[:, None]  # (N, 1)
        mix = lam * x + (1 - lam) * x[self.perm.to(x.device)]  # (N, D)
        return F.normalize(torch.where(self.mixed.to(x.device)[:, None], mix, x), dim=-1)


def draw_mix(gen: torch.Generator, n: int, prob: float, alpha: float) -> MixDraw:
    perm = torch.randperm(n, generator=gen)
    mixed = torch.rand(n, generator=gen, dtype=torch.float64) < prob
    # torch's Beta sampler takes no generator: a numpy one seeded from ours
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    beta = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, n))
    return MixDraw(perm, torch.where(mixed, beta, torch.ones_like(beta)), mixed)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_i -Σ_j targets[i, j] · log softmax(logits)[i, j]; logits, targets (b, N)."""
    return -(targets.to(logits.dtype) * logits.log_softmax(-1)).sum(-1).mean()


class M3CoL(Objective):
    rep_keys = ("image", "text")
    batch_keys = ("label",)  # the step checks every sample has one (the heads' CE needs it)
    scalar_keys = ()  # fixed temperatures, as in the paper

    def __init__(self, cfg: M3CoLConfig):
        super().__init__()
        checks = {  # (requirement, holds, the value)
            "weight >= 0": (cfg.weight >= 0, cfg.weight),
            "0 <= mix_prob <= 1": (0.0 <= cfg.mix_prob <= 1.0, cfg.mix_prob),
            "alpha > 0": (cfg.alpha > 0, cfg.alpha),
            "temperature > 0": (cfg.temperature > 0, cfg.temperature),
            "soft_clip_temperature > 0": (cfg.soft_clip_temperature > 0, cfg.soft_clip_temperature),
            "0 <= mixup_fraction <= 1": (0.0 <= cfg.mixup_fraction <= 1.0, cfg.mixup_fraction),
        }
        bad = [f"{k} (got {v})" for k, (ok, v) in checks.items() if not ok]
        if bad:
            raise ValueError(f"m3col needs {', '.join(bad)}")
        self.cfg = cfg
        self._warned = False
        self.begin_step(StepContext())  # a cross_sample before any step draws like step 0 of seed 0

    # --- per-step draws ------------------------------------------------------------
    def begin_step(self, ctx: StepContext) -> None:
        self._seed = ctx.generator(_SALT).initial_seed()
        self.soft_clip = ctx.progress >= self.cfg.mixup_fraction
        self._draws: Dict[int, Tuple[MixDraw, MixDraw]] = {}

    def draws(self, n: int) -> Tuple[MixDraw, MixDraw]:
        """(image mix, text mix) for a global batch of n rows: this step's draw."""
        if n not in self._draws:
            gen = torch.Generator().manual_seed(self._seed)
            self._draws[n] = tuple(draw_mix(gen, n, self.cfg.mix_prob, self.cfg.alpha) for _ in range(2))
        return self._draws[n]

    # --- cross-sample part -------------------------------------------------------
    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        x, y = reps["image"], reps["text"]  # (b, D)
        # (N, D); re-normalised like the public code (a no-op up to rounding for the model's outputs)
        x_all, y_all = (F.normalize(dist.all_gather_with_grad(r), dim=-1) for r in (x, y))
        rows = torch.arange(x.shape[0], device=x.device) + dist.rank() * x.shape[0]  # (b,) global rows
        if self.soft_clip:
            term = 0.5 * (self._soft_clip(x_all, y_all, rows) + self._soft_clip(y_all, x_all, rows))
            name = "soft_clip"
        else:
            term = self.mixup_terms(x_all, y_all, rows)
            name = "mixup_contrastive"
        return {"loss": self.cfg.weight * term, name: term.detach()}

    def mixup_terms(self, x_all: torch.Tensor, y_all: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """½ (L_image + L_text) on this rank's rows of the global batch x_all, y_all (N, D)."""
        d_img, d_txt = self.draws(x_all.shape[0])
        x_mix, y_mix = d_img.apply(x_all), d_txt.apply(y_all)  # (N, D)
        x_other, y_other = (x_mix, y_mix) if self.cfg.mix_both else (x_all, y_all)
        l_img = self._mixco(x_mix, y_other, d_img, rows)
        l_txt = self._mixco(y_mix, x_other, d_txt, rows)
        return 0.5 * (l_img + l_txt)

    def _mixco(self, mixed: torch.Tensor, other: torch.Tensor, draw: MixDraw, rows: torch.Tensor) -> torch.Tensor:
        """½ [H(P, softmax(m̃·oᵀ/τ)) + H(Pᵀ, softmax(o·m̃ᵀ/τ))] over local rows; mixed, other (N, D)."""
        p = draw.targets().to(mixed.device)  # (N, N)
        tau = self.cfg.temperature
        forward = soft_cross_entropy(mixed[rows] @ other.T / tau, p[rows])  # (b, N)
        backward = soft_cross_entropy(other[rows] @ mixed.T / tau, p[:, rows].T)  # (b, N): Pᵀ's rows
        return 0.5 * (forward + backward)

    def _soft_clip(self, m_all: torch.Tensor, o_all: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """½ [H(Q, softmax(m·oᵀ/τ')) + H(Q, softmax(o·mᵀ/τ'))], Q = softmax(o·oᵀ/τ') on local rows."""
        tau = self.cfg.soft_clip_temperature
        o = o_all[rows]  # (b, D)
        q = (o @ o_all.T / tau).softmax(-1)  # (b, N)
        if self.cfg.detach_soft_targets:
            q = q.detach()
        return 0.5 * (soft_cross_entropy(m_all[rows] @ o_all.T / tau, q) + soft_cross_entropy(o @ m_all.T / tau, q))

    # --- per-sample part -----------------------------------------------------------
    def per_sample(self, out: Tensors, batch: Dict) -> Tensors:
        heads = [k for k in self.cfg.heads if k in out]
        if not heads:
            if not self._warned:
                warnings.warn(f"m3col: the model outputs none of {self.cfg.heads}; training the contrastive "
                              "term only (add classifier heads under model.heads)")
                self._warned = True
            return {}
        labels = batch["label"].to(out[heads[0]].device)  # (b,)
        return {f"ce_{k.removeprefix('logits_')}": F.cross_entropy(out[k], labels, reduction="sum") for k in heads}


@OBJECTIVES.register("m3col", M3CoLConfig)
def _m3col(cfg: M3CoLConfig) -> Objective:
    return M3CoL(cfg)
