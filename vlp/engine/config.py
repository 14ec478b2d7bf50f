"""Settings of the engine: DeepSpeed ZeRO, precision, distributed init, gradient cache."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict


@dataclass
class GradCacheConfig:
    chunk_size: int = 0  # samples per chunk on each rank; 0 = off (one pass)


@dataclass
class EngineConfig:
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    precision: str = "fp32"  # fp32 | bf16 | fp16 (bf16/fp16 are for GPUs)
    offload_optimizer: bool = False  # ZeRO optimizer states on CPU
    offload_params: bool = False  # ZeRO-3 parameters on CPU
    backend: str = "auto"  # nccl on GPUs, gloo on CPU
    timeout_s: int = 600  # collective timeout: a dead rank fails the others after this
    grad_cache: GradCacheConfig = field(default_factory=GradCacheConfig)
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # raw fields merged over ours
