"""A run directory: where its weights are, and its model rebuilt for eval, export and clustering.

Layout of ``RUN_DIR``::

    config.yaml                    the fully resolved run config (``vlp.config.save_config``)
    checkpoints/step_N/, latest    ``vlp/engine/checkpoint.py``
    metrics.jsonl                  ``vlp/metrics.py``
    tasks/task_NNN/model.safetensors, tasks/tasks.json
                                   a continual run's snapshot at the end of each task (``vlp/continual.py``)

The model is rebuilt from the saved ``config.yaml`` (every registry-built section is written
with all its settings, so a default changed since does not change what the run means).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Tuple

import open_clip
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vlp import dist
from vlp.config import Config, check_pretrained, check_shards, load_config
from vlp.data.config import DataConfig
from vlp.engine import checkpoint as ckpt
from vlp.engine.checkpoint import MODEL_FILE
from vlp.errors import CheckpointDamaged
from vlp.eval import EvalContext
from vlp.models import build_tokenizer, build_transforms, create_model
from vlp.objectives import Objective
from vlp.rng import seed_all

TASKS_DIR = "tasks"
TASKS_FILE = "tasks.json"


def find_weights(path: str) -> Tuple[str, str]:
    """(weights file, folder holding its config.yaml) for a run dir, a checkpoint tag
    dir, an export folder (``vlp export --format safetensors``) or the weights file."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, MODEL_FILE)):
        tag = ckpt.latest_tag(path)
        if tag is None:
            raise FileNotFoundError(f"no checkpoint in {path} (expected checkpoints/latest)")
        return os.path.join(ckpt.ckpt_dir(path), tag, MODEL_FILE), path
    weights = os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    here = os.path.dirname(os.path.abspath(weights))
    for folder in (here, os.path.dirname(os.path.dirname(here))):  # export dir; RUN/checkpoints/TAG
        if os.path.isfile(os.path.join(folder, "config.yaml")):
            return weights, folder
    raise FileNotFoundError(f"no config.yaml beside {weights} or in its run folder")


def read_weights(path: str) -> Dict[str, torch.Tensor]:
    """The state dict in ``path`` (a .safetensors file), checked first against the checksum its
    checkpoint recorded (``vlp/engine/checkpoint.py``; a file outside a checkpoint has none);
    a damaged or unreadable file is a one-line ValueError naming it."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        ckpt.verify(folder, [os.path.basename(path)])
    except CheckpointDamaged as e:
        raise CheckpointDamaged(f"{e}{_other_checkpoint(folder)}") from None
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read weights {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                         f"{_other_checkpoint(folder)}") from None


def _other_checkpoint(folder: str) -> str:
    """A hint naming the newest other checkpoint of the run ``folder`` belongs to, when it is one."""
    run_dir = os.path.dirname(os.path.dirname(folder))
    if os.path.basename(os.path.dirname(folder)) != "checkpoints":
        return ""
    others = [t for t in ckpt.tags(run_dir) if t != os.path.basename(folder)]
    return f"; pick another checkpoint, e.g. {os.path.join(ckpt.ckpt_dir(run_dir), others[-1])}" if others else ""


def load_model_from_run(run_or_file: str, device: str = "cpu"):
    """(cfg, model, tokenizer, eval_transform) of a finished or running run, in eval mode; the
    weights are verified against their checkpoint's checksums first (``read_weights``)."""
    weights, run_dir = find_weights(run_or_file)
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    state = read_weights(weights)
    model = create_model(cfg.model, load_weights=False)  # the run's weights replace any init
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the weights {weights} do not fit the model of {os.path.join(run_dir, 'config.yaml')}: "
                         f"{_first_mismatch(e)}") from None
    model.to(device).eval()
    _, eval_transform = build_transforms(cfg.model, model)
    return cfg, model, build_tokenizer(cfg.model, model), eval_transform


def load_model_from_recipe(config: str, device: Any = "cpu"):
    """(cfg, model, tokenizer, eval_transform) of a recipe's model at random init (``run.seed``:
    the weights a run of that recipe starts from), in eval mode."""
    cfg = load_config(config)
    check_pretrained(cfg.model)
    seed_all(cfg.run.seed)
    model = create_model(cfg.model).to(device).eval()
    _, eval_transform = build_transforms(cfg.model, model)
    return cfg, model, build_tokenizer(cfg.model, model), eval_transform


def load_image_model(checkpoint: Optional[str] = None, open_clip_name: Optional[str] = None,
                     config: Optional[str] = None) -> Tuple[torch.nn.Module, object, object]:
    """(model, eval image transform, DataConfig) from a run checkpoint, an open_clip
    ``NAME[:PRETRAINED]`` or a recipe (its model at random init, ``run.seed``)."""
    if checkpoint:
        cfg, model, _, transform = load_model_from_run(checkpoint)
        return model, transform, cfg.data
    if open_clip_name:
        name, _, pretrained = open_clip_name.partition(":")
        if name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {name!r}; e.g. {', '.join(open_clip.list_models()[:5])} "
                             "(open_clip.list_models())")
        if pretrained and not os.path.exists(pretrained) and not open_clip.get_pretrained_cfg(name, pretrained):
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ValueError(f"no pretrained tag {pretrained!r} for {name}; valid: {', '.join(tags) or 'none'}")
        model, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained or None)
        return model, transform, DataConfig()
    cfg = load_config(config)
    check_pretrained(cfg.model)
    seed_all(cfg.run.seed)  # the weights a run of this recipe starts from
    model_cfg = dataclasses.replace(cfg.model, heads={})  # heads are built after the towers: same init
    model = create_model(model_cfg)
    return model, build_transforms(model_cfg, model)[1], cfg.data


def eval_context(cfg: Config, model, tokenizer, transform, device: Any = "cpu", data: Any = None,
                 objective: Optional[Objective] = None, progress: bool = False) -> EvalContext:
    """What the evaluators of ``vlp/eval`` need, from a run config (its ``eval`` and ``data`` sections);
    in a process group every rank evaluates its share of the data. ``data`` given (``--data``) is
    checked first (``check_shards``: a missing, empty or non-tar shard is a one-line error naming it;
    a run's data.val was checked when it started)."""
    if data is not None:
        check_shards("--data", data, other_forms=True)
    return EvalContext(
        model=model, tokenizer=tokenizer, transform=transform, data_cfg=cfg.data,
        data=cfg.data.val if data is None else data, train_data=cfg.data.train, device=device,
        batch_size=cfg.eval.batch_size,
        progress=progress, objective=objective, modality=cfg.eval.modality,
        classnames=cfg.eval.classnames, templates=cfg.eval.templates, rank=dist.rank(), world_size=dist.world_size(),
    )


def task_weights(run_dir: str, task: int) -> str:
    """The weights of a continual run at the end of ``task``."""
    return os.path.join(run_dir, TASKS_DIR, f"task_{task:03d}", MODEL_FILE)


def read_tasks(run_dir: str) -> Dict[str, Any]:
    """``{"tasks": [[...], ...], "done": n, "steps_per_task": S, "modality": m}`` of a continual run."""
    path = os.path.join(run_dir, TASKS_DIR, TASKS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {TASKS_DIR}/{TASKS_FILE} in {run_dir} (not a continual run, or no task finished)")
    with open(path) as f:
        return json.load(f)


def write_tasks(run_dir: str, meta: Dict[str, Any]) -> None:
    tmp = os.path.join(run_dir, TASKS_DIR, f"{TASKS_FILE}.tmp")
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, os.path.join(run_dir, TASKS_DIR, TASKS_FILE))


def _first_mismatch(e: RuntimeError) -> str:
    """The first problem torch's load_state_dict lists (its first line only says where)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
