"""Image and text tower registries, and the one tower contract (image, text and audio).

Every tower entry builds an ``nn.Module`` from its settings::

    builder(settings, embed_dim, quick_gelu) -> tower        # IMAGE_TOWERS, TEXT_TOWERS
    builder(settings, embed_dim) -> tower                    # AUDIO_TOWERS (vlp/models/audio.py)

and every tower has ``output_dim`` (= ``embed_dim``: it ends in a projection to the shared
space), ``set_grad_checkpointing(enable)`` and ``lock(...)`` (freeze for LiT-style
training), checked by ``tower_contract`` when it is built. Image and text towers are
open_clip's own modules, built by open_clip's builders from the open_clip tower config that
their settings stand for (``settings.open_clip_cfg()``), so the model's parameter names are
open_clip's (``visual.*``, ``text.*``) and an export is that config plus the state dict.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch
from open_clip.hf_configs import arch_dict
from open_clip.hf_model import register_pooler
from open_clip.model import _build_text_tower, _build_vision_tower
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

from vlp.registry import Registry

IMAGE_TOWERS: Registry = Registry("image tower")
TEXT_TOWERS: Registry = Registry("text tower")
CONTRACT = ("set_grad_checkpointing", "lock")


def tower_contract(tower: nn.Module, embed_dim: int, where: str) -> nn.Module:
    """``tower`` with the contract's ``output_dim`` (timm towers lack the attribute); a
    tower without ``set_grad_checkpointing`` or ``lock`` is a programming error."""
    missing = [name for name in CONTRACT if not callable(getattr(tower, name, None))]
    if missing:
        raise TypeError(f"{where} {type(tower).__name__} lacks {', '.join(missing)} (docs/design.md, \"Towers\")")
    if getattr(tower, "output_dim", None) is None:
        tower.output_dim = embed_dim
    return tower


def vision_tower(open_clip_cfg: Dict[str, Any], embed_dim: int, quick_gelu: bool = False) -> nn.Module:
    return tower_contract(_build_vision_tower(embed_dim, open_clip_cfg, quick_gelu), embed_dim, "image tower")


def text_tower(open_clip_cfg: Dict[str, Any], embed_dim: int, quick_gelu: bool = False) -> nn.Module:
    return tower_contract(_build_text_tower(embed_dim, open_clip_cfg, quick_gelu), embed_dim, "text tower")


def open_clip_cfg(registry: Registry, spec: Dict[str, Any]) -> Dict[str, Any]:
    """The open_clip tower config (vision_cfg / text_cfg) that an image or text tower spec stands for."""
    return registry.settings(spec).open_clip_cfg()


@dataclass
class OpenClipViT:
    """open_clip VisionTransformer (the CLIP ViT)."""

    image_size: int = 224  # input side in pixels
    patch_size: int = 16  # patch side in pixels
    width: int = 768  # transformer width
    layers: int = 12  # transformer blocks
    head_width: int = 64  # width per attention head
    mlp_ratio: float = 4.0  # MLP hidden / width
    ls_init_value: Optional[float] = None  # LayerScale init; null: no LayerScale
    patch_dropout: float = 0.0  # fraction of patches dropped in training (FLIP)
    pool_type: str = "tok"  # tok (class token) | avg | avg_all | none
    final_ln_after_pool: bool = False  # final LayerNorm after pooling
    no_ln_pre: bool = False  # no LayerNorm before the blocks
    qk_norm: bool = False  # LayerNorm on queries and keys


    def open_clip_cfg(self) -> Dict[str, Any]:
        return asdict(self)


@IMAGE_TOWERS.register("open_clip", OpenClipViT)
def _open_clip_vit(s: OpenClipViT, embed_dim: int, quick_gelu: bool = False) -> nn.Module:
    return vision_tower(s.open_clip_cfg(), embed_dim, quick_gelu)


@dataclass
class Timm:
    """Any timm model by name, pooled and projected by open_clip's TimmModel."""

    model_name: str = "vit_tiny_patch16_224"  # any timm.list_models() name
    pretrained: bool = False  # timm's pretrained weights (needs them cached)
    image_size: int = 224  # input side in pixels
    pool: str = "avg"  # 'avg', 'abs_attn', 'rot_attn', '' (timm's own head pooling)
    proj: str = "linear"  # 'linear', 'mlp', or '' (timm's own head; 'none' is refused: no projection)
    proj_bias: bool = False  # bias in the projection
    drop: float = 0.0  # dropout before the projection
    drop_path: Optional[float] = None  # stochastic depth rate; null: timm's default
    patch_dropout: float = 0.0  # fraction of patches dropped (ViTs)


    def open_clip_cfg(self) -> Dict[str, Any]:
        return {
            "timm_model_name": self.model_name,
            "timm_model_pretrained": self.pretrained,
            "timm_pool": self.pool,
            "timm_proj": self.proj,
            "timm_proj_bias": self.proj_bias,
            "timm_drop": self.drop,
            "timm_drop_path": self.drop_path,
            "patch_dropout": self.patch_dropout,
            "image_size": self.image_size,
        }


@IMAGE_TOWERS.register("timm", Timm)
def _timm(s: Timm, embed_dim: int, quick_gelu: bool = False) -> nn.Module:
    if s.proj == "none":  # open_clip then returns the trunk's own width, not embed_dim
        raise ValueError("model.image.proj: none leaves the timm trunk's feature width instead of embed_dim; "
                         "use linear, mlp, or '' (timm's own head as the projection)")
    tower = vision_tower(s.open_clip_cfg(), embed_dim, quick_gelu)
    # open_clip's TimmModel does not pass on timm's no-decay parameters (pos_embed, cls_token, ...)
    trunk_names = tower.trunk.no_weight_decay() if hasattr(tower.trunk, "no_weight_decay") else set()
    tower.no_weight_decay = lambda: {f"trunk.{name}" for name in trunk_names}
    return tower


@dataclass
class OpenClipText:
    """open_clip causal TextTransformer with the CLIP BPE tokenizer (or an HF one)."""

    context_length: int = 77  # tokens per caption
    vocab_size: int = 49408  # tokenizer vocabulary (49408: open_clip's BPE)
    width: int = 512  # transformer width
    heads: int = 8  # attention heads
    layers: int = 12  # transformer blocks
    mlp_ratio: float = 4.0  # MLP hidden / width
    ls_init_value: Optional[float] = None  # LayerScale init; null: none
    pool_type: str = "argmax"  # argmax (end token) | first | last | none
    embed_cls: bool = False  # append a learned CLS token
    no_causal_mask: bool = False  # bidirectional attention
    proj_bias: bool = False  # bias in the projection
    pad_id: int = 0  # padding token id
    hf_tokenizer_name: Optional[str] = None  # a transformers tokenizer instead of the CLIP BPE (must be cached)


    def open_clip_cfg(self) -> Dict[str, Any]:
        cfg = asdict(self)
        if cfg["hf_tokenizer_name"] is None:
            del cfg["hf_tokenizer_name"]
        return cfg


@TEXT_TOWERS.register("open_clip", OpenClipText)
def _open_clip_text(s: OpenClipText, embed_dim: int, quick_gelu: bool = False) -> nn.Module:
    return text_tower(s.open_clip_cfg(), embed_dim, quick_gelu)


# ---- any transformers encoder as the text tower: open_clip's own HFTextEncoder --------------------------

@register_pooler
class VlpMaxPooler(nn.Module):
    """Max over the non-padding tokens (open_clip's ``max_pooler`` fails on its integer attention mask)."""

    cls_token_position = None

    def forward(self, x: Any, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = x.last_hidden_state.masked_fill(~attention_mask.bool().unsqueeze(-1), -torch.inf)
        return hidden.max(1).values


@register_pooler
class VlpLastTokenPooler(nn.Module):
    """The last non-padding token (right padding), as embedding models pool."""

    cls_token_position = None

    def forward(self, x: Any, attention_mask: torch.Tensor) -> torch.Tensor:
        last = attention_mask.long().sum(1).clamp(min=1) - 1
        return x.last_hidden_state[torch.arange(last.shape[0], device=last.device), last]


# model.text.pooler -> open_clip's pooler name (the vlp_* ones are registered above in open_clip's table)
HF_POOLERS = {"cls": "cls_pooler", "mean": "mean_pooler", "max": "vlp_max_pooler",
              "last_token": "vlp_last_token_pooler"}
HF_PROJS = ("linear", "mlp")


@dataclass
class HFText:
    """Any transformers encoder (BERT, RoBERTa, XLM-R, T5's encoder, ...) in open_clip's HFTextEncoder, with its
    transformers tokenizer."""

    hf_model_name: str = "bert-base-uncased"  # a hub name (cached) or a save_pretrained folder: model + tokenizer
    pooler: str = "mean"  # cls | mean | max | last_token
    proj: str = "mlp"  # linear | mlp: the projection to embed_dim
    pretrained: bool = True  # load the model's weights (false: random init from its config)
    context_length: int = 77  # tokens per caption (at most the model's max_position_embeddings)

    def open_clip_cfg(self) -> Dict[str, Any]:
        return {
            "hf_model_name": self.hf_model_name,
            "hf_tokenizer_name": self.hf_model_name,
            "hf_pooler_type": HF_POOLERS.get(self.pooler, self.pooler),
            "hf_proj_type": self.proj,
            "hf_model_pretrained": self.pretrained,
            "context_length": self.context_length,
        }


def check_hf_text(s: HFText, where: str = "model.text") -> PretrainedConfig:
    """The transformers config of ``s.hf_model_name`` if it is a text encoder; else ValueError naming the key
    (FileNotFoundError when it cannot be read)."""
    if s.pooler not in HF_POOLERS:
        raise ValueError(f"{where}.pooler must be one of {', '.join(HF_POOLERS)}, got {s.pooler!r}")
    if s.proj not in HF_PROJS:
        raise ValueError(f"{where}.proj must be one of {', '.join(HF_PROJS)}, got {s.proj!r}")
    try:
        config = AutoConfig.from_pretrained(s.hf_model_name)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{where}.hf_model_name {s.hf_model_name!r} cannot be loaded: "
                                f"{str(e).strip().splitlines()[0]}") from None
    kind = config.model_type
    encoder = getattr(config, "is_encoder_decoder", False) or (
        kind in MODEL_MAPPING_NAMES and getattr(config, "vocab_size", None)
        and not getattr(config, "is_decoder", False)
        and (kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES or kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
    if not encoder:
        raise ValueError(f"{where}.hf_model_name {s.hf_model_name!r} is not a text encoder (model_type {kind!r}: "
                         "a decoder-only or non-text model); use an encoder such as BERT, RoBERTa, XLM-R or T5")
    width = next((n for n in ("hidden_size", "d_model", "dim") if isinstance(getattr(config, n, None), int)), None)
    if kind not in arch_dict:  # open_clip's table of HF architectures: the width / layer attribute names
        if width is None:
            raise ValueError(f"{where}.hf_model_name {s.hf_model_name!r}: no hidden_size/d_model in its config")
        arch_dict[kind] = {"config_names": {"context_length": "max_position_embeddings", "vocab_size": "vocab_size",
                                            "width": width, "heads": "num_attention_heads",
                                            "layers": "num_hidden_layers", "layer_attr": "layer",
                                            "token_embeddings_attr": "embeddings"}, "pooler": "mean_pooler"}
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and s.context_length > limit:
        raise ValueError(f"{where}.context_length {s.context_length} exceeds the model's max_position_embeddings "
                         f"({limit})")
    return config


@TEXT_TOWERS.register("hf", HFText)
def _hf_text(s: HFText, embed_dim: int, quick_gelu: bool = False) -> nn.Module:
    check_hf_text(s)
    return text_tower(s.open_clip_cfg(), embed_dim, quick_gelu)
