"""Writing a run's weights in the formats downstream tools load.

- ``open_clip``: ``open_clip_config.json`` (``{"model_cfg", "preprocess_cfg"}``) and
  ``open_clip_model.safetensors`` — the layout of an open_clip Hugging Face repo, so
  ``open_clip.create_model_and_transforms("local-dir:OUT")`` loads it. Our model has the
  parameter names of open_clip's ``CustomTextCLIP`` (``model_cfg["custom_text"]``), so the
  state dict is written as is.
- ``safetensors``: ``model.safetensors`` (the state dict) and the run's resolved
  ``config.yaml`` beside it.
"""
from __future__ import annotations

import argparse
import json
import os

from vlp.registry import Registry

# torch, safetensors and the model code are imported inside the exporters: the `vlp`
# parser imports this module for `add_export_parser`, and `vlp --help` should stay fast.

# name -> exporter(run_or_file, out_dir) -> out_dir
EXPORT_FORMATS: Registry = Registry("export format")

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # first in open_clip's _find_checkpoint_in_dir order


def _save_weights(model, path: str) -> None:
    from safetensors.torch import save_file

    # safetensors needs contiguous CPU tensors
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)


@EXPORT_FORMATS.register("open_clip")
def export_open_clip(run_or_file: str, out_dir: str) -> str:
    """An open_clip model folder for ``local-dir:OUT``; returns ``out_dir``."""
    from vlp.engine.checkpoint import load_model_from_run
    from vlp.models.factory import preprocess_cfg

    cfg, model, tokenizer, _ = load_model_from_run(run_or_file)
    os.makedirs(out_dir, exist_ok=True)
    config = {"model_cfg": model.open_clip_cfg, "preprocess_cfg": preprocess_cfg(cfg.model, model)}
    with open(os.path.join(out_dir, OPEN_CLIP_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    _save_weights(model, os.path.join(out_dir, OPEN_CLIP_WEIGHTS))
    if model.open_clip_cfg["text_cfg"].get("hf_tokenizer_name"):
        # open_clip.get_tokenizer("local-dir:OUT") reads an HF tokenizer from OUT itself
        tokenizer.save_pretrained(out_dir)
    return out_dir


@EXPORT_FORMATS.register("safetensors")
def export_safetensors(run_or_file: str, out_dir: str) -> str:
    """``model.safetensors`` + the resolved ``config.yaml``; returns ``out_dir``."""
    from vlp.config import save_config
    from vlp.engine.checkpoint import MODEL_FILE, load_model_from_run

    cfg, model, _, _ = load_model_from_run(run_or_file)
    os.makedirs(out_dir, exist_ok=True)
    _save_weights(model, os.path.join(out_dir, MODEL_FILE))
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    return out_dir


def export(run_or_file: str, fmt: str, out_dir: str) -> str:
    if not os.path.exists(run_or_file):
        raise FileNotFoundError(f"checkpoint not found: {run_or_file}")
    return EXPORT_FORMATS.get(fmt).builder(run_or_file, out_dir)


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export", help="write a checkpoint as an open_clip folder or plain safetensors")
    parser.add_argument(
        "--checkpoint", required=True, help="RUN_DIR (its latest checkpoint), a tag dir or a model.safetensors"
    )
    parser.add_argument(
        "--format", default="open_clip", choices=EXPORT_FORMATS.list(), help="output format (default: open_clip)"
    )
    parser.add_argument("--out", required=True, help="output folder (created; files in it are overwritten)")
    parser.set_defaults(func=_export)
    return parser


def _export(args) -> int:
    print(export(args.checkpoint, args.format, args.out))
    return 0
