"""Linear probe and kNN accuracy of frozen image features.

``vlp eval linear-probe --checkpoint RUN_DIR --train DIR/train --val DIR/val [--json]``

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
import json
import sys
from typing import Any, Dict, Tuple

import numpy as np
import torch

PROBE_KEYS = ("linear_top1", "knn_top1")


@torch.no_grad()
def extract_features(model, loader, device, progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, labels (N,)) of the labelled samples in ``loader``."""
    from tqdm import tqdm

    from vlp.eval.zeroshot import eval_mode, image_dtype

    feats, labels = [], []
    with eval_mode(model):
        for batch in tqdm(loader, desc="features", unit="batch", disable=not progress):
            keep = batch["label"] >= 0
            if not keep.any():
                continue
            x = model.encode_image(batch["image"][keep].to(device, image_dtype(model)), normalize=True)  # (b, D)
            feats.append(x.float().cpu().numpy())
            labels.append(batch["label"][keep].numpy())
    if not feats:
        raise ValueError("no labelled samples (a linear probe needs a class label per sample: data.label_key)")
    return np.concatenate(feats), np.concatenate(labels)


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
                     batch_size: int = 256, c: float = 1.0, knn_k: int = 20, progress: bool = False) -> Dict[str, Any]:
    """linear_top1, knn_top1, num_train, num_val, feature_dim of ``model``'s image features."""
    from vlp.data.stream import build_eval_loader

    if c <= 0 or knn_k < 1:
        raise ValueError(f"need --C > 0 and --knn-k >= 1, got {c}, {knn_k}")
    data_cfg = dataclasses.replace(data_cfg, cluster_labels=None)
    no_text = lambda texts: torch.zeros(1, 1, dtype=torch.long)  # noqa: E731  captions are not used

    def features(spec):
        loader = build_eval_loader(spec, data_cfg, eval_transform, no_text, batch_size=batch_size)
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


def add_probe_parser(tasks) -> None:
    p = tasks.add_parser("linear-probe", help="logistic regression and kNN accuracy on frozen image features")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="RUN_DIR (its latest checkpoint), a tag dir or a model.safetensors")
    src.add_argument("--config", help="a recipe YAML: its model at random init (run.seed)")
    p.add_argument("--train", required=True, help="labelled shards the probe is fitted on")
    p.add_argument("--val", required=True, help="labelled shards the accuracy is measured on")
    p.add_argument("--C", type=float, default=1.0, dest="c", help="inverse L2 strength of the logistic regression")
    p.add_argument("--knn-k", type=int, default=20, help="neighbours of the kNN classifier (default 20)")
    p.add_argument("--batch-size", type=int, default=256, help="feature extraction batch size")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a readable line")
    p.set_defaults(func=_linear_probe)


def _linear_probe(args) -> int:
    from vlp.cluster import load_image_model

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, transform, data_cfg = load_image_model(args.checkpoint, None, args.config)
    metrics = run_linear_probe(model.to(device), transform, data_cfg, args.train, args.val, device, args.batch_size,
                               args.c, args.knn_k, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(metrics))
    else:
        values = "  ".join(f"{k} {metrics[k]:.4f}" for k in PROBE_KEYS)
        print(f"linear-probe on {args.val}: {values}  (train n={metrics['num_train']}, val n={metrics['num_val']})")
    return 0
