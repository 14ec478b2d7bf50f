"""Linear probe and kNN accuracy of frozen image features.

``vlp eval linear-probe --checkpoint RUN_DIR --train DIR/train --val DIR/val [--json]``, or
``{name: linear_probe, train: DIR/train}`` in ``eval.tasks``. The data may be shards, image
folders (``vlp/data/folders.py``) or clip_benchmark dataset roots: ``--train ROOT --val ROOT``
fits on ``ROOT/train`` (``--train-split``) and scores ``ROOT/test`` (``--split``).

Features: the image tower's unit-norm embedding (``encode_image``) of every sample
(eval transform, no augmentation). Linear probe: scikit-learn's ``LogisticRegression``
(lbfgs, multinomial) on standardised features, fitted on --train, accuracy on --val.
kNN: cosine similarity, majority vote of the k nearest train samples (scikit-learn's
``KNeighborsClassifier``). ``--config RECIPE`` probes the recipe's model at random init
(``run.seed``: the weights a run of that recipe starts from).

Shapes: N samples, D embedding dim.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from vlp import dist
from vlp.data.clip_benchmark import eval_loader, is_dataset_root, resolve_split
from vlp.data.folders import folder_classes, is_image_folder
from vlp.eval.common import eval_mode, image_dtype
from vlp.eval.registry import EVALUATORS, EvalContext

PROBE_KEYS = ("linear_top1", "knn_top1")


@torch.no_grad()
def extract_features(model, loader, device, progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, labels (N,)) of the labelled samples in ``loader``, ordered by
    sample key: over several ranks, every rank's samples on every rank, in the order one process
    would give (the fitted probe does not depend on how the shards were split)."""
    feats, labels, keys = [], [], []
    with eval_mode(model):
        for batch in tqdm(loader, desc="features", unit="batch", disable=not progress):
            keep = batch["label"] >= 0
            if not keep.any():
                continue
            x = model.encode_image(batch["image"][keep].to(device, image_dtype(model)), normalize=True)  # (b, D)
            feats.append(x.float().cpu().numpy())
            labels.append(batch["label"][keep].numpy())
            keys += [k for k, kept in zip(batch["key"], keep.tolist()) if kept]
    parts = dist.all_gather_object((feats, labels, keys))
    feats, labels, keys = ([x for p in parts for x in p[i]] for i in range(3))
    if not feats:
        raise ValueError("no labelled samples (a linear probe needs a class label per sample: data.label_key)")
    order = np.argsort(np.array(keys), kind="stable")
    return np.concatenate(feats)[order], np.concatenate(labels)[order]


def linear_probe_accuracy(train_x, train_y, val_x, val_y, c: float = 1.0, max_iter: int = 2000) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    clf.fit(train_x, train_y)
    return float(clf.score(val_x, val_y))


def knn_accuracy(train_x, train_y, val_x, val_y, k: int = 20) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=min(k, len(train_x)), metric="cosine")
    knn.fit(train_x, train_y)
    return float(knn.score(val_x, val_y))


def run_linear_probe(model, eval_transform, data_cfg, train_spec: Any, val_spec: Any, device: Any = "cpu",
                     batch_size: int = 256, c: float = 1.0, knn_k: int = 20, progress: bool = False,
                     rank: int = 0, world_size: int = 1) -> Dict[str, Any]:
    """linear_top1, knn_top1, num_train, num_val, feature_dim of ``model``'s image features."""
    if c <= 0 or knn_k < 1:
        raise ValueError(f"need --C > 0 and --knn-k >= 1, got {c}, {knn_k}")
    data_cfg = dataclasses.replace(data_cfg, cluster_labels=None)
    no_text = lambda texts: torch.zeros(1, 1, dtype=torch.long)  # noqa: E731  captions are not used

    def features(spec):
        loader = eval_loader(spec, data_cfg, eval_transform, no_text, batch_size=batch_size, rank=rank,
                             world_size=world_size)
        return extract_features(model, loader, device, progress)

    train_x, train_y = features(train_spec)
    val_x, val_y = features(val_spec)
    return {
        "linear_top1": linear_probe_accuracy(train_x, train_y, val_x, val_y, c),
        "knn_top1": knn_accuracy(train_x, train_y, val_x, val_y, knn_k),
        "knn_k": min(knn_k, len(train_x)),
        "num_train": int(len(train_y)),
        "num_val": int(len(val_y)),
        "feature_dim": int(train_x.shape[1]),
    }


@dataclass
class LinearProbeSettings:
    train: Any = None  # labelled data (shards, image folder, dataset root) the probe is fitted on; default data.train
    val: Any = None  # labelled data the accuracy is measured on; default: the eval data (data.val / --data)
    split: Optional[str] = None  # the split of a clip_benchmark dataset root given as val (default: test)
    train_split: str = "train"  # the split of a clip_benchmark dataset root given as train
    c: float = field(default=1.0, metadata={"flags": ["--C"]})  # inverse L2 strength of the logistic regression
    knn_k: int = 20  # neighbours of the kNN classifier


@EVALUATORS.register("linear_probe", LinearProbeSettings)
def linear_probe(settings: LinearProbeSettings, ctx: EvalContext) -> Dict[str, Any]:
    """linear_top1, knn_top1 (module docstring) of the model's image features."""
    train = settings.train if settings.train is not None else ctx.train_data
    if not train:
        raise ValueError("linear_probe needs train: the labelled shards the probe is fitted on (--train)")
    val = resolve_split(settings.val, settings.split) if settings.val is not None else ctx.data_for(settings)
    train = resolve_split(train, settings.train_split) if is_dataset_root(train) else train
    if is_image_folder(train) and is_image_folder(val) and folder_classes(train) != folder_classes(val):
        raise ValueError(f"the image folders {train} and {val} have different class folders (labels would differ)")
    return run_linear_probe(ctx.model, ctx.transform, ctx.data_cfg, train, val, ctx.device,
                            ctx.batch_size, settings.c, settings.knn_k, progress=ctx.progress,
                            rank=ctx.rank, world_size=ctx.world_size)
