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
from safetensors.torch import load_file

from vlp import dist
from vlp.config import Config, load_config
from vlp.data.config import DataConfig
from vlp.engine.checkpoint import MODEL_FILE, ckpt_dir, latest_tag
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
        tag = latest_tag(path)
        if tag is None:
            raise FileNotFoundError(f"no checkpoint in {path} (expected checkpoints/latest)")
        return os.path.join(ckpt_dir(path), tag, MODEL_FILE), path
    weights = os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    here = os.path.dirname(os.path.abspath(weights))
    for folder in (here, os.path.dirname(os.path.dirname(here))):  # export dir; RUN/checkpoints/TAG
        if os.path.isfile(os.path.join(folder, "config.yaml")):
            return weights, folder
    raise FileNotFoundError(f"no config.yaml beside {weights} or in its run folder")


def load_model_from_run(run_or_file: str, device: str = "cpu"):
    """(cfg, model, tokenizer, eval_transform) of a finished or running run, in eval mode."""
    weights, run_dir = find_weights(run_or_file)
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    model = create_model(cfg.model, load_weights=False)  # the run's weights replace any init
    model.load_state_dict(load_file(weights), strict=True)
    model.to(device).eval()
    _, eval_transform = build_transforms(cfg.model, model)
    return cfg, model, build_tokenizer(cfg.model, model), eval_transform


def load_model_from_recipe(config: str, device: Any = "cpu"):
    """(cfg, model, tokenizer, eval_transform) of a recipe's model at random init (``run.seed``:
    the weights a run of that recipe starts from), in eval mode."""
    cfg = load_config(config)
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
        model, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained or None)
        return model, transform, DataConfig()
    cfg = load_config(config)
    seed_all(cfg.run.seed)  # the weights a run of this recipe starts from
    model_cfg = dataclasses.replace(cfg.model, heads={})  # heads are built after the towers: same init
    model = create_model(model_cfg)
    return model, build_transforms(model_cfg, model)[1], cfg.data


def eval_context(cfg: Config, model, tokenizer, transform, device: Any = "cpu", data: Any = None,
                 objective: Optional[Objective] = None, progress: bool = False) -> EvalContext:
    """What the evaluators of ``vlp/eval`` need, from a run config (its ``eval`` and ``data`` sections);
    in a process group every rank evaluates its share of the data."""
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
