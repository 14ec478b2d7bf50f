"""The optimizer (torch AdamW / SGD, or any timm optimizer), its parameter groups and the lr schedule.

Parameter groups: no weight decay on norms, biases, 1-d parameters, logit scale/bias and what a
tower's ``no_weight_decay()`` names (timm's rule, ``param_groups_weight_decay``); per tower
(``optim.towers.{image,text,audio}``) an own lr and weight decay; with ``optim.layer_decay``
each tower's layers get timm's layer-wise lr scales (``param_groups_layer_decay``: the top layer 1,
each layer below times ``layer_decay``), the layer of a timm trunk parameter from timm's own
``group_matcher``. Groups with the same lr and weight decay are merged. Every group carries its
base lr (``group["vlp_base_lr"]``, the lr at the end of warmup) and the scheduler multiplies it.
"""
from __future__ import annotations

import inspect
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

# model attribute -> optim.towers key
TOWER_KEYS = {"visual": "image", "text": "text", "audio": "audio"}
SCHEDULES = ("cosine", "const", "const_cooldown", "linear")
TORCH_OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TowerOptim:
    lr: Optional[float] = None  # this tower's peak lr; null: optim.lr
    weight_decay: Optional[float] = None  # this tower's weight decay; null: optim.weight_decay


@dataclass
class TowersOptim:
    image: TowerOptim = field(default_factory=TowerOptim)  # the image tower (visual.*)
    text: TowerOptim = field(default_factory=TowerOptim)  # the text tower (text.*)
    audio: TowerOptim = field(default_factory=TowerOptim)  # the audio tower (audio.*)


@dataclass
class OptimConfig:
    # adamw | sgd (torch; sgd: momentum 0.9) | any timm create_optimizer_v2 name (lamb, lion, adafactor, ...)
    name: str = "adamw"
    lr: float = 5e-4  # peak learning rate (after warmup)
    weight_decay: float = 0.2  # decoupled (AdamW); not on norms, biases, logit scale/bias
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])  # Adam betas (optimizers that take betas)
    eps: float = 1e-6  # Adam epsilon (optimizers that take eps)
    steps: int = 1000  # total optimizer steps of the run
    samples: Optional[int] = None  # a budget in samples (all ranks) instead: steps = ceil(samples / global batch)
    warmup_steps: int = 100  # linear warmup from 0, then the schedule
    schedule: str = "cosine"  # after warmup: cosine | const | const_cooldown | linear (to min_lr_ratio at steps)
    cooldown_steps: int = 0  # const_cooldown: the last this many steps decay to min_lr_ratio
    cooldown_power: float = 1.0  # const_cooldown: decay shape (1 linear, 0.5 sqrt)
    min_lr_ratio: float = 0.0  # floor of cosine / linear / cooldown as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    layer_decay: Optional[float] = None  # layer-wise lr decay per tower (timm's); null: off
    towers: TowersOptim = field(default_factory=TowersOptim)  # per-tower lr / weight decay


def optimizer_names() -> List[str]:
    import timm.optim

    return sorted(set(TORCH_OPTIMIZERS) | set(timm.optim.list_optimizers()))


def check_optim(cfg: OptimConfig) -> None:
    """An unknown optimizer or schedule name: ValueError naming the key and the valid choices."""
    if cfg.name not in TORCH_OPTIMIZERS:
        names = optimizer_names()
        if cfg.name not in names:
            raise ValueError(f"unknown optim.name {cfg.name!r}; valid: {', '.join(names)}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown optim.schedule {cfg.schedule!r}; valid: {', '.join(SCHEDULES)}")
    if cfg.layer_decay is not None and not 0 < cfg.layer_decay <= 1:
        raise ValueError(f"optim.layer_decay must be in (0, 1], got {cfg.layer_decay!r}")
    if cfg.cooldown_steps < 0 or cfg.cooldown_steps > cfg.steps:
        raise ValueError(f"optim.cooldown_steps must be in [0, optim.steps], got {cfg.cooldown_steps!r}")
    for key in ("image", "text", "audio"):
        t = getattr(cfg.towers, key)
        if t.lr is not None and t.lr <= 0:
            raise ValueError(f"optim.towers.{key}.lr must be > 0, got {t.lr!r}")
        if t.weight_decay is not None and t.weight_decay < 0:
            raise ValueError(f"optim.towers.{key}.weight_decay must be >= 0, got {t.weight_decay!r}")


def _no_decay(name: str, p: nn.Parameter, extra: set) -> bool:
    # norms, biases, embeddings-as-scalars, logit scale/bias: 1-d tensors (open_clip's and timm's rule)
    return p.ndim < 2 or name in extra or name.endswith("logit_scale") or name.endswith("logit_bias")


_BLOCK = re.compile(r"(?:^|\.)(?:resblocks|blocks|layers|layer)\.(\d+)\.")
_STEM = re.compile(r"embed|conv1|ln_pre|patch|cls_token|class_embedding|^trunk\.stem")


def tower_layers(tower: nn.Module) -> Dict[str, int]:
    """Layer id of each parameter of a tower (0: stem/embeddings, i + 1: block i, top: the rest);
    a timm trunk's ids are timm's own (``group_parameters`` with its ``group_matcher``)."""
    names = [n for n, _ in tower.named_parameters()]
    trunk = getattr(tower, "trunk", None)
    if trunk is not None and hasattr(trunk, "group_matcher"):
        from timm.models import group_parameters

        ids = {f"trunk.{n}": i for n, i in group_parameters(trunk, trunk.group_matcher(coarse=False),
                                                           reverse=True).items()}
        top = max(ids.values(), default=0)
        return {n: ids.get(n, top) for n in names}
    ids = {}
    for n in names:
        m = _BLOCK.search(n)
        ids[n] = int(m.group(1)) + 1 if m else (0 if _STEM.search(n) else None)
    top = max([i for i in ids.values() if i is not None], default=0) + 1
    return {n: top if i is None else i for n, i in ids.items()}


def param_groups(model: nn.Module, weight_decay: float, cfg: Optional[OptimConfig] = None) -> list:
    """Optimizer parameter groups (module docstring); frozen parameters are in none."""
    cfg = cfg or OptimConfig(weight_decay=weight_decay)
    extra = set(getattr(model, "no_weight_decay", lambda: set())())
    scale_of: Dict[str, float] = {}
    tower_of: Dict[str, str] = {}
    for attr, key in TOWER_KEYS.items():
        tower = getattr(model, attr, None)
        if not isinstance(tower, nn.Module):
            continue
        layers = tower_layers(tower) if cfg.layer_decay is not None else {}
        top = max(layers.values(), default=0)
        for n, _ in tower.named_parameters():
            tower_of[f"{attr}.{n}"] = key
            if layers:
                scale_of[f"{attr}.{n}"] = cfg.layer_decay ** (top - layers[n])
    merged: Dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tower = getattr(cfg.towers, tower_of[name]) if name in tower_of else TowerOptim()
        lr = (cfg.lr if tower.lr is None else tower.lr) * scale_of.get(name, 1.0)
        wd = cfg.weight_decay if tower.weight_decay is None else tower.weight_decay
        wd = 0.0 if _no_decay(name, p, extra) else wd
        group = merged.setdefault((lr, wd), {"params": [], "weight_decay": wd, "lr": lr, "vlp_base_lr": lr,
                                             "param_names": []})
        group["params"].append(p)
        group["param_names"].append(name)
    groups = list(merged.values())
    # decayed groups first (the order of the plain two groups: decay, no decay)
    return sorted(groups, key=lambda g: g["weight_decay"] == 0.0)


def _torch_groups(groups: list) -> list:
    return [{k: v for k, v in g.items() if k != "param_names"} for g in groups]


def _timm_optimizer(groups: list, cfg: OptimConfig) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2, get_optimizer_class

    accepted = set(inspect.signature(get_optimizer_class(cfg.name, bind_defaults=False)).parameters)
    kwargs = {}
    if "betas" in accepted:
        kwargs["betas"] = tuple(cfg.betas)
    if "eps" in accepted:
        kwargs["eps"] = cfg.eps
    return create_optimizer_v2(groups, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)


def cpu_adam_built() -> bool:
    """Whether DeepSpeed's cpu_adam op loads without a build: installed prebuilt (DS_BUILD_CPU_ADAM=1) or
    JIT-built before into torch's extension cache by *this* DeepSpeed install (the cache is per user, not
    per environment: ninja rebuilds, minutes, when its build file names another install's sources)."""
    import deepspeed
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory  # where torch's JIT build puts the op

    if installed_ops.get("cpu_adam"):
        return True
    build = _get_build_directory("cpu_adam", verbose=False)
    try:
        with open(os.path.join(build, "build.ninja")) as f:
            ours = os.path.dirname(deepspeed.__file__) in f.read()
    except OSError:
        return False
    return ours and os.path.exists(os.path.join(build, "cpu_adam.so"))


def _cpu_adam(groups: list, cfg: OptimConfig) -> Optional[torch.optim.Optimizer]:
    """DeepSpeedCPUAdam where its op is built (``cpu_adam_built``) or a GPU machine JIT-builds it; a
    CPU-only machine does not build it unasked (about 4 minutes on 2 cores: docs/zero.md says how);
    else None, with a one-line warning (torch AdamW then)."""
    try:
        if not (cpu_adam_built() or torch.cuda.is_available()):
            raise RuntimeError("its op is not built: see docs/zero.md (offload)")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, adamw_mode=True)
    except Exception as e:  # noqa: BLE001 - the op cannot build here: torch AdamW on the offloaded states
        warnings.warn(f"engine.offload_optimizer: DeepSpeedCPUAdam unavailable ({str(e).splitlines()[0][:120]}); "
                      "using torch AdamW on the CPU states")
        return None


def build_optimizer(model: nn.Module, cfg: OptimConfig, offload: bool = False) -> torch.optim.Optimizer:
    """The optimizer of ``optim.name`` over ``param_groups``; ``offload`` (ZeRO optimizer states on
    the CPU) with adamw: DeepSpeed's DeepSpeedCPUAdam where its op builds."""
    check_optim(cfg)
    groups = _torch_groups(param_groups(model, cfg.weight_decay, cfg))
    if cfg.name == "adamw":
        opt = _cpu_adam(groups, cfg) if offload else None
        return opt or torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    return _timm_optimizer(groups, cfg)


def lr_lambda(cfg: OptimConfig):
    """Multiplier of each group's base lr at a step: linear warmup, then ``optim.schedule`` down to
    ``min_lr_ratio`` at ``optim.steps`` (const: flat; const_cooldown: flat, then over the last
    ``cooldown_steps`` down as (1 - progress) ** cooldown_power, open_clip's const-cooldown)."""
    floor = cfg.min_lr_ratio

    def fn(step: int) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "const":
            return 1.0
        if cfg.schedule == "const_cooldown":
            start = cfg.steps - cfg.cooldown_steps
            if step < start:
                return 1.0
            progress = min(1.0, (step - start) / max(1, cfg.cooldown_steps))
            return floor + (1 - floor) * (1 - progress) ** cfg.cooldown_power
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose ``fresh_base_lrs`` (each group's base lr under the current config) stay out of the
    checkpointed state: a resumed run with other optim settings follows its own (``Trainer._follow_schedule``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, fn):
        self.fresh_base_lrs = [g.get("vlp_base_lr", g["lr"]) for g in optimizer.param_groups]
        super().__init__(optimizer, fn)

    def state_dict(self):
        state = super().state_dict()
        state.pop("fresh_base_lrs", None)
        return state


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig):
    return Schedule(optimizer, lr_lambda(cfg))
