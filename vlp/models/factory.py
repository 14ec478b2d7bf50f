"""Build the model, its tokenizer and its image transforms from the ``model:`` config."""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer
from open_clip.transform import AugmentationCfg, MaybeConvertMode, MaybeToTensor, PreprocessCfg, image_transform_v2
from PIL import Image
from torch import nn
from torchvision.transforms import Compose, Normalize, ToTensor
from torchvision.transforms import functional as F

from vlp.models.audio import build_audio_tower
from vlp.models.clip import ContrastiveModel
from vlp.models.coca import CoCaModel, coca_model_cfg
from vlp.models.heads import build_heads
from vlp.models.towers import IMAGE_TOWERS, TEXT_TOWERS, open_clip_cfg, text_tower, vision_tower
from vlp.registry import Registry


@dataclass
class LockImage:
    unlocked_groups: Optional[int] = None  # null: the image tower trains; N: frozen but its last N layer groups
    freeze_bn_stats: bool = False  # also freeze BatchNorm running statistics (timm CNN trunks)


@dataclass
class LockText:
    unlocked_layers: Optional[int] = None  # null: the text tower trains; N: frozen but its last N layers
    freeze_layer_norm: bool = True  # keep the LayerNorms of the locked layers frozen too


@dataclass
class LockConfig:
    image: LockImage = field(default_factory=LockImage)  # LiT: lock the image tower
    text: LockText = field(default_factory=LockText)  # lock the text tower


@dataclass
class ModelConfig:
    # An open_clip architecture name ("ViT-B-32", "local-dir:/path"); when set it
    # replaces `image`, `text` and `embed_dim`.
    open_clip: Optional[str] = None
    # An open_clip pretrained tag (with `open_clip`), or a local checkpoint: a .pt /
    # .bin / .safetensors file, or a folder written by `vlp export --format open_clip`.
    pretrained: Optional[str] = None
    embed_dim: int = 512  # the shared embedding dimension D every tower projects to
    image: Optional[Dict[str, Any]] = field(default_factory=lambda: {"name": "open_clip"})  # None: no image tower
    text: Dict[str, Any] = field(default_factory=lambda: {"name": "open_clip"})  # a text tower spec
    quick_gelu: bool = False  # OpenAI CLIP's QuickGELU activation in the open_clip towers
    init_logit_scale: float = math.log(1 / 0.07)  # log of the initial inverse temperature
    init_logit_bias: Optional[float] = None  # set (e.g. -10) for SigLIP
    grad_checkpointing: bool = False  # activation checkpointing in every tower (less memory, more compute)
    # Which model: "clip" (two or three towers + logit scale) or "coca" (see vlp/models/coca.py).
    kind: str = "clip"
    # CoCa's multimodal decoder and pooling settings (kind: coca).
    coca: Dict[str, Any] = field(default_factory=dict)
    # An audio tower spec ({"name": ...}, see the audio tower registry); None = no audio tower.
    audio: Optional[Dict[str, Any]] = None
    # Heads on the towers' outputs, key -> registry spec (vlp/models/heads.py).
    heads: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # Locked (frozen) towers, LiT-style: no gradient, no optimizer state, weights unchanged by training.
    lock: LockConfig = field(default_factory=LockConfig)
    image_mean: Optional[List[float]] = None  # per-channel normalization mean; null: the pretrained tag's or OpenAI's
    image_std: Optional[List[float]] = None  # per-channel normalization std; null: the pretrained tag's or OpenAI's
    image_interpolation: Optional[str] = None  # bicubic | bilinear | random; null: the tag's or bicubic
    image_resize_mode: Optional[str] = None  # shortest | longest | squash; null: the tag's or shortest
    # open_clip.create_model's force_* arguments, on a named model.open_clip architecture:
    force_image_size: Optional[int] = None  # the image tower's input side (positional embedding resized)
    force_context_length: Optional[int] = None  # the text tower's context length
    force_patch_dropout: Optional[float] = None  # the image tower's patch dropout
    force_quick_gelu: bool = False  # QuickGELU activations (OpenAI CLIP weights)


# Model kinds (``model.kind``): name -> a class with ``model_cfg(cfg, base)`` (the kind's open_clip
# model_cfg from the CLIP-form one) and ``build(cfg, model_cfg)`` (the nn.Module).
MODEL_KINDS: Registry = Registry("model kind")


@MODEL_KINDS.register("clip")
class _ClipKind:
    @staticmethod
    def model_cfg(cfg: ModelConfig, base: Dict[str, Any]) -> Dict[str, Any]:
        if cfg.coca:
            warnings.warn("model.coca is ignored: model.kind is clip")
        return base

    @staticmethod
    def build(cfg: ModelConfig, model_cfg: Dict[str, Any]) -> ContrastiveModel:
        quick_gelu, dim = model_cfg.get("quick_gelu", False), model_cfg["embed_dim"]
        if cfg.open_clip:  # a named open_clip architecture: its own tower configs
            visual = None if model_cfg["vision_cfg"] is None else vision_tower(model_cfg["vision_cfg"], dim, quick_gelu)
            text = text_tower(model_cfg["text_cfg"], dim, quick_gelu)
        else:  # the registries' entries (vlp/models/towers.py)
            visual = None if cfg.image is None else IMAGE_TOWERS.build(cfg.image, dim, quick_gelu)
            text = TEXT_TOWERS.build(cfg.text, dim, quick_gelu)
        return ContrastiveModel(
            visual=visual,
            text=text,
            embed_dim=model_cfg["embed_dim"],
            init_logit_scale=model_cfg["init_logit_scale"],
            init_logit_bias=model_cfg.get("init_logit_bias"),
            open_clip_cfg=model_cfg,
            heads=build_heads(cfg.heads, model_cfg["embed_dim"]),
            audio=None if cfg.audio is None else build_audio_tower(cfg.audio, model_cfg["embed_dim"]),
        )


@MODEL_KINDS.register("coca")
class _CoCaKind:  # vlp/models/coca.py
    @staticmethod
    def model_cfg(cfg: ModelConfig, base: Dict[str, Any]) -> Dict[str, Any]:
        if cfg.audio is not None or base.get("vision_cfg") is None:
            raise ValueError("model.kind coca captions images: it needs model.image and takes no model.audio")
        return coca_model_cfg(base, cfg.coca)

    @staticmethod
    def build(cfg: ModelConfig, model_cfg: Dict[str, Any]) -> CoCaModel:
        return CoCaModel(model_cfg, heads=build_heads(cfg.heads, model_cfg["embed_dim"]))


def _open_clip_arch(name: str) -> Dict[str, Any]:
    oc = open_clip.get_model_config(name)
    if oc is None:
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    return oc


FORCE_KEYS = ("force_image_size", "force_context_length", "force_patch_dropout", "force_quick_gelu")


def _force(cfg: ModelConfig, model_cfg: Dict[str, Any]) -> None:
    """``model.force_*`` applied to a named architecture's model_cfg, as open_clip.create_model applies its
    ``force_*`` arguments."""
    if cfg.force_quick_gelu:
        model_cfg["quick_gelu"] = True
    vision_cfg, text_cfg = model_cfg.get("vision_cfg"), model_cfg["text_cfg"]
    if vision_cfg is not None and cfg.force_patch_dropout is not None:
        vision_cfg["patch_dropout"] = cfg.force_patch_dropout
    if vision_cfg is not None and cfg.force_image_size is not None:
        vision_cfg["image_size"] = cfg.force_image_size
    if cfg.force_context_length is not None:
        text_cfg["context_length"] = cfg.force_context_length


def model_kind(cfg: ModelConfig) -> str:
    """``model.kind``, except that an open_clip CoCa architecture (one with a multimodal_cfg) is coca."""
    if cfg.open_clip and "multimodal_cfg" in _open_clip_arch(cfg.open_clip):
        return "coca"
    MODEL_KINDS.get(cfg.kind)  # an unknown kind raises, listing the valid ones
    return cfg.kind


def open_clip_model_cfg(cfg: ModelConfig) -> Dict[str, Any]:
    """The open_clip ``model_cfg`` (CustomTextCLIP or CoCa form) this config stands for."""
    if cfg.open_clip:
        oc = _open_clip_arch(cfg.open_clip)
        keys = ("embed_dim", "vision_cfg", "text_cfg", "multimodal_cfg", "quick_gelu")
        model_cfg = copy.deepcopy({k: v for k, v in oc.items() if k in keys})
        _force(cfg, model_cfg)
    else:
        model_cfg = {
            "embed_dim": cfg.embed_dim,
            "vision_cfg": None if cfg.image is None else open_clip_cfg(IMAGE_TOWERS, cfg.image),  # None: audio-text
            "text_cfg": open_clip_cfg(TEXT_TOWERS, cfg.text),
            "quick_gelu": cfg.quick_gelu,
        }
    model_cfg = MODEL_KINDS.get(model_kind(cfg)).builder.model_cfg(cfg, model_cfg)
    model_cfg["custom_text"] = True
    model_cfg["nonscalar_logit_scale"] = True  # logit scale/bias of shape (1,), see clip.py
    model_cfg["init_logit_scale"] = cfg.init_logit_scale
    if cfg.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = cfg.init_logit_bias
    return model_cfg


def create_model(cfg: ModelConfig, load_weights: bool = True) -> nn.Module:
    """The model of ``model_kind(cfg)``; ``load_weights=False`` skips ``cfg.pretrained`` (its weights come next)."""
    model_cfg = open_clip_model_cfg(cfg)
    model = MODEL_KINDS.get(model_kind(cfg)).builder.build(cfg, model_cfg)
    if cfg.pretrained and load_weights:
        load_pretrained(model, cfg)
    apply_lock(model, cfg)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def check_lock(cfg: ModelConfig) -> None:
    """A lock on a tower the model lacks, or a negative count: ValueError naming the key."""
    image, text = cfg.lock.image.unlocked_groups, cfg.lock.text.unlocked_layers
    has_image = cfg.open_clip is not None or cfg.image is not None
    if image is not None and not has_image:
        raise ValueError("model.lock.image is set but the model has no image tower (model.image is null); "
                         "valid: model.lock.text")
    for key, value in (("model.lock.image.unlocked_groups", image), ("model.lock.text.unlocked_layers", text)):
        if value is not None and value < 0:
            raise ValueError(f"{key} must be null (unlocked) or >= 0, got {value!r}")


def apply_lock(model: nn.Module, cfg: ModelConfig) -> None:
    """Freeze the towers ``model.lock`` names with the towers' own ``lock`` (open_clip's)."""
    check_lock(cfg)
    image, text = cfg.lock.image, cfg.lock.text
    if image.unlocked_groups is not None:
        model.lock_image_tower(unlocked_groups=image.unlocked_groups, freeze_bn_stats=image.freeze_bn_stats)
    if text.unlocked_layers is not None:
        try:
            model.lock_text_tower(unlocked_layers=text.unlocked_layers, freeze_layer_norm=text.freeze_layer_norm)
        except AssertionError:  # open_clip's TextTransformer treats LayerNorms like the other weights
            raise ValueError("model.lock.text.freeze_layer_norm: false is not supported by the open_clip text "
                             "tower; valid: true") from None


def _checkpoint_in_folder(path: str) -> str:
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"no open_clip weights in folder {path}")


def load_pretrained(model: ContrastiveModel, cfg: ModelConfig) -> None:
    """Load open_clip weights from a local file/folder or an open_clip pretrained tag."""
    path = cfg.pretrained
    if not os.path.exists(path):
        if not cfg.open_clip:
            raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
        pcfg = open_clip.get_pretrained_cfg(cfg.open_clip, path)
        if not pcfg:
            tags = open_clip.list_pretrained_tags_by_model(cfg.open_clip)
            raise ValueError(f"no pretrained tag {path!r} for {cfg.open_clip}; valid: {', '.join(tags)}")
        path = open_clip.download_pretrained(pcfg)  # the hub cache; needs network once
    elif os.path.isdir(path):
        path = _checkpoint_in_folder(path)
    # open_clip's loader converts the CLIP (non custom-text) layout and resizes pos embeds
    open_clip.load_checkpoint(model, path, strict=True)


def build_tokenizer(cfg: ModelConfig, model: ContrastiveModel) -> Callable:
    text_cfg = model.open_clip_cfg["text_cfg"]
    if cfg.open_clip:
        return open_clip.get_tokenizer(cfg.open_clip, context_length=text_cfg.get("context_length"))
    if text_cfg.get("hf_tokenizer_name"):
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=text_cfg["context_length"])
    return open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


def preprocess_cfg(cfg: ModelConfig, model: ContrastiveModel) -> Dict[str, Any]:
    vision_cfg = model.open_clip_cfg["vision_cfg"]
    pp = dict(PreprocessCfg(size=vision_cfg.get("image_size", 224)).__dict__)
    if cfg.open_clip and cfg.pretrained and not os.path.exists(cfg.pretrained):
        pcfg = open_clip.get_pretrained_cfg(cfg.open_clip, cfg.pretrained)
        pp.update({k: pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pcfg})
    for key in ("mean", "std", "interpolation", "resize_mode"):  # model.image_*: over the tag's
        if getattr(cfg, f"image_{key}") is not None:
            value = getattr(cfg, f"image_{key}")
            pp[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return pp


def check_preprocess(cfg: ModelConfig) -> None:
    """``model.image_*`` and ``model.force_*`` values: ValueError naming the key."""
    for key, valid in (("image_interpolation", ("bicubic", "bilinear", "random")),
                       ("image_resize_mode", ("shortest", "longest", "squash"))):
        value = getattr(cfg, key)
        if value is not None and value not in valid:
            raise ValueError(f"model.{key} must be one of {', '.join(valid)}, got {value!r}")
    for key in ("image_mean", "image_std"):
        value = getattr(cfg, key)
        if value is not None and (len(value) not in (1, 3) or (key == "image_std" and min(value) <= 0)):
            raise ValueError(f"model.{key} must be 1 or 3 numbers{' > 0' if key == 'image_std' else ''}, "
                             f"got {list(value)!r}")
    forced = [key for key in FORCE_KEYS if getattr(cfg, key) not in (None, False)]
    if forced and not cfg.open_clip:
        raise ValueError(f"model.{forced[0]} applies to a named model.open_clip architecture; own towers set "
                         "model.image.image_size, model.text.context_length, model.image.patch_dropout, "
                         "model.quick_gelu")
    for key, ok, rule in (("force_image_size", lambda v: v >= 1, ">= 1"),
                          ("force_context_length", lambda v: v >= 1, ">= 1"),
                          ("force_patch_dropout", lambda v: 0 <= v < 1, "in [0, 1)")):
        value = getattr(cfg, key)
        if value is not None and not ok(value):
            raise ValueError(f"model.{key} must be {rule}, got {value!r}")


class TrainTransform:
    """open_clip's training transform (``image_transform_v2``) for a PreprocessCfg and ``data.aug``.

    ``split()``: the same transform in two parts, when it ends in ToTensor + Normalize after an RGB
    conversion (open_clip's own pipelines; not timm's, whose random erasing follows the normalization):
    ``per_sample`` stops at the uint8 (3, H, W) tensor and ``per_batch`` converts and normalizes the
    stacked (B, 3, H, W) batch with the same float32 operations, so the batch is bit-identical and the
    per-sample tensor conversion and normalization are done once per batch (what it saves:
    ``tools/profile_stream.py``)."""

    def __init__(self, pp: PreprocessCfg, aug: Optional[Dict[str, Any]] = None):
        self.pp, self.aug = pp, aug
        self.transform = image_transform_v2(pp, is_train=True, aug_cfg=augmentation_cfg(aug))
        steps = list(getattr(self.transform, "transforms", []))
        self._split = (len(steps) >= 3 and any(isinstance(t, MaybeConvertMode) and t.mode == "RGB" for t in steps)
                       and type(steps[-2]) in (MaybeToTensor, ToTensor) and type(steps[-1]) is Normalize)
        if self._split:
            self._head, self._normalize = Compose(steps[:-2]), steps[-1]

    def __call__(self, image: Any) -> Any:
        return self.transform(image)

    def split(self) -> Tuple[Callable[[Any], torch.Tensor], Optional[Callable[[torch.Tensor], torch.Tensor]]]:
        """(per_sample, per_batch); (the whole transform, None) when it does not end as described above."""
        return (self._uint8, self._finish) if self._split else (self.transform, None)

    def _uint8(self, image: Any) -> torch.Tensor:
        image = self._head(image)
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            raise ValueError(f"the train transform's head gave {type(image).__name__}, not an RGB image")
        return F.pil_to_tensor(image)  # (3, H, W) uint8

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> float: torchvision's to_tensor and Normalize, on the whole batch."""
        x = images.to(torch.get_default_dtype()).div_(255)  # a new tensor: normalized in place
        return F.normalize(x, self._normalize.mean, self._normalize.std, inplace=True)

    def __repr__(self) -> str:
        return repr(self.transform)


def augmentation_cfg(aug: Any) -> AugmentationCfg:
    """open_clip's AugmentationCfg from ``data.aug`` (a dataclass or a mapping; None: the defaults)."""
    if aug is None:
        return AugmentationCfg()
    values = dataclasses.asdict(aug) if dataclasses.is_dataclass(aug) else dict(aug)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return AugmentationCfg(**values)


def build_transforms(cfg: ModelConfig, model: ContrastiveModel, aug: Any = None) -> Tuple[Callable, Callable]:
    """(train, eval) image transforms: open_clip's, sized for the image tower; (None, None) without one.
    ``aug``: the run's ``data.aug`` (None: open_clip's default AugmentationCfg); eval ignores it."""
    if model.open_clip_cfg.get("vision_cfg") is None:
        return None, None
    pp = PreprocessCfg(**preprocess_cfg(cfg, model))
    return TrainTransform(pp, aug), image_transform_v2(pp, is_train=False)
