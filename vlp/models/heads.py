"""Heads: small modules on top of the towers' outputs (MLCD cluster head, classifier
and fusion heads, ...), registered by name and built from ``model.heads``::

    model:
      heads:
        cluster: {name: mlcd_cluster, num_centers: 1000}   # key -> registry spec

A head is an ``nn.Module`` whose ``forward(out, inputs)`` reads the model's outputs so
far (``out``: unit-norm ``image``/``text``/``audio`` features, ``logit_scale``, ...) and
the model inputs, and returns new outputs to add (e.g. ``{"cluster_logits": ...}``).
Heads run inside the model's forward, so DeepSpeed sees their parameters like any
other (ZeRO partitions them, the optimizer steps them, checkpoints hold them), and the
state-dict names are ``heads.<key>.*``. A builder takes its settings dataclass and the
model's ``embed_dim``. Entries are modules of the models package (``classifier.py``,
``cluster_head.py``), registered when ``vlp/models/__init__.py`` imports them; objectives
read the heads' outputs and never define heads.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from vlp.registry import Registry

HEADS: Registry = Registry("head")

Tensors = Dict[str, torch.Tensor]


def build_heads(specs: Dict[str, Dict], embed_dim: int) -> nn.ModuleDict:
    return nn.ModuleDict({key: HEADS.build(spec, embed_dim) for key, spec in (specs or {}).items()})
