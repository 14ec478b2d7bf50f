"""AdamW with the usual no-decay groups, and a warmup + cosine schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd (momentum 0.9; updates linear in the gradient)
    lr: float = 5e-4  # peak learning rate (after warmup)
    weight_decay: float = 0.2  # decoupled (AdamW); not on norms, biases, logit scale/bias
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])  # Adam betas
    eps: float = 1e-6  # Adam epsilon
    steps: int = 1000  # total optimizer steps of the run
    samples: Optional[int] = None  # a budget in samples (all ranks) instead: steps = ceil(samples / global batch)
    warmup_steps: int = 100  # linear warmup from 0, then the schedule
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables


def _no_decay(name: str, p: nn.Parameter, extra: set) -> bool:
    # norms, biases, embeddings-as-scalars, logit scale/bias: 1-d tensors (open_clip's rule)
    return p.ndim < 2 or name in extra or name.endswith("logit_scale") or name.endswith("logit_bias")


def param_groups(model: nn.Module, weight_decay: float) -> list:
    extra = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if _no_decay(name, p, extra) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    raise ValueError(f"unknown optim.name {cfg.name!r}; valid: adamw, sgd")


def lr_lambda(cfg: OptimConfig):
    """Multiplier of the base lr at a step: linear warmup, then cosine to ``min_lr_ratio``."""

    def fn(step: int) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
