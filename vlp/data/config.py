"""Settings of the data pipeline (the ``data:`` section of a run config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from vlp.data.audio import AudioConfig


@dataclass
class AugConfig:
    """open_clip's AugmentationCfg (open_clip_train --aug-cfg): the training image transform's augmentation."""

    scale: List[float] = field(default_factory=lambda: [0.9, 1.0])  # RandomResizedCrop area range
    ratio: Optional[List[float]] = None  # RandomResizedCrop aspect range; null: open_clip's (3/4, 4/3)
    color_jitter: Optional[Any] = None  # a number or [brightness, contrast, saturation(, hue)]; null: none
    color_jitter_prob: Optional[float] = None  # probability of the color jitter (with color_jitter)
    gray_scale_prob: Optional[float] = None  # probability of grayscale
    re_prob: Optional[float] = None  # random erasing probability (use_timm)
    re_count: Optional[int] = None  # random erasing count (use_timm)
    use_timm: bool = False  # timm's create_transform (RandAugment-style) instead of torchvision's


@dataclass
class DataConfig:
    # Shard specs: a brace pattern ("d/shard-{000000..000009}.tar"), a folder (all its
    # .tar files), a "pipe:" command, or a list of those (several sources).
    train: Any = "data/digits/train"
    val: Any = "data/digits/val"  # eval shards (same forms as train); null: no evaluation during training
    resampled: bool = False  # draw shards with replacement; an epoch is then data.epoch_samples samples
    epoch_samples: Optional[int] = None  # resampled: samples per epoch, all ranks; null: as many as the shards hold
    epochs: Optional[int] = None  # train for this many epochs instead of optim.steps (the schedule spans them)
    train_weights: Optional[List[float]] = None  # per-source mixing weights, resampled mode
    batch_size: int = 64  # per rank
    workers: int = 2  # DataLoader workers per rank (at most train shards / ranks in one-pass mode)
    persistent_workers: bool = True  # keep training workers alive across epochs (no fork per epoch)
    worker_niceness: int = 10  # workers' CPU priority below the trainer's (os.nice; 0: same priority)
    shuffle_buffer: int = 1000  # samples; 0 disables
    image_key: Optional[str] = "png;jpg;jpeg;webp"  # null: no image (an audio-text model)
    audio_key: Optional[str] = None  # e.g. "flac;wav": samples carry audio (vlp/data/audio.py)
    audio: AudioConfig = field(default_factory=AudioConfig)  # decode / log-mel / SpecAugment settings
    text_key: str = "txt"  # caption field(s) of a sample, ";"-separated alternatives
    label_key: str = "cls"  # integer class label field; a sample without one gets -1
    # `vlp cluster` output (DIR or DIR/assignments.jsonl): train samples get cluster_ids (l,) and
    # cluster_sims (l,) by __key__ (MLCD); a sample missing from it is skipped and counted
    cluster_labels: Optional[str] = None
    aug: AugConfig = field(default_factory=AugConfig)  # training image augmentation (open_clip's AugmentationCfg)
