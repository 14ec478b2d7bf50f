"""Helpers of ``tools/compare_open_clip_train.sh`` (run with vlp's venv, except ``train``).

- ``model-config RECIPE OUT.json``: the open_clip model config the recipe's model stands for
  (``vlp.models.factory.open_clip_model_cfg``: CustomTextCLIP, same parameter names as vlp's model),
  for ``open_clip.add_model_config``.
- ``train MODEL.json ARGS...``: registers MODEL.json with ``open_clip.add_model_config`` and runs
  ``open_clip_train.main`` with ARGS, in one process (run with the open_clip venv's python; imports
  no vlp).
- ``to-vlp CHECKPOINT RECIPE OUT``: an open_clip_train checkpoint (``epoch_K.pt``) as a folder
  ``vlp eval zeroshot --checkpoint OUT`` reads: ``model.safetensors`` + ``config.yaml`` (the recipe,
  resolved); the weights must load into the recipe's model strictly.
"""
from __future__ import annotations

import json
import os
import sys


def model_config(recipe: str, out: str) -> None:
    from vlp.config import load_config
    from vlp.models.factory import open_clip_model_cfg

    cfg = open_clip_model_cfg(load_config(recipe).model)
    with open(out, "w") as f:
        json.dump(cfg, f, indent=2)


def train(model_json: str, args) -> None:
    import open_clip
    from open_clip_train.main import main

    open_clip.add_model_config(model_json)  # registered as the file's stem
    main(list(args))


def to_vlp(checkpoint: str, recipe: str, out: str, overrides=()) -> None:
    import torch
    from safetensors.torch import save_file

    from vlp.config import load_config, save_config
    from vlp.models import create_model

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    cfg = load_config(recipe, list(overrides))
    model = create_model(cfg.model, load_weights=False)
    own = model.state_dict()
    state = {k: v.reshape(own[k].shape) if k in own else v for k, v in state.items()}  # logit_scale () vs (1,)
    model.load_state_dict(state, strict=True)
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "model.safetensors"))
    save_config(cfg, os.path.join(out, "config.yaml"))


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "model-config":
        model_config(*rest)
    elif cmd == "train":
        train(rest[0], rest[1:])
    elif cmd == "to-vlp":
        to_vlp(rest[0], rest[1], rest[2], rest[3:])
    else:
        sys.exit(f"unknown command {cmd!r}: model-config | train | to-vlp")
