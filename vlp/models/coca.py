"""CoCa: contrastive captioner (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text
Foundation Models"), built on open_clip's ``CoCa``.

Shapes: B batch, L text context (tokens incl. start/end), Q caption queries of the image
pooler, D ``embed_dim``, W text/decoder width (= the image tokens' width, see ``_check``),
V vocabulary.

- image tower (open_clip ViT) -> transformer tokens -> attentional pooling (learned
  queries): one vector for the contrastive embedding (B, D) and Q tokens of caption
  context (B, Q, D);
- unimodal text decoder (open_clip's causal ``TextTransformer`` with a learned CLS token
  appended, ``embed_cls``): the CLS output is the text embedding (B, D), the other
  outputs (B, L, W) feed
- the multimodal decoder (``MultimodalTransformer``: causal self-attention plus
  cross-attention to the image tokens in every layer) ending in the vocabulary
  projection: caption logits (B, L-1, V) for the next token at each position.

Pooling (``model.coca.pooling``):
- ``open_clip``: open_clip's CoCa pooling: one attentional pooler with Q queries; the
  first output is the contrastive embedding, the other Q-1 the caption context
  (``vision_cfg.attentional_pool: true``, the pretrained coca_* weights);
- ``parallel``: the paper's: a 1-query contrastive pooler and a separate Q-query caption
  pooler, both over the ViT tokens (``attentional_pool: "parallel"``);
- ``cascade``: the 1-query pooler reads the caption pooler's Q outputs
  (``attentional_pool: "cascade"``);
- ``none``: no pooler: the class token is the contrastive embedding and the patch tokens
  (ViT width) the caption context (open_clip's ``coca_base``).
Open_clip builds parallel and cascade; it applies its final LayerNorm (sized D) to the ViT
tokens (width) before pooling, so they need the ViT width equal to D.

The model is an open_clip ``CoCa`` (same parameter names), so an export is its
``model_cfg`` plus the state dict, and open_clip's pretrained CoCa weights load as they
are. ``forward(batch)`` returns the dict the training step reads; the losses live in
``vlp/objectives/coca.py`` and generation in ``vlp/generate.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from open_clip.coca_model import CoCa
from torch import nn

from vlp.models.clip import TowerInterface
from vlp.registry import make_dataclass

IGNORE_INDEX = -100  # caption_labels at padding: ignored by the caption loss (torch's default)

# model.coca.pooling -> open_clip's vision_cfg.attentional_pool
POOLINGS = {"open_clip": True, "parallel": "parallel", "cascade": "cascade", "none": False}


@dataclass
class CoCaSettings:
    """``model.coca``: the image pooler and the multimodal decoder."""

    pooling: str = "open_clip"  # open_clip | parallel (the paper) | cascade, see the module docstring
    caption_queries: int = 256  # Q: learned queries of the caption pooler
    pooler_heads: int = 8  # attention heads of the poolers
    # the multimodal (captioning) decoder; its width is the text width
    layers: int = 12  # decoder blocks
    heads: int = 8  # decoder attention heads
    mlp_ratio: float = 4.0  # decoder MLP hidden / width
    ls_init_value: Optional[float] = None  # decoder LayerScale init; null: none


def coca_settings(values: Dict[str, Any]) -> CoCaSettings:
    s = make_dataclass(CoCaSettings, values, where="model.coca")
    if s.pooling not in POOLINGS:
        raise ValueError(f"model.coca.pooling must be one of {', '.join(POOLINGS)}, got {s.pooling!r}")
    if s.caption_queries < 2 and s.pooling == "open_clip":
        raise ValueError("model.coca.caption_queries must be >= 2 with open_clip pooling (1 contrastive + captions)")
    return s


def coca_model_cfg(base: Dict[str, Any], coca: Dict[str, Any]) -> Dict[str, Any]:
    """open_clip CoCa ``model_cfg`` from a CLIP-form one (``base``: embed_dim, vision_cfg,
    text_cfg, ...) and ``model.coca``. An open_clip CoCa architecture (``base`` has a
    ``multimodal_cfg``) keeps its own values; only the ``model.coca`` keys given replace them."""
    given, from_open_clip = set(coca), "multimodal_cfg" in base
    s = coca_settings(coca)
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if vision.get("timm_model_name") or isinstance(vision.get("layers"), (list, tuple)):
        raise ValueError("CoCa needs an open_clip ViT image tower (model.image.name: open_clip)")
    if text.get("hf_model_name"):
        raise ValueError("CoCa needs the open_clip text transformer (model.text.name: open_clip)")
    mm = dict(cfg.get("multimodal_cfg") or {})
    keep = lambda key: from_open_clip and key not in given  # noqa: E731
    if not keep("pooling"):
        vision["attentional_pool"] = POOLINGS[s.pooling]
    if not keep("caption_queries"):
        vision["attn_pooler_queries"] = s.caption_queries
    if not keep("pooler_heads"):
        vision["attn_pooler_heads"] = s.pooler_heads
    vision["output_tokens"] = True
    text.update(embed_cls=True, output_tokens=True)
    text.pop("pool_type", None)  # the CLS token decides (last position)
    for key in ("layers", "heads", "mlp_ratio", "ls_init_value"):
        if not keep(key):
            mm[key] = getattr(s, key)
    # the decoder shares the text tower's vocabulary, width and context
    mm.update(context_length=text.get("context_length", 77), vocab_size=text.get("vocab_size", 49408),
              width=text.get("width", 512))
    mm.setdefault("attn_pooler_heads", vision.get("attn_pooler_heads", 8))
    cfg["multimodal_cfg"] = mm
    _check(cfg)
    return cfg


def _check(cfg: Dict[str, Any]) -> None:
    d, vision, text, mm = cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], cfg["multimodal_cfg"]
    pool = vision.get("attentional_pool", False)
    token_dim = d if pool else vision.get("width", 768)  # the poolers output D; no pooler: the ViT tokens
    if not text.get("width", 512) == mm["width"] == token_dim:
        raise ValueError(
            f"CoCa needs text width = decoder width = image token width ({'embed_dim' if pool else 'image width'}: "
            f"the decoder reads the text tower's tokens and cross-attends to the image tokens); "
            f"got text {text.get('width', 512)}, image tokens {token_dim}"
        )
    if pool in ("parallel", "cascade") and vision.get("width", 768) != d:
        raise ValueError(
            f"model.coca.pooling {vision['attentional_pool']!r} needs the image width equal to embed_dim "
            f"(open_clip's LayerNorm before its two poolers is sized embed_dim); got {vision.get('width', 768)} and {d}"
        )
    for what, width, heads in (("text", token_dim, text.get("heads", 8)), ("decoder", token_dim, mm["heads"]),
                               ("pooler", d, vision.get("attn_pooler_heads", 8) if pool else 1)):
        if width % heads:
            raise ValueError(f"CoCa {what} width {width} is not divisible by its {heads} heads")


class CoCaModel(TowerInterface, CoCa):
    """open_clip's CoCa with the ``forward(batch) -> dict`` of vlp's models (see ``clip.py``)."""

    def __init__(self, model_cfg: Dict[str, Any], heads: Optional[nn.ModuleDict] = None):
        kwargs = {k: v for k, v in model_cfg.items() if k != "custom_text"}
        super().__init__(**kwargs)
        self.open_clip_cfg = model_cfg  # open_clip "model_cfg", written by export
        self.embed_dim = model_cfg["embed_dim"]
        self.heads = heads if heads is not None else nn.ModuleDict()  # see vlp/models/heads.py
        self._init_decoder()

    @torch.no_grad()
    def _init_decoder(self) -> None:
        """The multimodal decoder's init. open_clip 3.3 leaves ``text_decoder.text_projection``
        as ``torch.empty`` (``MultimodalTransformer.init_parameters`` is never called and would
        fail); this is the init it intends, the text tower's."""
        dec = self.text_decoder
        proj_std = (dec.width ** -0.5) * ((2 * dec.layers) ** -0.5)
        attn_std, fc_std = dec.width ** -0.5, (2 * dec.width) ** -0.5
        for block in [*dec.resblocks, *dec.cross_attn]:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(dec.text_projection, std=dec.width ** -0.5)

    @property
    def output_dim(self) -> int:
        return self.embed_dim

    def _encode_image(self, images: torch.Tensor, normalize: bool = True):
        latent, tokens = self.visual(images)  # (B, D) or (B, 1, D); (B, Q or Q-1, D)
        if latent.ndim == 3:  # open_clip's 1-query contrastive pooler (parallel/cascade) keeps the query axis
            latent = latent[:, 0]
        return (F.normalize(latent, dim=-1) if normalize else latent), tokens

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._encode_image(images, normalize=normalize)[0]

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._encode_text(text, normalize=normalize)[0]

    def caption_logits(self, image_tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, V) at every position of ``text`` (B, T) given the image
        tokens (B, Q, D): the unimodal then the multimodal decoder."""
        _, token_embs = self.text(text)  # (B, T, W), the CLS output left out
        return self.text_decoder(image_tokens, token_embs)

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Unit-norm ``image``/``text`` (B, D), ``logit_scale`` (exp'd), and with both
        modalities ``caption_logits`` (B, L-1, V) for ``caption_labels`` (B, L-1): the next
        tokens, IGNORE_INDEX at padding."""
        out: Dict[str, torch.Tensor] = {}
        image_tokens = None
        if "image" in batch:
            out["image"], image_tokens = self._encode_image(batch["image"], normalize=True)
        if "text" in batch:
            text = batch["text"]  # (B, L)
            out["text"], token_embs = self._encode_text(text, normalize=True)  # (B, D), (B, L, W)
            if image_tokens is not None:  # teacher forcing: position t predicts token t+1
                out["caption_logits"] = self.text_decoder(image_tokens, token_embs[:, :-1])  # (B, L-1, V)
                labels = text[:, 1:]
                out["caption_labels"] = labels.masked_fill(labels == self.pad_id, IGNORE_INDEX)
        return self._scalars_and_heads(out, batch)

