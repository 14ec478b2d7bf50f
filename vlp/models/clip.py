"""The contrastive model: text tower plus an image and/or audio tower, logit scale and bias.

Attribute names follow open_clip's ``CustomTextCLIP`` (``visual``, ``text``,
``logit_scale``, ``logit_bias``) so that state dicts move between the two unchanged.
The audio tower (``vlp.models.audio``) is ``audio.*``; ``visual`` is None in an
audio-text model (``model.image: null``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn


def _features(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """A tower's output, fp32 under autocast (engine.precision amp_*: the objectives compute in fp32)."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.float()
    return F.normalize(x, dim=-1) if normalize else x


class TowerInterface:
    """The uniform tower methods lifted to a model (docs/design.md, "Towers"); shared by ContrastiveModel
    and CoCaModel. ``tower_names`` are the attributes holding towers (None = absent)."""

    tower_names = ("visual", "text")

    def _scalars_and_heads(self, out: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]):
        """The end of every forward: the exp'd logit scale, the bias, then each head's outputs."""
        out["logit_scale"] = self.logit_scale.exp()
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        for head in self.heads.values():
            out.update(head(out, batch))
        return out

    def no_weight_decay(self) -> set:
        names = {"logit_scale", "logit_bias"}
        for prefix in self.tower_names:
            tower = getattr(self, prefix, None)
            if hasattr(tower, "no_weight_decay"):
                names |= {f"{prefix}.{n}" for n in tower.no_weight_decay()}
        return names

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        self.visual.lock(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        self.text.lock(unlocked_layers, freeze_layer_norm)


class ContrastiveModel(TowerInterface, nn.Module):
    tower_names = ("visual", "text", "audio")
    def __init__(
        self,
        visual: Optional[nn.Module],
        text: nn.Module,
        embed_dim: int,
        init_logit_scale: float,
        init_logit_bias: Optional[float],
        open_clip_cfg: Dict[str, Any],
        heads: Optional[nn.ModuleDict] = None,
        audio: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.visual = visual
        self.text = text
        self.audio = audio
        self.embed_dim = embed_dim
        # shape (1,), open_clip's `nonscalar_logit_scale`: DeepSpeed cannot broadcast 0-d params
        self.logit_scale = nn.Parameter(torch.full((1,), float(init_logit_scale)))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.full((1,), float(init_logit_bias)))
        self.open_clip_cfg = open_clip_cfg  # open_clip "model_cfg", written by export
        self.heads = heads if heads is not None else nn.ModuleDict()  # see vlp/models/heads.py

    @property
    def output_dim(self) -> int:
        return self.embed_dim

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(image)  # (B, D)
        return _features(x, normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.text(text)  # (B, D)
        return _features(x, normalize)

    def encode_audio(self, audio: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.audio(audio)  # (B, 1, M, T) log-mels -> (B, D)
        return _features(x, normalize)

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Unit-norm features of each modality present in ``batch`` plus the logit scale/bias."""
        out: Dict[str, torch.Tensor] = {}
        if "image" in batch:
            out["image"] = self.encode_image(batch["image"], normalize=True)
        if "text" in batch:
            out["text"] = self.encode_text(batch["text"], normalize=True)
        if "audio" in batch:
            out["audio"] = self.encode_audio(batch["audio"], normalize=True)
        return self._scalars_and_heads(out, batch)

    # --- the uniform tower interface, lifted to the model -------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for tower in (self.visual, self.text, self.audio):  # an absent tower (None) has no such method
            if hasattr(tower, "set_grad_checkpointing"):
                tower.set_grad_checkpointing(enable)

