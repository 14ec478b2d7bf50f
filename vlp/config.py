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

    IMAGE_TOWERS.settings(cfg.model.image)
    TEXT_TOWERS.settings(cfg.model.text)
    OBJECTIVES.settings(cfg.objective)
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


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(to_yaml(cfg))
    os.replace(tmp, path)


def as_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)
