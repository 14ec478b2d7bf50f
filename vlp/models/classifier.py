"""Classifier heads for multimodal classification (M3CoL): MLPs on one modality's
features (unimodal heads) or on the concatenation of several (the fusion head).

Shapes: B rows, D embedding dim, M modalities fused, C classes.

They run inside the model's forward like every head (``vlp/models/heads.py``), read the
unit-norm tower outputs and add logits::

    model:
      heads:
        cls_image:  {name: classifier, modality: image, num_classes: 20}           # -> logits_image
        cls_text:   {name: classifier, modality: text, num_classes: 20}            # -> logits_text
        cls_fusion: {name: fusion_classifier, num_classes: 20}                      # -> logits_fusion

COCONUT's ``coconut_classifier`` is the same head with no hidden layer and output
``class_logits``. A head whose input modality is absent from the batch (an image-only forward) adds
nothing. The MLP is M3CoL's ``Classifier``: ``layers`` hidden Linear+ReLU layers (dropout
after the first), then a Linear to C logits. The losses on these logits live in the
``m3col`` objective (``vlp/objectives/m3col.py``); ``vlp eval classify`` reports the
accuracy of every ``logits_*`` output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from vlp.models.heads import HEADS

Tensors = Dict[str, torch.Tensor]
MODALITIES = ("image", "text", "audio")


@dataclass
class ClassifierConfig:
    num_classes: int = 10  # C
    modality: str = "image"  # which unit-norm model output the head classifies
    hidden_dim: int = 256  # width of the hidden layers
    layers: int = 2  # hidden layers (M3CoL: 2)
    dropout: float = 0.0  # after the first hidden layer
    output: Optional[str] = None  # output key; default logits_<modality>


@dataclass
class FusionClassifierConfig:
    num_classes: int = 10  # C
    modalities: List[str] = field(default_factory=lambda: ["image", "text"])  # concatenated in this order
    hidden_dim: int = 256  # width of the hidden layers
    layers: int = 2  # hidden layers
    dropout: float = 0.0  # after the first hidden layer
    output: str = "logits_fusion"  # output key


def _check(where: str, num_classes: int, modalities, hidden_dim: int, layers: int, dropout: float) -> None:
    bad = [m for m in modalities if m not in MODALITIES]
    if bad or not modalities:
        raise ValueError(f"{where}: modalities must be among {', '.join(MODALITIES)}, got {list(modalities)}")
    if num_classes < 2 or hidden_dim < 1 or layers < 0 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}: need num_classes >= 2, hidden_dim >= 1, layers >= 0, 0 <= dropout < 1; "
                         f"got {num_classes}, {hidden_dim}, {layers}, {dropout}")


def mlp(in_dim: int, hidden_dim: int, layers: int, out_dim: int, dropout: float) -> nn.Sequential:
    """in_dim -> [Linear, ReLU (, Dropout after the first)] x layers -> Linear(out_dim)."""
    mods: List[nn.Module] = []
    dim = in_dim
    for i in range(layers):
        mods += [nn.Linear(dim, hidden_dim), nn.ReLU()]
        if i == 0 and dropout > 0:
            mods.append(nn.Dropout(dropout))
        dim = hidden_dim
    mods.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*mods)


class ClassifierHead(nn.Module):
    """logits (B, C) from the concatenated unit-norm features of ``modalities`` (B, M·D)."""

    def __init__(self, modalities, embed_dim: int, num_classes: int, hidden_dim: int, layers: int,
                 dropout: float, output: str):
        super().__init__()
        self.modalities = tuple(modalities)
        self.output = output
        self.num_classes = num_classes
        self.mlp = mlp(len(self.modalities) * embed_dim, hidden_dim, layers, num_classes, dropout)

    def forward(self, out: Tensors, inputs: Tensors) -> Tensors:
        if any(m not in out for m in self.modalities):
            return {}  # e.g. an image-only forward: no text, no fusion logits
        x = torch.cat([out[m] for m in self.modalities], dim=-1)  # (B, M·D)
        return {self.output: self.mlp(x)}  # (B, C)


@HEADS.register("classifier", ClassifierConfig)
def _classifier(cfg: ClassifierConfig, embed_dim: int) -> nn.Module:
    _check("classifier head", cfg.num_classes, [cfg.modality], cfg.hidden_dim, cfg.layers, cfg.dropout)
    return ClassifierHead([cfg.modality], embed_dim, cfg.num_classes, cfg.hidden_dim, cfg.layers, cfg.dropout,
                          cfg.output or f"logits_{cfg.modality}")


@HEADS.register("fusion_classifier", FusionClassifierConfig)
def _fusion_classifier(cfg: FusionClassifierConfig, embed_dim: int) -> nn.Module:
    _check("fusion_classifier head", cfg.num_classes, cfg.modalities, cfg.hidden_dim, cfg.layers, cfg.dropout)
    return ClassifierHead(cfg.modalities, embed_dim, cfg.num_classes, cfg.hidden_dim, cfg.layers, cfg.dropout,
                          cfg.output)


@dataclass
class CoconutClassifierConfig:
    num_classes: int = 10  # C
    modality: str = "image"  # which unit-norm features it reads


@HEADS.register("coconut_classifier", CoconutClassifierConfig)
def _coconut_classifier(cfg: CoconutClassifierConfig, embed_dim: int) -> nn.Module:
    """COCONUT's head (``vlp/objectives/coconut.py``): the classifier head with no hidden layer,
    output ``class_logits`` (the same as ``{name: classifier, layers: 0, output: class_logits}``)."""
    _check("coconut_classifier head", cfg.num_classes, [cfg.modality], 1, 0, 0.0)
    return ClassifierHead([cfg.modality], embed_dim, cfg.num_classes, 0, 0, 0.0, "class_logits")
