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
model's ``embed_dim``. Entries live beside the method that uses them and register here.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from vlp.registry import Registry

HEADS: Registry = Registry("head")

Tensors = Dict[str, torch.Tensor]


def build_heads(specs: Dict[str, Dict], embed_dim: int) -> nn.ModuleDict:
    _import_entries()
    return nn.ModuleDict({key: HEADS.build(spec, embed_dim) for key, spec in (specs or {}).items()})


def _import_entries() -> None:
    """Modules that register heads (imported on first use, like objectives)."""
    import importlib

    for module in _HEAD_MODULES:
        importlib.import_module(module)


_HEAD_MODULES: tuple = ("vlp.objectives.coconut", "vlp.models.cluster_head", "vlp.models.classifier")  # e.g. ("vlp.models.cluster_head",): add yours
