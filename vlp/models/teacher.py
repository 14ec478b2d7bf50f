"""A frozen teacher model for distillation (``objective.name: distill``, vlp/objectives/distill.py).

``teacher`` names one of:

- ``open_clip:NAME[:PRETRAINED]``: ``open_clip.create_model(NAME, pretrained=PRETRAINED)`` (a tag, which
  needs the hub cache, or a local weights file);
- ``RUN_DIR``: a vlp run (its ``config.yaml`` ``model`` section and ``checkpoints/latest`` weights) or a
  ``vlp export --format safetensors`` folder (``config.yaml`` + ``model.safetensors``);
- ``EXPORT_DIR``: a ``vlp export --format open_clip`` folder (or any open_clip ``local-dir:`` folder).

The teacher is built on the CPU in eval mode with ``requires_grad`` off; the objective moves it to
the student's device and runs it under ``torch.no_grad``, outside DeepSpeed. It reads the student's
batch as is, so it must take the same tokens (tokenizer, context length) and image size.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import open_clip
import yaml
from safetensors.torch import load_file
from torch import nn

from vlp.models.factory import ModelConfig, create_model
from vlp.registry import make_dataclass

OPEN_CLIP_PREFIX = "open_clip:"


def _run_weights(path: str) -> Optional[Tuple[str, str]]:
    """(config.yaml, weights) of a run folder or a safetensors export; None if ``path`` is neither."""
    config = os.path.join(path, "config.yaml")
    if not os.path.isfile(config):
        return None
    weights = os.path.join(path, "model.safetensors")
    latest = os.path.join(path, "checkpoints", "latest")
    if not os.path.isfile(weights) and os.path.isfile(latest):
        with open(latest, errors="replace") as f:
            weights = os.path.join(path, "checkpoints", f.read().strip(), "model.safetensors")
    return config, weights


def check_teacher(spec: str, key: str = "objective.teacher") -> None:
    """``spec`` names a teacher that can be loaded, without loading weights; ValueError / FileNotFoundError in
    one line naming ``key``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{key} must be open_clip:NAME[:PRETRAINED], a run folder or an open_clip export folder, "
                         f"got {spec!r}")
    if spec.startswith(OPEN_CLIP_PREFIX):
        name, _, pretrained = spec[len(OPEN_CLIP_PREFIX):].partition(":")
        if open_clip.get_model_config(name) is None:
            raise ValueError(f"{key}: unknown open_clip model {name!r}; see open_clip.list_models()")
        if pretrained and not os.path.exists(pretrained) and not open_clip.get_pretrained_cfg(name, pretrained):
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ValueError(f"{key}: no pretrained tag {pretrained!r} for {name}; valid: {', '.join(tags)} "
                             "or a local weights file")
        return
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"{key} not found: {spec} (open_clip:NAME[:PRETRAINED], a run folder or an "
                                "open_clip export folder)")
    run = _run_weights(spec)
    if run is not None:
        if not os.path.isfile(run[1]):
            raise FileNotFoundError(f"{key}: no weights in {spec} (expected checkpoints/latest or model.safetensors)")
        return
    if not os.path.isfile(os.path.join(spec, "open_clip_config.json")):
        raise FileNotFoundError(f"{key}: {spec} is neither a vlp run (config.yaml) nor an open_clip export "
                                "(open_clip_config.json)")


def load_teacher(spec: str) -> nn.Module:
    """The frozen teacher ``spec`` names (module docstring): a module with ``encode_image``, ``encode_text``
    and ``logit_scale`` (the log of the inverse temperature)."""
    check_teacher(spec)
    if spec.startswith(OPEN_CLIP_PREFIX):
        name, _, pretrained = spec[len(OPEN_CLIP_PREFIX):].partition(":")
        model = open_clip.create_model(name, pretrained=pretrained or None)
    elif _run_weights(spec) is not None:
        config, weights = _run_weights(spec)
        with open(config) as f:
            model_cfg = make_dataclass(ModelConfig, (yaml.safe_load(f) or {}).get("model", {}),
                                       where=f"{config} model")
        model_cfg.pretrained, model_cfg.lock = None, type(model_cfg.lock)()
        model = create_model(model_cfg, load_weights=False)
        model.load_state_dict(load_file(weights), strict=True)
    else:
        model = open_clip.create_model(f"local-dir:{spec}")
    model.eval()
    model.requires_grad_(False)
    return model
