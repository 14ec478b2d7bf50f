"""The run config: component dataclasses composed, YAML recipes plus dotted overrides.

``load_config("configs/quickstart/clip_digits.yaml", ["optim.lr=1e-3", "engine.zero_stage=2"])``
validates every key and type against the dataclasses (OmegaConf structured configs)
and raises ``ValueError`` with a one-line message naming the bad key and the valid ones.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from vlp.continual.config import ContinualConfig, validate_continual
from vlp.data.config import DataConfig
from vlp.engine.config import EngineConfig
from vlp.engine.optim import OptimConfig
from vlp.models.factory import ModelConfig


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    checkpoint_every: int = 100  # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 2  # newest complete checkpoints kept
    resume: bool = True  # continue from RUN_DIR/checkpoints/latest when present
    max_skipped_steps: int = 10  # consecutive non-finite-loss steps before the run stops


@dataclass
class EvalConfig:
    every_steps: int = 0  # periodic zero-shot eval; 0 = only at the end
    zeroshot: bool = True
    retrieval: bool = False
    classnames: Optional[str] = None  # default: classnames.txt beside or above data.val
    templates: Optional[str] = None  # default: zeroshot_classification_templates.txt there
    batch_size: int = 256
    modality: Optional[str] = None  # what zero-shot classifies: image | audio; null: image if the model has it


@dataclass
class LoggingConfig:
    every_steps: int = 10
    tensorboard: bool = True
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: Dict[str, Any] = field(default_factory=lambda: {"name": "infonce"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)  # class-incremental; off without tasks


def _valid_keys(schema, dotted: str) -> List[str]:
    node = schema
    for part in dotted.split(".")[:-1]:
        if not OmegaConf.is_dict(node) or part not in node:
            break
        node = node[part]
    return sorted(node.keys()) if OmegaConf.is_dict(node) else []


def _explain(e: OmegaConfBaseException, schema) -> ValueError:
    key = getattr(e, "full_key", None) or ""
    if isinstance(e, ConfigKeyError):
        valid = _valid_keys(schema, key)
        return ValueError(f"unknown config key {key!r}; valid keys here: {', '.join(valid)}")
    msg = str(e).splitlines()[0]
    return ValueError(f"bad config value for {key!r}: {msg}" if key else f"bad config: {msg}")


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if path is not None:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"config file not found: {path}")
            layers.append(OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not key=value")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _explain(e, schema) from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that span sections or that the dataclasses cannot express."""
    from vlp.models.towers import IMAGE_TOWERS, TEXT_TOWERS
    from vlp.objectives import OBJECTIVES

    if cfg.model.image is not None:
        IMAGE_TOWERS.settings(cfg.model.image)
    TEXT_TOWERS.settings(cfg.model.text)
    OBJECTIVES.settings(cfg.objective)
    validate_continual(cfg.continual)
    _check_modalities(cfg)
    if cfg.engine.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"engine.zero_stage must be 0, 1, 2 or 3, got {cfg.engine.zero_stage}")
    if cfg.engine.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"engine.precision must be fp32, bf16 or fp16, got {cfg.engine.precision!r}")
    if cfg.optim.steps < 1:
        raise ValueError(f"optim.steps must be >= 1, got {cfg.optim.steps}")
    chunk = cfg.engine.grad_cache.chunk_size
    if chunk < 0 or (chunk and cfg.data.batch_size % chunk):
        raise ValueError(
            f"engine.grad_cache.chunk_size ({chunk}) must be 0 or divide data.batch_size ({cfg.data.batch_size})"
        )


def _check_modalities(cfg: Config) -> None:
    """The data carries exactly the inputs the model has towers for; audio shapes agree."""
    from vlp.models.audio import AUDIO_TOWERS
    from vlp.objectives import OBJECTIVES
    from vlp.objectives.contrastive import modality_pairs

    model, data = cfg.model, cfg.data
    has_image, has_audio = model.open_clip is not None or model.image is not None, model.audio is not None
    if not (has_image or has_audio):
        raise ValueError("the model needs an image or an audio tower: set model.image or model.audio")
    if has_image != bool(data.image_key):
        raise ValueError("model.image is null (no image tower): set data.image_key: null" if not has_image else
                         "the model has an image tower but data.image_key is null: set it (e.g. png;jpg)")
    if has_audio != bool(data.audio_key):
        raise ValueError("model.audio is set: set data.audio_key (e.g. flac;wav)" if has_audio else
                         "data.audio_key is set but the model has no audio tower: set model.audio or data.audio_key: null")
    if has_audio:
        data.audio.check()
        tower = AUDIO_TOWERS.settings(model.audio)
        if (tower.n_mels, tower.frames) != (data.audio.n_mels, data.audio.frames):
            raise ValueError(
                f"model.audio takes (n_mels, frames) = ({tower.n_mels}, {tower.frames}) but data.audio makes "
                f"({data.audio.n_mels}, {data.audio.frames}): set model.audio.n_mels={data.audio.n_mels} "
                f"model.audio.frames={data.audio.frames}"
            )
    have = {"text"} | ({"image"} if has_image else set()) | ({"audio"} if has_audio else set())
    settings = OBJECTIVES.settings(cfg.objective)
    if getattr(settings, "modalities", None) is not None:  # contrastive pairs (vlp/objectives/contrastive.py)
        missing = sorted({m for pair in modality_pairs(settings.modalities) for m in pair} - have)
        if missing:
            raise ValueError(f"objective.modalities names {', '.join(missing)} but the model has no such tower "
                             f"(it has {', '.join(sorted(have))})")
    elif has_audio or not has_image:  # an objective with fixed inputs (most read image and text)
        reads = set(OBJECTIVES.build(cfg.objective).rep_keys) & {"image", "text", "audio"}
        if reads - have:
            raise ValueError(f"objective {cfg.objective['name']!r} reads {', '.join(sorted(reads - have))} features "
                             f"but the model has no such tower (it has {', '.join(sorted(have))})")
    if cfg.eval.modality not in (None, "image", "audio") or (cfg.eval.modality == "image" and not has_image) or (
        cfg.eval.modality == "audio" and not has_audio
    ):
        raise ValueError(f"eval.modality must be null or a tower the model has (image, audio), got {cfg.eval.modality!r}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(to_yaml(cfg))
    os.replace(tmp, path)


def as_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)
