"""Writing a run's weights in the formats downstream tools load.

- ``open_clip``: ``open_clip_config.json`` (``{"model_cfg", "preprocess_cfg"}``) and
  ``open_clip_model.safetensors`` — the layout of an open_clip Hugging Face repo, so
  ``open_clip.create_model_and_transforms("local-dir:OUT")`` loads it. Our model has the
  parameter names of open_clip's ``CustomTextCLIP`` (``model_cfg["custom_text"]``), so the
  state dict is written as is.
- ``safetensors``: ``model.safetensors`` (the state dict) and the run's resolved
  ``config.yaml`` beside it.
- ``timm``: the image tower alone as a timm model folder (``config.json`` +
  ``model.safetensors``, written by timm's ``save_for_hf``), so
  ``timm.create_model("local-dir:OUT", pretrained=True)`` rebuilds it. An open_clip ViT
  tower becomes the timm ``vit_*_clip`` ViT whose output is our ``encode_image``
  (``_timm_vit``); a timm tower is its own ``visual.trunk``, and the projection head
  (``visual.head``, open_clip's, not timm's) is written beside as ``image_head.safetensors``.
- ``hf``: towers that are transformers models, each as a ``save_pretrained`` folder;
  no tower vlp builds today is one, so this raises and names them.

``fp32_from_zero`` (``vlp export --fp32-from-zero``) takes the weights from the fp32
master copy in the DeepSpeed ZeRO 1-3 optimizer shards of the checkpoint, consolidated
by DeepSpeed's ``zero_to_fp32``, instead of ``model.safetensors``, which holds the 16-bit
weights after bf16/fp16 training. docs/export.md has the details.

Every file read is first checked against the checksums its checkpoint recorded at save
(``vlp/engine/checkpoint.py``): a damaged one is a one-line error naming it, before
anything is written to the output folder.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import sys
import warnings
from typing import Any, Dict, Optional, Tuple

import timm
import torch
from open_clip.timm_model import TimmModel
from safetensors.torch import save_file
from timm.models import save_for_hf
from timm.models.vision_transformer import _convert_openai_clip
from transformers import PreTrainedModel

from vlp.config import save_config
from vlp.engine import checkpoint
from vlp.engine.checkpoint import MODEL_FILE
from vlp.engine.deepspeed_engine import quiet_deepspeed
from vlp.models.factory import preprocess_cfg
from vlp.registry import Registry
from vlp.runs import find_weights, load_model_from_run

# name -> exporter(run_or_file, out_dir, fp32_from_zero=False) -> out_dir
EXPORT_FORMATS: Registry = Registry("export format")

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # first in open_clip's _find_checkpoint_in_dir order
TIMM_HEAD = "image_head.safetensors"  # beside a timm tower's trunk: open_clip's TimmModel.head


def _save_weights(model, path: str, drop_heads: bool = False) -> None:

    # safetensors needs contiguous CPU tensors; open_clip loads strictly and has no `heads.*`
    # (training heads such as the MLCD centers), so its export leaves them out
    state = {k: v for k, v in model.state_dict().items() if not (drop_heads and k.startswith("heads."))}
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, path)


# ---- where the weights come from ------------------------------------------------------


def zero_fp32_state_dict(run_or_file: str):
    """The fp32 master weights of a ZeRO 1-3 checkpoint, consolidated by DeepSpeed."""
    weights, _ = find_weights(run_or_file)
    tag_dir = os.path.dirname(os.path.abspath(weights))
    if not glob.glob(os.path.join(tag_dir, "*_optim_states.pt")):
        raise ValueError(
            f"--fp32-from-zero needs a DeepSpeed ZeRO 1-3 checkpoint (RUN_DIR or RUN_DIR/checkpoints/step_N); "
            f"{tag_dir} has no *_optim_states.pt shards (a ZeRO-0 run or an export folder: use it without the flag)"
        )
    checkpoint.verify(tag_dir)  # every shard DeepSpeed's reader opens, against the checksums of the save
    quiet_deepspeed()
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints progress; stdout is the output folder
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # after quiet_deepspeed

        return get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(tag_dir), tag=os.path.basename(tag_dir))


def _load(run_or_file: str, fp32_from_zero: bool):
    """(cfg, model, tokenizer, eval_transform) of the checkpoint; fp32 master weights if asked."""
    cfg, model, tokenizer, eval_tf = load_model_from_run(run_or_file)
    if fp32_from_zero:
        master = zero_fp32_state_dict(run_or_file)
        state = model.state_dict()
        missing = sorted(set(state) - set(master))
        if missing:
            raise ValueError(f"the ZeRO checkpoint has no fp32 weights for {', '.join(missing[:5])}")
        model.load_state_dict({k: master[k] for k in state}, strict=True)
    return cfg, model, tokenizer, eval_tf


# ---- open_clip and safetensors ----------------------------------------------------------


@EXPORT_FORMATS.register("open_clip")
def export_open_clip(run_or_file: str, out_dir: str, fp32_from_zero: bool = False) -> str:
    """An open_clip model folder for ``local-dir:OUT``; returns ``out_dir``."""
    cfg, model, tokenizer, _ = _load(run_or_file, fp32_from_zero)
    if getattr(model, "audio", None) is not None or model.visual is None:  # open_clip has no audio tower
        raise ValueError("--format open_clip writes image-text models; this one has an audio tower: "
                         "use --format safetensors")
    os.makedirs(out_dir, exist_ok=True)
    config = {"model_cfg": model.open_clip_cfg, "preprocess_cfg": preprocess_cfg(cfg.model, model)}
    with open(os.path.join(out_dir, OPEN_CLIP_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    _save_weights(model, os.path.join(out_dir, OPEN_CLIP_WEIGHTS), drop_heads=True)
    if model.open_clip_cfg["text_cfg"].get("hf_tokenizer_name"):
        # open_clip.get_tokenizer("local-dir:OUT") reads an HF tokenizer from OUT itself
        tokenizer.save_pretrained(out_dir)
    return out_dir


@EXPORT_FORMATS.register("safetensors")
def export_safetensors(run_or_file: str, out_dir: str, fp32_from_zero: bool = False) -> str:
    """``model.safetensors`` + the resolved ``config.yaml``; returns ``out_dir``."""
    cfg, model, _, _ = _load(run_or_file, fp32_from_zero)
    os.makedirs(out_dir, exist_ok=True)
    _save_weights(model, os.path.join(out_dir, MODEL_FILE))
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    return out_dir


# ---- timm: the image tower ------------------------------------------------------------

# open_clip ViT options that change the computation in ways timm's ViT does not have
_CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")


def _timm_vit_args(model_cfg: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """(timm model name, kwargs) of the timm ViT that computes our open_clip ViT's ``encode_image``.

    Mapping (open_clip ``vision_cfg`` -> timm ``VisionTransformer``): ``width`` -> ``embed_dim``,
    ``layers`` -> ``depth``, ``width // head_width`` -> ``num_heads``, ``mlp_ratio``,
    ``image_size`` -> ``img_size``, ``patch_size``; ``ln_pre`` -> ``pre_norm=True`` (and no
    patch-embed bias); ``ls_init_value`` -> ``init_values``; ``pool_type`` tok -> ``global_pool='token'``,
    avg -> ``'avg'`` with ``fc_norm=final_ln_after_pool``; ``proj`` (width x embed_dim) ->
    ``head`` (``num_classes=embed_dim``, zero bias); quick_gelu -> the ``*_clip_quickgelu_*``
    entry point. The ``vit_base_patch16_clip_224`` entry points give LayerNorm eps 1e-5, as open_clip.
    """
    vc = model_cfg["vision_cfg"]
    problems = [f"{k}=True" for k in _CUSTOM_BLOCK if vc.get(k)]
    if vc.get("block_type") not in (None, "default"):
        problems.append(f"block_type={vc['block_type']!r}")
    if vc.get("attentional_pool"):
        problems.append("attentional_pool")
    if vc.get("pool_type", "tok") not in ("tok", "avg"):
        problems.append(f"pool_type={vc['pool_type']!r}")
    for key in ("act_kwargs", "norm_kwargs"):
        if vc.get(key):
            problems.append(f"{key}={vc[key]}")
    if isinstance(vc.get("layers"), (list, tuple)):
        problems.append("a ModifiedResNet tower (layers is a tuple)")
    if problems:
        raise ValueError(
            "--format timm: this open_clip ViT has no exact timm VisionTransformer equivalent "
            f"({', '.join(problems)}); use --format open_clip"
        )
    avg = vc.get("pool_type", "tok") == "avg"
    name = "vit_base_patch16_clip_quickgelu_224" if model_cfg.get("quick_gelu") else "vit_base_patch16_clip_224"
    kwargs = dict(
        img_size=vc.get("image_size", 224),
        patch_size=vc.get("patch_size", 16),
        embed_dim=vc["width"],
        depth=vc["layers"],
        num_heads=vc["width"] // vc.get("head_width", 64),
        mlp_ratio=vc.get("mlp_ratio", 4.0),
        pre_norm=not vc.get("no_ln_pre", False),
        init_values=vc.get("ls_init_value"),
        global_pool="avg" if avg else "token",
        fc_norm=bool(avg and vc.get("final_ln_after_pool")),  # tok: LN before or after pooling is the same
        num_classes=model_cfg["embed_dim"],
    )
    return name, kwargs


def _timm_vit(model) -> Tuple[Any, Dict[str, Any]]:
    """(timm ViT holding our image tower's weights, the kwargs that rebuild it)."""
    name, kwargs = _timm_vit_args(model.open_clip_cfg)
    vit = timm.create_model(name, pretrained=False, **kwargs)
    # timm's own converter for OpenAI/open_clip CLIP towers (used by its *.openai weights)
    state = _convert_openai_clip({f"visual.{k}": v for k, v in model.visual.state_dict().items()}, vit)
    state = {k.replace(".ls_1.", ".ls1.").replace(".ls_2.", ".ls2."): v for k, v in state.items()}  # layer scale
    if kwargs["fc_norm"]:
        state = {("fc_norm." + k[len("norm.") :] if k.startswith("norm.") else k): v for k, v in state.items()}
    if not kwargs["pre_norm"]:  # timm gives the patch embedding a bias when there is no pre-norm
        state["patch_embed.proj.bias"] = torch.zeros(kwargs["embed_dim"])
    vit.load_state_dict(state, strict=True)
    return vit.eval(), kwargs


def _timm_data_config(pp: Dict[str, Any]) -> Dict[str, Any]:
    """open_clip's eval preprocessing in timm's data-config terms (resize + center crop, no margin)."""
    size = pp["size"] if isinstance(pp["size"], (list, tuple)) else (pp["size"], pp["size"])
    crop_mode = {"shortest": "center", "squash": "squash", "longest": "border"}[pp.get("resize_mode", "shortest")]
    return {"input_size": (3, *size), "interpolation": pp["interpolation"], "mean": tuple(pp["mean"]),
            "std": tuple(pp["std"]), "crop_pct": 1.0, "crop_mode": crop_mode}


@EXPORT_FORMATS.register("timm")
def export_timm(run_or_file: str, out_dir: str, fp32_from_zero: bool = False) -> str:
    """The image tower as a timm ``local-dir`` folder (+ ``image_head.safetensors`` for a timm tower)."""
    cfg, model, _, _ = _load(run_or_file, fp32_from_zero)
    if model.visual is None:
        raise ValueError("--format timm writes the image tower; this model has none (use --format safetensors)")
    if isinstance(model.visual, TimmModel):
        net, model_args = model.visual.trunk, None  # timm recorded its own build arguments
        head = {k: v.contiguous() for k, v in model.visual.head.state_dict().items()}
    else:
        net, model_args = _timm_vit(model)
        head = {}
    os.makedirs(out_dir, exist_ok=True)
    data_config = _timm_data_config(preprocess_cfg(cfg.model, model))
    save_for_hf(net, out_dir, model_args=model_args, safe_serialization=True, data_config=data_config)
    _relabel_timm_config(os.path.join(out_dir, "config.json"))
    if head:
        save_file(head, os.path.join(out_dir, TIMM_HEAD))
    return out_dir


def _relabel_timm_config(path: str) -> None:
    """Our weights are not the entry point's default tag: drop its tag and license."""
    with open(path) as f:
        config = json.load(f)
    config["pretrained_cfg"].pop("license", None)
    config["pretrained_cfg"]["tag"] = "vlp"
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


# ---- hf: towers that are transformers models ---------------------------------------------


def _transformers_model(tower) -> Optional[Any]:
    """The transformers model inside a tower: the tower itself or open_clip's HFTextEncoder.transformer."""
    for candidate in (tower, getattr(tower, "transformer", None), getattr(tower, "trunk", None)):  # trunk: hf audio
        if isinstance(candidate, PreTrainedModel):
            return candidate
    return None


def save_hf_towers(model, out_dir: str) -> Dict[str, str]:
    """``save_pretrained`` of each transformers tower into ``OUT/<tower>/``; {tower: folder}.

    The tower's own parameters outside the transformers model (pooler, projection) go
    beside it as ``OUT/<tower>/head.safetensors`` under their names in the tower."""

    towers = {"visual": model.visual, "text": model.text}
    if getattr(model, "audio", None) is not None:  # vlp.models.audio's hf tower: its trunk
        towers["audio"] = model.audio
    towers = {name: t for name, t in towers.items() if t is not None}  # an audio-text model has no visual
    found = {name: _transformers_model(t) for name, t in towers.items()}
    if not any(found.values()):
        names = ", ".join(f"{name} ({type(t).__name__})" for name, t in towers.items())
        raise ValueError(
            f"--format hf writes towers that are transformers models; none here is: {names}. "
            "Use --format open_clip, timm or safetensors"
        )
    written = {}
    for name, hf in found.items():
        if hf is None:
            continue
        folder = os.path.join(out_dir, name)
        hf.save_pretrained(folder)
        inner = {id(p) for p in hf.parameters()}
        rest = {k: v.detach().contiguous() for k, v in towers[name].named_parameters() if id(v) not in inner}
        if rest:
            save_file(rest, os.path.join(folder, "head.safetensors"))
        written[name] = folder
    skipped = [f"{name} ({type(towers[name]).__name__})" for name, hf in found.items() if hf is None]
    if skipped:

        warnings.warn(f"--format hf: {', '.join(skipped)} is not a transformers model and was not written")
    return written


@EXPORT_FORMATS.register("hf")
def export_hf(run_or_file: str, out_dir: str, fp32_from_zero: bool = False) -> str:
    """``OUT/<tower>/`` ``save_pretrained`` folders for the transformers towers; returns ``out_dir``."""
    _, model, _, _ = _load(run_or_file, fp32_from_zero)
    save_hf_towers(model, out_dir)
    return out_dir


# ---- entry points ---------------------------------------------------------------------


def export(run_or_file: str, fmt: str, out_dir: str, fp32_from_zero: bool = False) -> str:
    if not os.path.exists(run_or_file):
        raise FileNotFoundError(f"checkpoint not found: {run_or_file}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is a file, not a folder")
    return EXPORT_FORMATS.get(fmt).builder(run_or_file, out_dir, fp32_from_zero=fp32_from_zero)


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export", help="write a checkpoint as an open_clip folder, a timm image tower, HF towers or plain safetensors"
    )
    parser.add_argument(
        "--checkpoint", required=True, help="RUN_DIR (its latest checkpoint), a tag dir or a model.safetensors"
    )
    parser.add_argument(
        "--format", default="open_clip", choices=EXPORT_FORMATS.list(), help="output format (default: open_clip)"
    )
    parser.add_argument("--out", required=True, help="output folder (created; files in it are overwritten)")
    parser.add_argument(
        "--fp32-from-zero",
        action="store_true",
        help="weights from the fp32 master copy in the ZeRO 1-3 optimizer shards (DeepSpeed's zero_to_fp32) "
        "instead of model.safetensors, which holds 16-bit weights after bf16/fp16 training",
    )
    parser.set_defaults(func=_export)
    return parser


def _export(args) -> int:
    print(export(args.checkpoint, args.format, args.out, fp32_from_zero=args.fp32_from_zero))
    return 0
