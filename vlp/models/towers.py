"""Tower registries. Each entry turns its settings dataclass into an open_clip tower config.

Towers are built by open_clip's own builders, so the parameter names of our model are
open_clip's (``visual.*``, ``text.*``) and an export is a config file plus the state
dict. Every tower ends in a projection to the shared ``embed_dim``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

from vlp.registry import Registry

# builder(settings) -> open_clip vision_cfg / text_cfg dict
IMAGE_TOWERS: Registry = Registry("image tower")
TEXT_TOWERS: Registry = Registry("text tower")


@dataclass
class OpenClipViT:
    """open_clip VisionTransformer (the CLIP ViT)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    ls_init_value: Optional[float] = None
    patch_dropout: float = 0.0
    pool_type: str = "tok"
    final_ln_after_pool: bool = False
    no_ln_pre: bool = False
    qk_norm: bool = False


@IMAGE_TOWERS.register("open_clip", OpenClipViT)
def _open_clip_vit(s: OpenClipViT) -> Dict[str, Any]:
    return asdict(s)


@dataclass
class Timm:
    """Any timm model by name, pooled and projected by open_clip's TimmModel."""

    model_name: str = "vit_tiny_patch16_224"
    pretrained: bool = False
    image_size: int = 224
    pool: str = "avg"  # 'avg', 'abs_attn', 'rot_attn', '' (timm's own head pooling)
    proj: str = "linear"  # 'linear', 'mlp', 'none'
    proj_bias: bool = False
    drop: float = 0.0
    drop_path: Optional[float] = None
    patch_dropout: float = 0.0


@IMAGE_TOWERS.register("timm", Timm)
def _timm(s: Timm) -> Dict[str, Any]:
    return {
        "timm_model_name": s.model_name,
        "timm_model_pretrained": s.pretrained,
        "timm_pool": s.pool,
        "timm_proj": s.proj,
        "timm_proj_bias": s.proj_bias,
        "timm_drop": s.drop,
        "timm_drop_path": s.drop_path,
        "patch_dropout": s.patch_dropout,
        "image_size": s.image_size,
    }


@dataclass
class OpenClipText:
    """open_clip causal TextTransformer with the CLIP BPE tokenizer (or an HF one)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: Optional[float] = None
    pool_type: str = "argmax"
    embed_cls: bool = False
    no_causal_mask: bool = False
    proj_bias: bool = False
    pad_id: int = 0
    hf_tokenizer_name: Optional[str] = None


@TEXT_TOWERS.register("open_clip", OpenClipText)
def _open_clip_text(s: OpenClipText) -> Dict[str, Any]:
    cfg = asdict(s)
    if cfg["hf_tokenizer_name"] is None:
        del cfg["hf_tokenizer_name"]
    return cfg
