"""A tiny saved run (config.yaml + one checkpoint) for eval/export/CLI tests."""
from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from vlp.config import load_config, save_config
from vlp.models import ModelConfig, create_model

TINY_MODEL = dict(
    embed_dim=32,
    image={"name": "open_clip", "image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    text={"name": "open_clip", "context_length": 16, "width": 32, "heads": 2, "layers": 1},  # CLIP BPE vocab
)
TAG = "step_00000001"


def make_tiny_run(tmp_path, config_overrides: Sequence[str] = (), seed: int = 0, **model_overrides) -> str:
    """RUN_DIR with config.yaml, checkpoints/step_00000001/model.safetensors and checkpoints/latest.

    ``model_overrides`` replace ModelConfig fields of the tiny model (``init_logit_bias=-10.0``);
    ``config_overrides`` are dotted run-config overrides (``["data.val=/x/val"]``). Data
    loading defaults to no worker processes (fast, in-process)."""
    run_dir = os.path.join(str(tmp_path), "run")
    cfg = load_config(None, ["data.workers=0", f"run.dir={run_dir}", *config_overrides])
    cfg.model = ModelConfig(**{**TINY_MODEL, **model_overrides})
    torch.manual_seed(seed)
    model = create_model(cfg.model)
    tag_dir = os.path.join(run_dir, "checkpoints", TAG)
    os.makedirs(tag_dir)
    save_config(cfg, os.path.join(run_dir, "config.yaml"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(tag_dir, "model.safetensors"))
    with open(os.path.join(run_dir, "checkpoints", "latest"), "w") as f:
        f.write(TAG)
    return run_dir


def noise_png(i: int, size: int = 32) -> bytes:
    """A (size, size) RGB PNG of uniform noise seeded by ``i``: distinct, decodable sample images."""
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
