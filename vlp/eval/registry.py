"""Evaluators as a registry: each has a settings dataclass and one entry point returning a dict.

    @EVALUATORS.register("zeroshot", ZeroshotSettings)
    def zeroshot(settings: ZeroshotSettings, ctx: EvalContext) -> Dict[str, Any]: ...

``EvalContext`` is what every evaluator may use: the model (in whatever mode the caller
left it; evaluators switch to eval mode and restore it), its tokenizer and eval image
transform, the run's data settings, the default eval data (``data.val`` in training,
``--data`` on the command line), the device, the batch size, the objective (``val_loss``)
and the zero-shot modality. A setting named ``data`` overrides the default eval data, and one
named ``split`` picks a split of a clip_benchmark dataset root (``vlp/data/clip_benchmark.py``).
The eval data is any layout ``eval_loader`` reads: shards, a clip_benchmark split folder, an
image folder.

Every rank evaluates (``ctx.rank`` of ``ctx.world_size``): ``ctx.loader(spec)`` reads this
rank's shards, so each sample is read by exactly one rank, and each evaluator combines the
ranks' counts or features with collectives (``vlp.dist``), so every rank returns the result a
single process gets on the whole data. Every rank runs the same evaluators in the same order.

The trainer runs the list ``eval.tasks`` every ``eval.every_steps`` and at the end
(``run_tasks``), prefixing each metric with the task's name; ``vlp eval NAME`` is
generated from this registry (``vlp/commands/eval.py``): one option per settings field.
The evaluators register from their modules, which ``vlp/eval/__init__.py`` imports;
``EVALUATORS`` is complete once ``vlp.eval`` is imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from vlp.data.clip_benchmark import eval_loader, resolve_split
from vlp.data.config import DataConfig
from vlp.objectives.base import Objective
from vlp.registry import Registry

# builder(settings, ctx: EvalContext) -> {metric: value}
EVALUATORS: Registry = Registry("evaluator")


@dataclass
class EvalContext:
    model: torch.nn.Module
    tokenizer: Callable
    transform: Optional[Callable]  # the eval image transform (None without an image tower)
    data_cfg: DataConfig  # keys, audio features, workers of the run
    data: Any = None  # the default eval data: a shard folder, pattern or list
    train_data: Any = None  # the run's training data (linear_probe fits on it by default)
    device: Any = "cpu"
    batch_size: int = 256
    progress: bool = False
    objective: Optional[Objective] = None  # the run's objective (val_loss)
    modality: Optional[str] = None  # what zero-shot and retrieval read: image | audio | None (the model's first)
    classnames: Optional[str] = None  # run-level defaults (eval.classnames / eval.templates)
    templates: Optional[str] = None
    rank: int = 0  # this process's share of the eval data (every rank evaluates, results are combined)
    world_size: int = 1

    def loader(self, spec: Any):
        """One ordered pass over this rank's share of ``spec`` (eval transform, ``batch_size``)."""
        return eval_loader(spec, self.data_cfg, self.transform, self.tokenizer, batch_size=self.batch_size,
                           rank=self.rank, world_size=self.world_size)

    def data_for(self, settings: Any) -> Any:
        """The settings' own ``data`` when given, else the context's; of a dataset root, the settings'
        ``split`` (default ``test``)."""
        data = getattr(settings, "data", None)
        data = self.data if data is None else data
        if not data:
            raise ValueError("no eval data: set data.val (training) or pass --data")
        return resolve_split(data, getattr(settings, "split", None))


def run_evaluator(spec: Mapping[str, Any], ctx: EvalContext) -> Dict[str, Any]:
    """The metrics of one evaluator spec (``{"name": ..., **settings}``)."""
    return EVALUATORS.build(spec, ctx)


def task_name(spec: Mapping[str, Any]) -> str:
    """The prefix of a task's metrics: ``as`` if given (two tasks of one evaluator), else its name."""
    return str(spec.get("as") or spec["name"])


def run_tasks(tasks: List[Mapping[str, Any]], ctx: EvalContext) -> Dict[str, Any]:
    """Every task of ``eval.tasks``; metrics as ``<task>_<metric>`` (numbers only: lists and examples
    stay out of the training log)."""
    results: Dict[str, Any] = {}
    for spec in tasks:
        spec = dict(spec)
        prefix = task_name(spec)
        spec.pop("as", None)
        for key, value in run_evaluator(spec, ctx).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                results[f"{prefix}_{key}"] = value
    return results
