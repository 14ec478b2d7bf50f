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
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

CENTERS_FILE = "centers.safetensors"
ASSIGNMENTS_FILE = "assignments.jsonl"
SUMMARY_FILE = "cluster.json"


# ------------------------------------------------------------------ spherical k-means
@dataclass
class KMeansResult:
    centers: torch.Tensor  # (K, D) unit rows
    labels: torch.Tensor  # (N,) nearest center
    inertia: List[float] = field(default_factory=list)  # Σ_i (1 - cos(x_i, c_label)) per iteration
    empty: int = 0  # clusters left empty by the last iteration (they keep their previous center)


def _assign(x: torch.Tensor, centers: torch.Tensor, chunk_size: int, topk: int = 1):
    """(sims, ids), each (N, topk): the nearest centers of each row, chunk by chunk."""
    sims, ids = [], []
    for i in range(0, x.shape[0], chunk_size):
        s, j = (x[i : i + chunk_size].to(centers.device) @ centers.T).topk(topk, dim=1)  # (chunk, K) at most
        sims.append(s.cpu())
        ids.append(j.cpu())
    return torch.cat(sims), torch.cat(ids)


def _seed_centers(x: torch.Tensor, k: int, seed: int, sample: int) -> torch.Tensor:
    """k-means++ seeds (scikit-learn) from a random sample of at most ``sample`` rows."""
    from sklearn.cluster import kmeans_plusplus

    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(x.shape[0], generator=g)[: max(sample, k)]
    seeds, _ = kmeans_plusplus(x[rows].double().numpy(), k, random_state=seed)
    return F.normalize(torch.from_numpy(seeds).float(), dim=-1)


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 20, chunk_size: int = 65536, seed: int = 0,
                     device: str = "cpu", init_sample: int = 100_000, progress: bool = False,
                     report: Optional[Callable[[int, float], None]] = None) -> KMeansResult:
    """Spherical k-means of the unit rows ``x`` (N, D) (see the module docstring);
    ``report(iteration, inertia)`` is called after each iteration."""
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"--k must be between 1 and the number of samples ({n}), got {k}")
    if chunk_size < 1 or iters < 1:
        raise ValueError(f"need chunk_size >= 1 and iters >= 1, got {chunk_size}, {iters}")
    x = F.normalize(x.float(), dim=-1)
    centers = _seed_centers(x, k, seed, init_sample).to(device)  # (K, D)
    result = KMeansResult(centers, torch.zeros(n, dtype=torch.long))
    from tqdm import tqdm

    bar = tqdm(range(iters), desc="k-means", unit="iter", disable=not progress)
    for it in bar:
        sums = torch.zeros(k, d, device=device, dtype=torch.float64)
        counts = torch.zeros(k, device=device, dtype=torch.long)
        labels, inertia = [], 0.0
        for i in range(0, n, chunk_size):
            xc = x[i : i + chunk_size].to(device)  # (chunk, D)
            s, j = (xc @ centers.T).max(dim=1)  # the (chunk, K) block is the largest temporary
            sums.index_add_(0, j, xc.double())
            counts += torch.bincount(j, minlength=k)
            inertia += float((1 - s.double()).sum())
            labels.append(j.cpu())
        labels = torch.cat(labels)
        result.inertia.append(inertia)
        bar.set_postfix(inertia=f"{inertia:.4f}")
        if report is not None:
            report(it + 1, inertia)
        nonempty = counts > 0
        centers = torch.where(nonempty[:, None], F.normalize(sums, dim=-1).float(), centers)
        converged = it > 0 and torch.equal(labels, result.labels)
        result.labels, result.centers, result.empty = labels, centers, int((~nonempty).sum())
        if converged:
            break
    bar.close()
    result.centers = result.centers.cpu()
    return result


# ------------------------------------------------------------------ embedding
def load_image_model(checkpoint: Optional[str] = None, open_clip_name: Optional[str] = None,
                     config: Optional[str] = None) -> Tuple[torch.nn.Module, object, object]:
    """(model, eval image transform, DataConfig) from a run checkpoint, an open_clip
    ``NAME[:PRETRAINED]`` or a recipe (its model at random init, ``run.seed``)."""
    from vlp.data.config import DataConfig

    if checkpoint:
        from vlp.engine.checkpoint import load_model_from_run

        cfg, model, _, transform = load_model_from_run(checkpoint)
        return model, transform, cfg.data
    if open_clip_name:
        import open_clip

        name, _, pretrained = open_clip_name.partition(":")
        model, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained or None)
        return model, transform, DataConfig()
    from vlp.config import load_config
    from vlp.models import build_transforms, create_model
    from vlp.train import seed_all

    cfg = load_config(config)
    seed_all(cfg.run.seed)  # the weights a run of this recipe starts from
    model_cfg = dataclasses.replace(cfg.model, heads={})  # heads are built after the towers: same init
    model = create_model(model_cfg)
    return model, build_transforms(model_cfg, model)[1], cfg.data


@torch.no_grad()
def embed(model, loader, device, progress: bool = False) -> Tuple[torch.Tensor, List[str]]:
    """(unit-norm image features (n, D) float32 on the CPU, sample keys) over ``loader``."""
    from tqdm import tqdm

    from vlp.eval.zeroshot import image_dtype

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
    from vlp.engine import dist

    if dist.world_size() == 1:
        return feats, keys
    import torch.distributed as tdist

    parts = [None] * dist.world_size() if dist.rank() == 0 else None
    tdist.gather_object((feats, keys), parts, dst=0)  # gloo/nccl: pickled, sizes may differ per rank
    if dist.rank() != 0:
        return None
    return torch.cat([p[0] for p in parts]), [k for p in parts for k in p[1]]


# ------------------------------------------------------------------ outputs
def write_outputs(out_dir: str, result: KMeansResult, keys: List[str], ids: torch.Tensor, sims: torch.Tensor,
                  summary: Dict) -> None:
    from safetensors.torch import save_file

    if len(set(keys)) != len(keys):
        raise ValueError("sample keys repeat across --data; the assignments are keyed by __key__")
    os.makedirs(out_dir, exist_ok=True)
    save_file({"centers": result.centers.contiguous()}, os.path.join(out_dir, CENTERS_FILE))
    tmp = os.path.join(out_dir, ASSIGNMENTS_FILE + ".tmp")
    with open(tmp, "w") as f:
        for key, i, s in zip(keys, ids.tolist(), sims.tolist()):
            f.write(json.dumps({"key": key, "ids": i, "sims": [round(v, 6) for v in s]}) + "\n")
    os.replace(tmp, os.path.join(out_dir, ASSIGNMENTS_FILE))
    with open(os.path.join(out_dir, SUMMARY_FILE), "w") as f:
        json.dump({**summary, "inertia": result.inertia, "empty_clusters": result.empty}, f, indent=2)


def load_assignments(path: str) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """key -> (ids (l,) long, sims (l,) float) from DIR or DIR/assignments.jsonl."""
    if os.path.isdir(path):
        path = os.path.join(path, ASSIGNMENTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cluster labels not found: {path} (write them with `vlp cluster`)")
    table = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            table[row["key"]] = (torch.tensor(row["ids"], dtype=torch.long), torch.tensor(row["sims"]))
    if not table:
        raise ValueError(f"{path} holds no assignments")
    return table


def cached_assignments(path: str) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """``load_assignments``, read again only when the file changes."""
    file = os.path.join(path, ASSIGNMENTS_FILE) if os.path.isdir(path) else path
    stamp = os.stat(file).st_mtime_ns if os.path.isfile(file) else None
    if _CACHE.get("key") != (file, stamp):
        _CACHE.update(key=(file, stamp), table=load_assignments(path))
    return _CACHE["table"]


_CACHE: Dict[str, object] = {}


# ------------------------------------------------------------------ the command
def run_cluster(args) -> Optional[Dict]:
    from vlp.data.stream import build_loader
    from vlp.engine import dist

    if args.k < 1 or args.positives < 1 or args.positives > args.k:
        raise ValueError(f"need --k >= 1 and 1 <= --positives <= --k, got --k {args.k} --positives {args.positives}")
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
        result = spherical_kmeans(feats, args.k, args.iters, args.chunk_size, args.seed, device, progress=progress,
                                  report=report)
        sims, ids = _assign(F.normalize(feats, dim=-1), result.centers.to(device), args.chunk_size, args.positives)
        summary = {"k": args.k, "positives": args.positives, "num_samples": len(keys), "dim": feats.shape[1],
                   "source": args.checkpoint or args.open_clip or args.config, "data": args.data,
                   "iterations": len(result.inertia), "seed": args.seed}
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
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(func=_cluster)
    return p


def _cluster(args) -> int:
    summary = run_cluster(args)
    if summary is not None:
        print(json.dumps({**summary, "out": args.out}))
    return 0
