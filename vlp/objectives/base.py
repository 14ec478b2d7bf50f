"""The objective interface that makes gradient caching work for every objective.

An objective splits its loss in two (DESIGN.md, section 3):

* ``cross_sample(reps, scalars)``: a function of the representations of the *global*
  batch. It receives this rank's rows (``reps[k]``: (b, D)) and the shared scalars
  (``logit_scale``, ``logit_bias``), gathers across ranks itself through
  ``vlp.engine.dist``, and returns the mean over this rank's rows. Called once per
  step, on representations cached from all chunks.
* ``per_sample(out, batch)``: terms that need no other sample (caption or classifier
  cross-entropy), returned as **sums** over the chunk; the step divides by the local
  batch size, so chunks add up to the mean.

``rep_keys`` names the per-sample model outputs the cross-sample part reads (they
carry gradients); ``batch_keys`` names batch fields it also needs (labels: no
gradient), passed in ``reps`` beside them; ``scalar_keys`` the per-step scalars.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from vlp.registry import Registry

Tensors = Dict[str, torch.Tensor]

OBJECTIVES: Registry = Registry("objective")


class Objective(nn.Module):
    rep_keys: Tuple[str, ...] = ("image", "text")
    batch_keys: Tuple[str, ...] = ()
    scalar_keys: Tuple[str, ...] = ("logit_scale",)

    def cross_sample(self, reps: Tensors, scalars: Tensors) -> Tensors:
        return {}

    def per_sample(self, out: Tensors, batch: Dict) -> Tensors:
        return {}


def build_objective(spec) -> Objective:
    return OBJECTIVES.build(spec)
