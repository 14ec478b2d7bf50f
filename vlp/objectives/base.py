"""The objective interface that makes gradient caching work for every objective.

An objective splits its loss in two (docs/design.md, "Objectives"):

* ``cross_sample(reps, scalars)``: a function of the representations of the *global*
  batch. It receives this rank's rows (``reps[k]``: (b, D)) and the shared scalars
  (``logit_scale``, ``logit_bias``), gathers across ranks itself through
  ``vlp.dist``, and returns the mean over this rank's rows. Called once per
  step, on representations cached from all chunks.
* ``per_sample(out, batch)``: terms that need no other sample (caption or classifier
  cross-entropy), returned as **sums** over the chunk; the step divides by the local
  batch size, so chunks add up to the mean.

``begin_step(ctx)`` is called once per optimizer step, before any forward, with a
``StepContext`` that is identical on every rank (step index, total steps, run seed,
the model) plus this rank's local batch (to gather e.g. the positive labels of the
global batch). Objectives that draw random numbers shared by the whole global batch (a
mixup permutation, sampled negative centers) take them from ``ctx.generator()``, so
every rank and every chunk sees the same draw, and a plain and a gradient-cached step
draw the same numbers. Objectives that steer a model head for the step (which centers
it scores) set that up here, since the head runs inside the engine's forward.

``rep_keys`` names the per-sample model outputs the cross-sample part reads (they
carry gradients); ``batch_keys`` names batch fields it also needs (labels: no
gradient), passed in ``reps`` beside them; ``scalar_keys`` the per-step scalars.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from vlp.registry import Registry

Tensors = Dict[str, torch.Tensor]

OBJECTIVES: Registry = Registry("objective")


@dataclass
class StepContext:
    step: int = 0  # optimizer steps completed before this one
    total_steps: int = 1  # optim.steps
    seed: int = 0  # run.seed
    model: Optional[nn.Module] = None  # the engine's module (heads live here)
    batch: Optional[Dict] = None  # this rank's whole local batch (all chunks), as the loader gave it

    def generator(self, salt: int = 0, device: str = "cpu") -> torch.Generator:
        """A generator seeded by (seed, step, salt): the same draw on every rank."""
        return torch.Generator(device).manual_seed((self.seed * 1_000_003 + self.step) * 101 + salt)

    @property
    def progress(self) -> float:
        """Fraction of training done before this step, in [0, 1)."""
        return self.step / max(self.total_steps, 1)


class Objective(nn.Module):
    rep_keys: Tuple[str, ...] = ("image", "text")
    batch_keys: Tuple[str, ...] = ()
    scalar_keys: Tuple[str, ...] = ("logit_scale",)

    def begin_step(self, ctx: StepContext) -> None:
        """Per-step setup shared by all ranks and chunks (see module docstring)."""

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        return {}

    def per_sample(self, out: Tensors, batch: Dict) -> Tensors:
        return {}

    def set_seen_classes(self, classes: Optional[Sequence[int]]) -> None:
        """Hook of class-incremental training (``vlp/continual.py``): the class ids learned so far
        (None: every class). Objectives with a classifier term restrict it to these; others ignore it."""


def build_objective(spec) -> Objective:
    return OBJECTIVES.build(spec)
