"""Multimodal classification accuracy of a model's classifier heads.

Every ``logits_<name>`` output of the model (the heads of ``vlp/models/classifier.py``:
``logits_image``, ``logits_text``, ``logits_fusion``) is scored against the sample's
label on image+text batches: ``<name>_accuracy`` (top-1) and ``<name>_mean_per_class_recall``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable

import torch
from tqdm import tqdm

from vlp import dist
from vlp.engine.step import model_inputs
from vlp.eval.common import eval_mode, image_dtype
from vlp.eval.registry import EVALUATORS, EvalContext

PREFIX = "logits_"
COCONUT_LOGITS = "class_logits"  # the coconut_classifier head's output, reported as "class"


def _combine(parts):
    """The sum of the ranks' (hits per head, samples per class) counts; (empty, None) if none counted."""
    hits: Dict[str, torch.Tensor] = {}
    total = None
    for part_hits, part_total in parts:
        if part_total is None:
            continue
        total = part_total if total is None else total + part_total
        for name, h in part_hits.items():
            hits[name] = hits[name] + h if name in hits else h
    return hits, total


def _head_name(output: str) -> str:
    return "class" if output == COCONUT_LOGITS else output[len(PREFIX):]


def evaluate_classify(model, loader: Iterable[Dict[str, Any]], device: Any = "cpu",
                      progress: bool = False) -> Dict[str, Any]:
    """{name}_accuracy and {name}_mean_per_class_recall per head, num_samples; label -1 is ignored."""
    hits: Dict[str, torch.Tensor] = {}  # name -> (C,) correct per class
    total = None  # (C,) samples per class
    with eval_mode(model):
        for batch in tqdm(loader, desc="classify", unit="batch", disable=not progress):
            labels = batch["label"]  # (B,) on the CPU
            keep = labels >= 0
            if not keep.any():
                continue
            inputs = model_inputs({k: v[keep] for k, v in batch.items() if k in ("image", "text", "audio")}, device)
            if "image" in inputs:
                inputs["image"] = inputs["image"].to(image_dtype(model))
            out = model(inputs)
            logits = {_head_name(k): v for k, v in out.items() if k.startswith(PREFIX) or k == COCONUT_LOGITS}
            if not logits:
                raise ValueError("the model has no classifier heads (no logits_* outputs); train with model.heads "
                                 "of classifier/fusion_classifier (configs/quickstart/m3col_digits.yaml)")
            num_classes = next(iter(logits.values())).shape[1]
            y = labels[keep]
            if int(y.max()) >= num_classes:
                raise ValueError(f"label {int(y.max())} out of range for heads with {num_classes} classes")
            total = (0 if total is None else total) + torch.bincount(y, minlength=num_classes)
            for name, z in logits.items():
                right = y[z.argmax(1).cpu() == y]
                hits[name] = hits.get(name, 0) + torch.bincount(right, minlength=num_classes)
    hits, total = _combine(dist.all_gather_object((hits, total)))  # every rank counted its own shards
    if total is None:
        raise ValueError("no labelled samples in the eval data (classification needs a label per sample)")
    n, present = int(total.sum()), total > 0
    metrics: Dict[str, Any] = {}
    for name, h in sorted(hits.items()):
        metrics[f"{name}_accuracy"] = int(h.sum()) / n
        metrics[f"{name}_mean_per_class_recall"] = float((h[present].double() / total[present]).mean())
    metrics["num_samples"] = n
    return metrics


@dataclass
class ClassifySettings:
    data: Any = None  # shards; default: the run's data.val (training) or --data


@EVALUATORS.register("classify", ClassifySettings)
def run_classify(settings: ClassifySettings, ctx: EvalContext) -> Dict[str, Any]:
    """Accuracy of every classifier head of the model on the eval data."""
    loader = ctx.loader(ctx.data_for(settings))
    return evaluate_classify(ctx.model, loader, ctx.device, progress=ctx.progress)
