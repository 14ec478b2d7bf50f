"""Settings of evaluation during training (the ``eval:`` section of a run config).

    eval:
      every_steps: 100            # 0: only at the end of training
      tasks:                      # evaluators by name (vlp/eval/registry.py), each with its settings
        - {name: zeroshot}
        - {name: retrieval}
        - {name: linear_probe, train: data/digits/train}
        - {name: val_loss}

Metrics are logged as ``<name>_<metric>`` (``zeroshot_top1``); ``as: NAME`` renames a task
(two zero-shot sets). ``zeroshot`` / ``retrieval`` are shorthands kept from before ``tasks``
existed: without ``tasks`` the list is zero-shot (unless ``zeroshot: false``) plus retrieval
(if ``retrieval: true``); with ``tasks``, ``false`` removes that evaluator from the list and
``true`` adds it when absent (so ``eval.zeroshot=false`` works on any recipe).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional


@dataclass
class EvalConfig:
    every_steps: int = 0  # periodic eval; 0 = only at the end
    tasks: Optional[List[Dict[str, Any]]] = None  # evaluator specs; null: from the shorthands below
    zeroshot: Optional[bool] = None  # shorthand: false drops zeroshot from tasks, true adds it; null: no change
    retrieval: Optional[bool] = None  # shorthand: true adds retrieval to tasks, false drops it; null: no change
    classnames: Optional[str] = None  # default: classnames.txt beside or above data.val
    templates: Optional[str] = None  # default: zeroshot_classification_templates.txt there
    batch_size: int = 256  # eval batch size (val_loss: also the contrastive batch)
    modality: Optional[str] = None  # what zero-shot classifies: image | audio; null: image if the model has it


def resolve_tasks(cfg: EvalConfig) -> List[Dict[str, Any]]:
    """``cfg.tasks`` with the shorthands applied (module docstring)."""
    if cfg.tasks is None:
        tasks = [] if cfg.zeroshot is False else [{"name": "zeroshot"}]
        return tasks + ([{"name": "retrieval"}] if cfg.retrieval else [])
    tasks = [dict(spec) for spec in cfg.tasks]
    for name, on in (("zeroshot", cfg.zeroshot), ("retrieval", cfg.retrieval)):
        if on is False:
            tasks = [spec for spec in tasks if spec.get("name") != name]
        elif on and not any(spec.get("name") == name for spec in tasks):
            tasks.append({"name": name})
    return tasks
