"""Settings of class-incremental training (the ``continual:`` section of a run config).

    continual:
      tasks: [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]   # class ids, learned one task after another
      steps_per_task: 60          # optim.steps becomes len(tasks) * steps_per_task
      buffer_size: 200            # replay memory in samples, or "2%" of data.train; 0 = no replay
      policy: class_balanced      # class_balanced (per-class reservoir) | random (reservoir)
      replay_fraction: 0.5        # share of each batch drawn from the memory once it holds samples
      modality: image             # the tower the frozen teacher encodes for NSPT (image | audio)
      lr_schedule: per_task       # per_task: optim's warmup + decay within each task | global: over the run

No ``tasks``: an ordinary (non-continual) run.
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from typing import Any, List

from vlp.data.shards import expand_spec

POLICIES = ("class_balanced", "random")
MODALITIES = ("image", "audio")
LR_SCHEDULES = ("global", "per_task")


@dataclass
class ContinualConfig:
    tasks: List[List[int]] = field(default_factory=list)  # class ids per task; empty: not continual
    steps_per_task: int = 0  # 0: optim.steps // len(tasks); else optim.steps = len(tasks) * steps_per_task
    buffer_size: str = "200"  # samples ("200") or a percentage of data.train ("2%"); split over ranks
    policy: str = "class_balanced"  # replay memory: class_balanced (per-class reservoir) | random (reservoir)
    replay_fraction: float = 0.5  # of each batch, from the memory (tasks after the first)
    modality: str = "image"  # which features the teacher provides: image or audio
    # global: optim's warmup + schedule span the whole task sequence (the last tasks train at a small lr);
    # per_task: they restart with each task (warmup_steps, then the decay over steps_per_task)
    lr_schedule: str = "global"

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)


def validate_continual(cfg: ContinualConfig) -> None:
    """One-line ValueErrors for bad settings (only when ``tasks`` is set)."""
    if not cfg.enabled:
        return
    flat = [c for task in cfg.tasks for c in task]
    if any(not task for task in cfg.tasks):
        raise ValueError(f"continual.tasks: every task needs at least one class id, got {cfg.tasks}")
    if any(c < 0 for c in flat) or len(set(flat)) != len(flat):
        raise ValueError(f"continual.tasks: class ids must be >= 0 and appear in one task only, got {cfg.tasks}")
    if cfg.steps_per_task < 0:
        raise ValueError(f"continual.steps_per_task must be >= 0, got {cfg.steps_per_task}")
    if cfg.policy not in POLICIES:
        raise ValueError(f"continual.policy must be one of {', '.join(POLICIES)}, got {cfg.policy!r}")
    if not 0.0 <= cfg.replay_fraction < 1.0:
        raise ValueError(f"continual.replay_fraction must be in [0, 1), got {cfg.replay_fraction}")
    if cfg.modality not in MODALITIES:
        raise ValueError(f"continual.modality must be one of {', '.join(MODALITIES)}, got {cfg.modality!r}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"continual.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg.lr_schedule!r}")
    parse_buffer_size(cfg.buffer_size)


def parse_buffer_size(text: Any):
    """("samples", n) or ("percent", p) from ``buffer_size``."""
    text = str(text).strip()
    try:
        if text.endswith("%"):
            p = float(text[:-1])
            if not 0.0 <= p <= 100.0:
                raise ValueError
            return "percent", p
        n = int(text)
        if n < 0:
            raise ValueError
        return "samples", n
    except ValueError:
        raise ValueError(
            f"continual.buffer_size must be a sample count >= 0 or a percentage like '2%', got {text!r}"
        ) from None


def count_samples(spec: Any) -> int:
    """Samples in local shards (distinct keys of each tar; nothing is decoded)."""
    total = 0
    for url in expand_spec(spec):
        if url.startswith("pipe:") or "://" in url:
            raise ValueError("continual.buffer_size as a percentage needs local shards; give a sample count")
        with tarfile.open(url) as tar:
            keys = {os.path.basename(m.name).split(".", 1)[0] for m in tar.getmembers() if m.isfile()}
            total += len(keys)
    return total


def buffer_capacity(cfg: ContinualConfig, train_spec: Any, world_size: int) -> int:
    """This rank's replay memory in samples (the run's total split evenly over ranks)."""
    kind, value = parse_buffer_size(cfg.buffer_size)
    total = value if kind == "samples" else int(round(value / 100.0 * count_samples(train_spec)))
    return total // world_size
