"""DeepSpeed as the engine of every run: the config we generate, ZeRO presets, and initialisation.

The DeepSpeed config is built in layers, each one overriding the one before:

1. vlp's own fields: micro batch, gradient clipping (``optim.grad_clip``), precision;
2. ``engine.preset``: a ZeRO preset, a built-in name (``ZERO_PRESETS``; the same
   presets are written out as ``configs/deepspeed/<name>.json``) or a path to a JSON
   file. A preset holds ZeRO settings only (``PRESET_KEYS``);
3. the ``engine.*`` ZeRO fields where they are set: ``zero_stage`` when it is not 0
   (without a preset, always), ``offload_optimizer`` / ``offload_params`` when true. A
   ``zero_stage`` that differs from the preset's stage wins, with a warning;
4. ``engine.deepspeed``: raw DeepSpeed fields, merged last.

So ``engine.preset=zero2 engine.zero_stage=3`` runs stage 3 with the zero2 preset's other
knobs (and warns), and ``engine.deepspeed.zero_optimization.stage=1`` beats both. docs/zero.md
has the presets, the precedence and the memory each stage needs.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from typing import Any, Dict, Optional

import torch

from vlp.engine.config import EngineConfig
from vlp.engine.optim import OptimConfig, build_optimizer, build_scheduler
from vlp.registry import Registry

# name -> builder() -> DeepSpeed fields
ZERO_PRESETS: Registry = Registry("ZeRO preset")
# top-level DeepSpeed fields a preset may set: ZeRO's own, nothing that optim/precision own
PRESET_KEYS = ("zero_optimization", "zero_force_ds_cpu_optimizer", "zero_allow_untested_optimizer", "aio")

# bucket sizes in elements (50M = 100 MB messages in bf16, large enough for NCCL bus bandwidth);
# overlap_comm holds ~4.5x both buckets in flight (DeepSpeed docs): ~0.9 GB here, 9 GB at the 5e8 default
_STAGE_1_2 = {
    "reduce_scatter": True,
    "reduce_bucket_size": 50_000_000,
    "allgather_partitions": True,
    "allgather_bucket_size": 50_000_000,
}
_STAGE_3 = {
    "overlap_comm": True,
    "contiguous_gradients": True,
    "reduce_bucket_size": 50_000_000,
    "sub_group_size": 1_000_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,  # params below this many elements stay whole on every rank
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "stage3_gather_16bit_weights_on_model_save": False,  # vlp.engine.checkpoint gathers model.safetensors itself
}
_CPU = {"device": "cpu", "pin_memory": True}
PRECISIONS = ("fp32", "bf16", "fp16", "amp_bf16", "amp_fp16")
AMP = {"amp_bf16": "bfloat16", "amp_fp16": "float16"}  # engine.precision -> torch_autocast dtype


@ZERO_PRESETS.register("zero0")
def _zero0() -> Dict[str, Any]:
    return {"zero_optimization": {"stage": 0}}


@ZERO_PRESETS.register("zero1")
def _zero1() -> Dict[str, Any]:
    return {"zero_optimization": {"stage": 1, **_STAGE_1_2}}


@ZERO_PRESETS.register("zero2")
def _zero2() -> Dict[str, Any]:
    return {"zero_optimization": {"stage": 2, **_STAGE_1_2, "overlap_comm": True, "contiguous_gradients": True}}


@ZERO_PRESETS.register("zero3")
def _zero3() -> Dict[str, Any]:
    return {"zero_optimization": {"stage": 3, **_STAGE_3}}


@ZERO_PRESETS.register("zero3_offload")
def _zero3_offload() -> Dict[str, Any]:
    zero = {"stage": 3, **_STAGE_3, "offload_optimizer": dict(_CPU), "offload_param": dict(_CPU)}
    # vlp hands DeepSpeed its own torch AdamW (no-decay groups); DeepSpeed otherwise insists on DeepSpeedCPUAdam
    return {"zero_optimization": zero, "zero_force_ds_cpu_optimizer": False}


def _is_path(preset: str) -> bool:
    return preset.endswith(".json") or os.sep in preset or (os.altsep is not None and os.altsep in preset)


def load_preset(preset: str) -> Dict[str, Any]:
    """The DeepSpeed fields of ``engine.preset``: a built-in name or a path to a JSON file."""
    if _is_path(preset):
        if not os.path.isfile(preset):
            raise FileNotFoundError(f"engine.preset file not found: {preset}")
        with open(preset) as f:
            try:
                fields = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"engine.preset {preset} is not valid JSON: {e}") from None
    else:
        try:
            fields = ZERO_PRESETS.get(preset).builder()
        except ValueError as e:
            raise ValueError(f"{e}; or a path to a DeepSpeed JSON file") from None
    _check_preset(fields, preset)
    return copy.deepcopy(fields)


def _check_preset(fields: Any, preset: str) -> None:
    if not isinstance(fields, dict):
        raise ValueError(f"engine.preset {preset}: expected a JSON object, got {type(fields).__name__}")
    extra = sorted(set(fields) - set(PRESET_KEYS))
    if extra:
        raise ValueError(
            f"engine.preset {preset} sets {', '.join(extra)}: a preset holds ZeRO settings only "
            f"({', '.join(PRESET_KEYS)}); put other DeepSpeed fields in engine.deepspeed"
        )
    zero = fields.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ValueError(f"engine.preset {preset}: zero_optimization must be an object with stage 0-3")


def _deep_update(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    for k, v in extra.items():
        base[k] = _deep_update(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


def _offloads(section: Optional[Dict[str, Any]]) -> bool:
    return bool(section) and section.get("device", "none") not in (None, "none")


def _apply_engine_fields(zero: Dict[str, Any], engine: EngineConfig) -> None:
    """Layer 3: the engine.* ZeRO fields over the preset, where they are set."""
    preset_stage = zero.get("stage")
    if engine.preset is None or engine.zero_stage != 0:
        if engine.preset is not None and preset_stage is not None and preset_stage != engine.zero_stage:
            warnings.warn(
                f"engine.zero_stage={engine.zero_stage} overrides stage {preset_stage} of "
                f"engine.preset={engine.preset}; the preset's other ZeRO settings still apply"
            )
        zero["stage"] = engine.zero_stage
    zero.setdefault("stage", 0)
    pin = torch.cuda.is_available()
    if engine.offload_optimizer and not _offloads(zero.get("offload_optimizer")):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if engine.offload_params and not _offloads(zero.get("offload_param")):
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}


def _check_offload(cfg: Dict[str, Any]) -> None:
    zero = cfg["zero_optimization"]
    stage = zero.get("stage", 0)
    if _offloads(zero.get("offload_param")) and stage != 3:
        raise ValueError(
            f"offloading parameters (engine.offload_params) needs ZeRO stage 3 "
            f"(engine.zero_stage=3 or engine.preset=zero3_offload), got stage {stage}"
        )
    if _offloads(zero.get("offload_optimizer")):
        if stage == 0:
            raise ValueError("offloading the optimizer (engine.offload_optimizer) needs ZeRO stage 1-3, got stage 0")
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)  # our torch AdamW, see _zero3_offload


def deepspeed_config(engine: EngineConfig, optim: OptimConfig, micro_batch: int) -> Dict[str, Any]:
    """The DeepSpeed config dict: vlp's fields < preset < engine.* ZeRO fields < engine.deepspeed."""
    cfg: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,  # the gradient cache owns accumulation (vlp.engine.step)
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {},
        "bf16": {"enabled": engine.precision == "bf16"},
        "fp16": {"enabled": engine.precision == "fp16", "initial_scale_power": 16},
        # amp_*: autocast in the engine's forward over fp32 weights and optimizer (fp16: a GradScaler at ZeRO-0)
        "torch_autocast": {"enabled": engine.precision in AMP, "dtype": AMP.get(engine.precision, "bfloat16")},
        "zero_allow_untested_optimizer": True,  # our AdamW with no-decay groups
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if engine.preset:
        _deep_update(cfg, load_preset(engine.preset))
    _apply_engine_fields(cfg["zero_optimization"], engine)
    _deep_update(cfg, copy.deepcopy(engine.deepspeed))
    _check_offload(cfg)
    return cfg


def build_engine(model: torch.nn.Module, engine_cfg: EngineConfig, optim_cfg: OptimConfig, micro_batch: int):
    """(engine, optimizer, scheduler) with our optimizer and schedule (vlp/engine/optim.py); with
    ``engine.compile`` each tower is compiled in place first."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    ds_cfg = deepspeed_config(engine_cfg, optim_cfg, micro_batch)
    if engine_cfg.compile:
        compile_towers(model, engine_cfg.compile_mode)
    offload = _offloads(ds_cfg["zero_optimization"].get("offload_optimizer"))
    optimizer = build_optimizer(model, optim_cfg, offload=offload)
    scheduler = build_scheduler(optimizer, optim_cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg, dist_init_required=False
    )
    if engine.zero_optimization_stage() == 0 and engine.world_size == 1:
        # DeepSpeed all-reduces every gradient even over one rank
        engine.enable_backward_allreduce = False
    return engine, optimizer, scheduler


def compile_towers(model: torch.nn.Module, mode: Optional[str] = None) -> None:
    """``torch.compile`` each tower's forward in place (``nn.Module.compile``: the state dict keeps its names)."""
    for name in ("visual", "text", "audio"):
        tower = getattr(model, name, None)
        if isinstance(tower, torch.nn.Module):
            tower.compile(mode=mode)


def quiet_deepspeed() -> None:
    """DeepSpeed logs at INFO from every rank; keep warnings only."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    try:
        from deepspeed.utils import logger

        logger.setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover
        pass
