"""``vlp cluster``: embed images, spherical k-means, write the MLCD centers and labels.

    vlp cluster --checkpoint RUN_DIR | --open-clip NAME[:PRETRAINED] | --config RECIPE.yaml \\
                --data SHARDS --k N --out DIR [--positives l]

1. Embed: the image tower's unit-norm features of every sample (batched, progress bar).
   Under a launcher (torchrun ...) each rank embeds its share of the shards and rank 0
   gathers them. ``--config`` embeds with the recipe's model at its random initialisation
   (``run.seed``: the same weights a run of that recipe starts from).
2. Spherical k-means (``spherical_kmeans``): k-means++ seeds (scikit-learn's
   ``kmeans_plusplus`` on a sample), then Lloyd iterations with cosine similarity and
   re-normalised centers. Assignment runs over chunks of ``--chunk-size`` rows, so no N×K
   matrix larger than chunk×K exists; the inertia Σ(1 - cos) is reported per iteration.
   ``--backend faiss``: the same seeds, then faiss's spherical k-means (``faiss_spherical_kmeans``,
   faiss-cpu as the optional extra ``vlp[faiss]``).
3. Write ``DIR/centers.safetensors`` ((K, D) under "centers", the ``mlcd_cluster`` head's
   ``centers``), ``DIR/assignments.jsonl`` (one line per sample: ``{"key", "ids", "sims"}``,
   its l nearest centers, nearest first) and ``DIR/cluster.json`` (settings, inertia per
   iteration). ``data.cluster_labels: DIR`` joins the assignments onto the training stream by
   sample key (``cluster_ids`` (l,) long, ``cluster_sims`` (l,) float).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from tqdm import tqdm

from vlp import dist
from vlp.config import check_shards
from vlp.data.clusters import assign_nearest, faiss_spherical_kmeans, spherical_kmeans, write_outputs
from vlp.data.stream import build_loader
from vlp.eval.common import image_dtype
from vlp.runs import load_image_model


# ------------------------------------------------------------------ embedding
@torch.no_grad()
def embed(model, loader, device, progress: bool = False) -> Tuple[torch.Tensor, List[str]]:
    """(unit-norm image features (n, D) float32 on the CPU, sample keys) over ``loader``."""
    feats, keys = [], []
    model.eval()
    for batch in tqdm(loader, desc="embed", unit="batch", disable=not progress):
        x = model.encode_image(batch["image"].to(device, image_dtype(model)), normalize=True)  # (B, D)
        feats.append(x.float().cpu())
        keys.extend(batch["key"])
    if not feats:
        raise ValueError("no samples to embed in --data")
    return torch.cat(feats), keys


def _gather_to_rank0(feats: torch.Tensor, keys: List[str]):
    """Rank 0 gets every rank's (features, keys), concatenated in rank order; others get None."""
    if dist.world_size() == 1:
        return feats, keys
    parts = [None] * dist.world_size() if dist.rank() == 0 else None
    tdist.gather_object((feats, keys), parts, dst=0)  # gloo/nccl: pickled, sizes may differ per rank
    if dist.rank() != 0:
        return None
    return torch.cat([p[0] for p in parts]), [k for p in parts for k in p[1]]


# ------------------------------------------------------------------ the command
def run_cluster(args) -> Optional[Dict]:
    if args.k < 1 or args.positives < 1 or args.positives > args.k:
        raise ValueError(f"need --k >= 1 and 1 <= --positives <= --k, got --k {args.k} --positives {args.positives}")
    for name, low in (("batch_size", 1), ("chunk_size", 1), ("iters", 1), ("workers", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    check_shards("--data", args.data)  # missing, empty or non-tar shards: before the model is loaded
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file, not a folder")
    info = dist.init_distributed() if dist.env_info().world_size > 1 else dist.DistInfo()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, transform, data_cfg = load_image_model(args.checkpoint, args.open_clip, args.config)
    model.to(device)
    data_cfg = dataclasses.replace(data_cfg, batch_size=args.batch_size, workers=args.workers, cluster_labels=None)
    no_text = lambda texts: torch.zeros(1, 1, dtype=torch.long)  # noqa: E731  captions are not embedded
    loader = build_loader(args.data, data_cfg, image_transform=transform, tokenizer=no_text,
                          rank=info.rank, world_size=info.world_size, train=False)
    progress = info.is_main and sys.stderr.isatty()
    gathered = _gather_to_rank0(*embed(model, loader, device, progress))
    summary = None
    if gathered is not None:
        feats, keys = gathered  # (N, D)
        report = lambda i, v: print(f"[vlp cluster] iter {i}: inertia {v:.6f}", file=sys.stderr)  # noqa: E731
        if args.backend == "faiss":
            result = faiss_spherical_kmeans(feats, args.k, args.iters, args.seed, report=report)
        else:
            result = spherical_kmeans(feats, args.k, args.iters, args.chunk_size, args.seed, device,
                                      progress=progress, report=report)
        centers = result.centers.to(device)
        sims, ids = assign_nearest(F.normalize(feats, dim=-1), centers, args.chunk_size, args.positives)
        summary = {"k": args.k, "positives": args.positives, "num_samples": len(keys), "dim": feats.shape[1],
                   "source": args.checkpoint or args.open_clip or args.config, "data": args.data,
                   "iterations": len(result.inertia), "seed": args.seed, "backend": args.backend}
        write_outputs(args.out, result, keys, ids, sims, summary)
    dist.barrier()
    if info.world_size > 1:
        dist.shutdown()
    return summary


def add_cluster_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("cluster", help="spherical k-means of image embeddings: MLCD centers and labels")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="RUN_DIR (its latest checkpoint), a tag dir or a model.safetensors")
    src.add_argument("--open-clip", help="an open_clip model NAME[:PRETRAINED] (pretrained weights must be cached)")
    src.add_argument("--config", help="a recipe YAML: its model at random init (run.seed)")
    p.add_argument("--data", required=True, help="shard folder, brace pattern or list of those")
    p.add_argument("--k", type=int, required=True, help="number of centers K")
    p.add_argument("--out", required=True, help="output folder (centers.safetensors, assignments.jsonl, cluster.json)")
    p.add_argument("--positives", type=int, default=1, help="l: nearest centers kept per sample (default 1)")
    p.add_argument("--iters", type=int, default=20, help="max Lloyd iterations (stops early on no change)")
    p.add_argument("--chunk-size", type=int, default=65536, help="rows per assignment chunk (memory: chunk x K)")
    p.add_argument("--batch-size", type=int, default=256, help="embedding batch size")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--seed", type=int, default=0, help="k-means++ seed")
    p.add_argument("--backend", choices=("torch", "faiss"), default="torch",
                   help="Lloyd iterations on torch (default, chunked) or faiss (pip install 'vlp[faiss]')")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(func=_cluster)
    return p


def _cluster(args) -> int:
    summary = run_cluster(args)
    if summary is not None:
        print(json.dumps({**summary, "out": args.out}))
    return 0
