"""Class-incremental evaluation of a continual run (``vlp eval continual``).

The run writes the model at the end of each task to ``RUN_DIR/tasks/task_{t:03d}/``
(``vlp/continual.py``, ``vlp/runs.py``). This evaluator reads a run folder, not one model,
so it is the command ``vlp eval continual`` and not an ``eval.tasks`` entry. Each snapshot t
classifies the held-out samples of the classes seen so far (tasks 0..t), choosing among
those classes only, two ways:

- ``zeroshot``: class-name prompts through the text tower (as ``vlp eval zeroshot``);
- ``classifier``: the ``coconut_classifier`` head's logits, when the model has one.

Per way (T' = finished tasks, A[t][j] = accuracy of snapshot t on task j's classes):

    accuracy            (T',) accuracy of snapshot t on every class seen by then
    task_accuracy       A[t][j] for j <= t
    average_accuracy    mean of ``accuracy`` (average incremental accuracy)
    final_accuracy      accuracy[-1]
    forgetting          (T'-1,) per task j: max_{j <= t < T'-1} A[t][j] - A[T'-1][j]
    average_forgetting  mean of ``forgetting``
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from vlp.data.clip_benchmark import eval_loader, resolve_split
from vlp.eval.common import eval_mode, image_dtype
from vlp.eval.zeroshot import read_classnames_templates, zeroshot_classifier

METRICS = ("zeroshot", "classifier")


def _features(model, loader, modality: str, classes: set, device, progress: bool):
    """(features (n, D), class_logits (n, C) or None, labels (n,)) of the samples of ``classes``."""
    feats, logits, labels = [], [], []
    with eval_mode(model):
        for batch in tqdm(loader, desc="continual eval", unit="batch", disable=not progress, leave=False):
            keep = torch.tensor([int(c) in classes for c in batch["label"].tolist()], dtype=torch.bool)
            if not keep.any():
                continue
            x = batch[modality][keep].to(device, image_dtype(model))
            out = model({modality: x})
            feats.append(out[modality].float().cpu())  # (b, D) unit-norm
            if "class_logits" in out:
                logits.append(out["class_logits"].float().cpu())  # (b, C)
            labels.append(batch["label"][keep])
    if not labels:
        raise ValueError("the eval data has no sample of the continual run's classes")
    return torch.cat(feats), (torch.cat(logits) if logits else None), torch.cat(labels)


def _predict(logits: torch.Tensor, seen: Sequence[int]) -> torch.Tensor:
    """(n,) argmax over the seen classes only (class-incremental)."""
    allowed = torch.zeros(logits.shape[1], dtype=torch.bool)
    allowed[list(seen)] = True
    return logits.masked_fill(~allowed, float("-inf")).argmax(-1)


def summarize(task_accuracy: List[List[float]], accuracy: List[float]) -> Dict[str, Any]:
    """Average accuracy and forgetting from A[t][j] (j <= t) and the seen-class accuracies."""
    last = len(task_accuracy) - 1
    forgetting = [max(task_accuracy[t][j] for t in range(j, last)) - task_accuracy[last][j] for j in range(last)]
    return {
        "accuracy": accuracy,
        "task_accuracy": task_accuracy,
        "average_accuracy": sum(accuracy) / len(accuracy),
        "final_accuracy": accuracy[-1],
        "forgetting": forgetting,
        "average_forgetting": sum(forgetting) / len(forgetting) if forgetting else 0.0,
    }


def _accuracies(pred: torch.Tensor, labels: torch.Tensor, tasks, t: int):
    """(accuracy on all seen classes, [A[t][j] for j <= t]) of snapshot t's predictions."""
    def acc(classes) -> float:
        mask = torch.isin(labels, torch.tensor(classes))
        if not mask.any():
            raise ValueError(f"the eval data has no sample of classes {classes}")
        return float((pred[mask] == labels[mask]).double().mean())

    seen = [c for task in tasks[: t + 1] for c in task]
    return acc(seen), [acc(tasks[j]) for j in range(t + 1)]


def run_continual_eval(
    meta: Dict[str, Any],
    load: Callable[[int], Tuple[Any, Any, Any, Any]],
    data_spec: Any = None,
    classnames: Optional[str] = None,
    templates: Optional[str] = None,
    batch_size: Optional[int] = None,
    device: Any = "cpu",
    progress: bool = False,
) -> Dict[str, Any]:
    """Metrics (module docstring) of every finished task of a continual run: ``meta`` is its
    ``tasks.json`` (``vlp.runs.read_tasks``), ``load(t)`` gives (cfg, model, tokenizer,
    eval_transform) of its snapshot at the end of task t."""
    tasks, done, modality = meta["tasks"], meta["done"], meta.get("modality", "image")
    classes = {c for task in tasks for c in task}
    raw: Dict[str, List] = {m: [[], []] for m in METRICS}  # metric -> [seen accuracies, A rows]
    n = 0
    for t in tqdm(range(done), desc="tasks", unit="task", disable=not progress):
        cfg, model, tokenizer, eval_transform = load(t)
        data = resolve_split(data_spec if data_spec is not None else cfg.data.val)  # a dataset root: its test
        names, prompts = read_classnames_templates(
            data, classnames if classnames is not None else cfg.eval.classnames,
            templates if templates is not None else cfg.eval.templates,
        )
        if max(classes) >= len(names):
            raise ValueError(f"the run's tasks use class {max(classes)} but there are {len(names)} class names")
        loader = eval_loader(data, cfg.data, eval_transform, tokenizer, batch_size or cfg.eval.batch_size)
        feats, head_logits, labels = _features(model, loader, modality, classes, device, progress)
        n = len(labels)
        logits = {"zeroshot": feats @ zeroshot_classifier(model, tokenizer, names, prompts, device).float().cpu()}
        if head_logits is not None:
            logits["classifier"] = head_logits
        seen = [c for task in tasks[: t + 1] for c in task]
        for metric, value in logits.items():
            accuracy, row = _accuracies(_predict(value, seen), labels, tasks, t)
            raw[metric][0].append(accuracy)
            raw[metric][1].append(row)
    result: Dict[str, Any] = {"tasks": tasks, "tasks_done": done, "num_samples": n}
    for metric, (accuracy, rows) in raw.items():
        if len(accuracy) == done and done:
            result[metric] = summarize(rows, accuracy)
    return result
