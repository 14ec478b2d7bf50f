"""DeepSpeed as the engine of every run: the config we generate, and initialisation."""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Dict

import torch

from vlp.engine.config import EngineConfig
from vlp.engine.optim import OptimConfig, build_optimizer, build_scheduler


def _deep_update(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    for k, v in extra.items():
        base[k] = _deep_update(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


def deepspeed_config(engine: EngineConfig, optim: OptimConfig, micro_batch: int) -> Dict[str, Any]:
    zero: Dict[str, Any] = {"stage": engine.zero_stage}
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if engine.offload_params:
        if engine.zero_stage != 3:
            raise ValueError("engine.offload_params needs engine.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,  # the gradient cache owns accumulation (vlp.engine.step)
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": engine.precision == "bf16"},
        "fp16": {"enabled": engine.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # our AdamW with no-decay groups
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _deep_update(cfg, copy.deepcopy(engine.deepspeed))


def build_engine(model: torch.nn.Module, engine_cfg: EngineConfig, optim_cfg: OptimConfig, micro_batch: int):
    """(engine, optimizer, scheduler) with our AdamW and warmup-cosine schedule."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    ds_cfg = deepspeed_config(engine_cfg, optim_cfg, micro_batch)
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg, dist_init_required=False
    )
    if engine_cfg.zero_stage == 0 and engine.world_size == 1:
        # DeepSpeed all-reduces every gradient even over one rank (~10% of a small step)
        engine.enable_backward_allreduce = False
    return engine, optimizer, scheduler


def quiet_deepspeed() -> None:
    """DeepSpeed logs at INFO from every rank; keep warnings only."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    try:
        from deepspeed.utils import logger

        logger.setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover
        pass
