"""Settings of the data pipeline (the ``data:`` section of a run config)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional


@dataclass
class DataConfig:
    # Shard specs: a brace pattern ("d/shard-{000000..000009}.tar"), a folder (all its
    # .tar files), a "pipe:" command, or a list of those (several sources).
    train: Any = "data/digits/train"
    val: Any = "data/digits/val"
    resampled: bool = False  # sample shards with replacement (infinite stream)
    train_weights: Optional[List[float]] = None  # per-source mixing weights, resampled mode
    batch_size: int = 64  # per rank
    workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 1000  # samples; 0 disables
    image_key: str = "png;jpg;jpeg;webp"
    text_key: str = "txt"
    label_key: str = "cls"
