"""Audio towers: log-mel spectrogram (B, 1, M, T) -> (B, embed_dim) features.

Registered by name in ``AUDIO_TOWERS`` and built from ``model.audio``::

    model:
      audio: {name: vit, n_mels: 64, frames: 101, patch_size: [16, 16], width: 192, layers: 4, heads: 3}

- ``vit``: timm's ``VisionTransformer`` over the spectrogram as a one-channel, non-square
  image (AST-style patches of ``patch_size`` = (mel bins, frames)); the input is
  zero-padded up to a whole number of patches. Pooled by timm (``avg``, ``token``, ``map``).
- ``hf``: a transformers audio encoder built from its config with random init:
  ``audio-spectrogram-transformer`` (ASTModel; pooled by its mean of the CLS and
  distillation tokens) or ``whisper`` (WhisperEncoder; mean over time; the frames are
  padded to the encoder's fixed length). ``config`` passes sizes to the transformers config.

Both end in a linear projection to the shared ``embed_dim`` (``proj``), and share the
tower interface (``output_dim``, ``set_grad_checkpointing``, ``no_weight_decay``,
``lock``). ``n_mels`` and ``frames`` must match the data's log-mel features
(``data.audio``; the run config checks it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from vlp.models.towers import tower_contract
from vlp.registry import Registry

# builder(settings, embed_dim) -> AudioTower
AUDIO_TOWERS: Registry = Registry("audio tower")


class AudioTower(nn.Module):
    """``trunk`` features (B, width) then ``proj`` to (B, embed_dim); subclasses define ``features``."""

    def __init__(self, trunk: nn.Module, width: int, embed_dim: int, n_mels: int, frames: int, proj_bias: bool):
        super().__init__()
        self.trunk = trunk
        self.proj = nn.Linear(width, embed_dim, bias=proj_bias)
        self.n_mels, self.frames, self.embed_dim = n_mels, frames, embed_dim

    @property
    def output_dim(self) -> int:
        return self.embed_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 1, M, T) log-mel features
        if tuple(x.shape[1:]) != (1, self.n_mels, self.frames):
            raise ValueError(f"audio tower expects (B, 1, {self.n_mels}, {self.frames}) log-mels, got {tuple(x.shape)}")
        return self.proj(self.features(x))  # (B, D)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set:
        return set()

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the trunk (the projection stays trainable); partial unlocking is not supported."""
        if unlocked_groups:
            raise ValueError("audio towers lock the whole trunk; unlocked_groups must be 0")
        for p in self.trunk.parameters():
            p.requires_grad = False


def build_audio_tower(spec: Dict[str, Any], embed_dim: int) -> AudioTower:
    return tower_contract(AUDIO_TOWERS.build(spec, embed_dim), embed_dim, "audio tower")


# ---- vit: timm VisionTransformer over the spectrogram ---------------------------------


@dataclass
class AudioViT:
    n_mels: int = 64  # M, = data.audio.n_mels
    frames: int = 101  # T, = data.audio frames (1 + seconds * sample_rate // hop_length)
    patch_size: List[int] = field(default_factory=lambda: [16, 16])  # (mel bins, frames) per patch
    width: int = 192  # transformer width
    layers: int = 12  # transformer blocks
    heads: int = 3  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden / width
    pool: str = "avg"  # timm global_pool: avg, token, map
    drop_path: float = 0.0  # stochastic depth rate
    proj_bias: bool = False  # bias in the projection to embed_dim


class TimmAudioViT(AudioTower):
    def __init__(self, s: AudioViT, embed_dim: int):
        from timm.models.vision_transformer import VisionTransformer

        if len(s.patch_size) != 2 or min(s.patch_size) < 1:
            raise ValueError(f"model.audio.patch_size must be two positive ints (mel bins, frames), got {s.patch_size}")
        pf, pt = s.patch_size
        self.padded = (math.ceil(s.n_mels / pf) * pf, math.ceil(s.frames / pt) * pt)  # (M', T')
        trunk = VisionTransformer(
            img_size=self.padded, patch_size=(pf, pt), in_chans=1, num_classes=0, embed_dim=s.width,
            depth=s.layers, num_heads=s.heads, mlp_ratio=s.mlp_ratio, global_pool=s.pool,
            class_token=s.pool == "token", drop_path_rate=s.drop_path,
        )
        super().__init__(trunk, s.width, embed_dim, s.n_mels, s.frames, s.proj_bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, self.padded[1] - x.shape[-1], 0, self.padded[0] - x.shape[-2]))  # (B, 1, M', T')
        return self.trunk(x)  # (B, width), pooled

    def no_weight_decay(self) -> set:
        return {f"trunk.{n}" for n in self.trunk.no_weight_decay()}


@AUDIO_TOWERS.register("vit", AudioViT)
def _vit(s: AudioViT, embed_dim: int) -> AudioTower:
    return TimmAudioViT(s, embed_dim)


# ---- hf: a transformers audio encoder, random init -------------------------------------


@dataclass
class HFAudio:
    model_type: str = "audio-spectrogram-transformer"  # or "whisper" (its encoder)
    n_mels: int = 64  # mel bands of the input (= data.audio.n_mels)
    frames: int = 101  # frames of the input (= data.audio.frames)
    config: Dict[str, Any] = field(default_factory=dict)  # transformers config fields (hidden_size, ...)
    proj_bias: bool = False  # bias in the projection to embed_dim


class HFAudioEncoder(AudioTower):
    def __init__(self, s: HFAudio, embed_dim: int):
        if s.model_type not in _HF_ENCODERS:
            valid = ", ".join(_HF_ENCODERS)
            raise ValueError(f"model.audio.model_type {s.model_type!r} is not supported; valid: {valid}")
        trunk, width, self.kind = _HF_ENCODERS[s.model_type](s)
        super().__init__(trunk, width, embed_dim, s.n_mels, s.frames, s.proj_bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, 0]  # (B, M, T)
        if self.kind == "ast":
            return self.trunk(input_values=x.transpose(1, 2)).pooler_output  # input (B, T, M) -> (B, width)
        length = self.trunk.config.max_source_positions * 2  # whisper's conv2 (stride 2) halves the frames
        x = F.pad(x, (0, length - x.shape[-1]))  # (B, M, 2 * positions)
        return self.trunk(input_features=x).last_hidden_state.mean(dim=1)  # (B, positions, width) -> (B, width)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        prefix = "activation" if hasattr(self.trunk, "activation_checkpointing_enable") else "gradient"  # renamed in v5
        getattr(self.trunk, f"{prefix}_checkpointing_{'enable' if enable else 'disable'}")()


def _ast(s: HFAudio):
    from transformers import ASTConfig, ASTModel

    cfg = ASTConfig(num_mel_bins=s.n_mels, max_length=s.frames, **s.config)
    return ASTModel(cfg), cfg.hidden_size, "ast"


def _whisper(s: HFAudio):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(num_mel_bins=s.n_mels, max_source_positions=math.ceil(s.frames / 2), **s.config)
    return WhisperEncoder(cfg), cfg.d_model, "whisper"


_HF_ENCODERS = {"audio-spectrogram-transformer": _ast, "whisper": _whisper}


@AUDIO_TOWERS.register("hf", HFAudio)
def _hf(s: HFAudio, embed_dim: int) -> AudioTower:
    return HFAudioEncoder(s, embed_dim)
