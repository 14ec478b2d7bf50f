"""``vlp train RECIPE [key=value ...]``: a run from a YAML recipe plus dotted overrides.

The whole config is checked first (``vlp.config.check_run``: value ranges, names, every input
path, a pretrained checkpoint's fit), before any process group, model or engine exists. A
config with ``continual.tasks`` trains class-incrementally (``vlp/continual.py``); otherwise
the plain ``Trainer`` (``vlp/train.py``). Prints the final metrics as one JSON line on rank 0.
"""
from __future__ import annotations

import argparse
import json

from vlp import dist
from vlp.config import Config, check_run, load_config
from vlp.continual import ContinualTrainer
from vlp.train import Trainer, run


def train(cfg: Config) -> dict:
    """Train ``cfg`` to the end (resuming from its run folder); the final metrics."""
    check_run(cfg)
    trainer = ContinualTrainer(cfg) if cfg.continual.tasks else Trainer(cfg)
    return run(trainer)


def _train(args) -> int:
    result = train(load_config(args.config, args.overrides))
    if dist.rank() == 0:
        print(json.dumps(result))
    return 0


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train from a YAML recipe plus dotted key=value overrides")
    p.add_argument("config", help="YAML recipe, e.g. configs/quickstart/clip_digits.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 engine.zero_stage=2")
    p.set_defaults(func=_train)
    return p
