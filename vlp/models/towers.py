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

from open_clip.model import _build_text_tower, _build_vision_tower
from torch import nn

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
