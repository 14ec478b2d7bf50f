"""Settings of the engine: DeepSpeed ZeRO, precision (AMP too), torch.compile, distributed init, gradient cache.

How ``preset``, the ZeRO fields and ``deepspeed`` combine into one DeepSpeed config is
described in ``vlp/engine/deepspeed_engine.py`` and docs/zero.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional


@dataclass
class GradCacheConfig:
    chunk_size: int = 0  # samples per chunk on each rank; 0 = off (one pass)


@dataclass
class EngineConfig:
    # A ZeRO preset: a built-in name (zero0, zero1, zero2, zero3, zero3_offload; written
    # out in configs/deepspeed/) or a path to a DeepSpeed JSON file; the fields below override it.
    preset: Optional[str] = None
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3; with a preset, 0 keeps the preset's stage
    # fp32 | bf16 | fp16 (bf16/fp16: 16-bit weights, for GPUs) | amp_bf16 | amp_fp16 (torch autocast
    # over fp32 weights, DeepSpeed's torch_autocast; amp_bf16 also runs on CPU)
    precision: str = "fp32"
    offload_optimizer: bool = False  # ZeRO optimizer states on CPU (true adds it to a preset)
    offload_params: bool = False  # ZeRO-3 parameters on CPU (true adds it to a preset)
    backend: str = "auto"  # nccl on GPUs, gloo on CPU
    timeout_s: int = 600  # collective timeout: a dead rank fails the others after this
    grad_cache: GradCacheConfig = field(default_factory=GradCacheConfig)  # gradient cache (docs/design.md)
    compile: bool = False  # torch.compile each tower (in place: parameter names unchanged)
    compile_mode: Optional[str] = None  # torch.compile mode: null (default) | reduce-overhead | max-autotune
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # raw fields merged over everything above
