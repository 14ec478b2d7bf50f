"""Cluster labels for MLCD: spherical k-means, the centers/assignments files, and the stream
stage that joins each sample's nearest centers onto the training stream.

Files of a cluster folder (written by ``vlp cluster``, ``vlp/commands/cluster.py``):
``centers.safetensors`` ((K, D) under "centers", the ``mlcd_cluster`` head's centers),
``assignments.jsonl`` (one line per sample: ``{"key", "ids", "sims"}``, its l nearest
centers, nearest first) and ``cluster.json`` (settings, inertia per iteration).

``data.cluster_labels: DIR`` turns on the ``cluster_labels`` stream stage registered here
(train streams only): ``cluster_ids`` (l,) long and ``cluster_sims`` (l,) float are added
to every sample by ``__key__``; a sample without an assignment is skipped and counted.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import webdataset as wds

from vlp.data.config import DataConfig
from vlp.data.stream import STREAM_STAGES

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


def assign_nearest(x: torch.Tensor, centers: torch.Tensor, chunk_size: int, topk: int = 1):
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


def faiss_spherical_kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, init_sample: int = 100_000,
                           report: Optional[Callable[[int, float], None]] = None) -> KMeansResult:
    """Spherical k-means of the unit rows ``x`` (N, D) with faiss (``vlp cluster --backend faiss``, the
    MLCD reference's library) from the same k-means++ seeds as ``spherical_kmeans``; faiss-cpu is an
    optional extra (``pip install 'vlp[faiss]'``)."""
    try:
        import faiss
    except ImportError:
        raise ValueError("--backend faiss needs faiss-cpu: pip install 'vlp[faiss]'") from None
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"--k must be between 1 and the number of samples ({n}), got {k}")
    x = F.normalize(x.float(), dim=-1)
    seeds = _seed_centers(x, k, seed, init_sample).numpy()
    # every row (faiss samples 256 per center by default), no warning below 39 rows per center
    km = faiss.Kmeans(d, k, niter=iters, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=-(-n // k) + 1, min_points_per_centroid=1)
    km.train(x.numpy(), init_centroids=seeds)
    # faiss's spherical objective is Σ max cos (inner products): the inertia Σ(1 - cos) is n minus it
    history = [n - s["obj"] for s in km.iteration_stats]
    for i, value in enumerate(history if report is not None else []):
        report(i + 1, value)
    centers = F.normalize(torch.from_numpy(km.centroids.copy()), dim=-1)  # (K, D)
    labels = assign_nearest(x, centers, 65536)[1][:, 0]  # (N,)
    return KMeansResult(centers, labels, history, k - len(labels.unique()))


def inertia(x: torch.Tensor, centers: torch.Tensor, chunk_size: int = 65536) -> float:
    """Σ_i (1 - max_c cos(x_i, c)) of the unit rows ``x`` (N, D) and unit ``centers`` (K, D)."""
    sims, _ = assign_nearest(F.normalize(x.float(), dim=-1), centers, chunk_size)
    return float((1 - sims.double()).sum())


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


# ------------------------------------------------------------------ the stream stage
@STREAM_STAGES.register("cluster_labels")
def cluster_label_stage(cfg: DataConfig, handler: Callable, train: bool):
    """The join of ``cfg.cluster_labels`` onto a train stream; None when off."""
    if not (train and cfg.cluster_labels):
        return None
    # loaded once per process; forked workers share it
    table = cached_assignments(cfg.cluster_labels)
    return wds.map(partial(_join_clusters, table=table, path=cfg.cluster_labels), handler=handler)


def _join_clusters(sample: Dict[str, Any], table: Dict[str, Any], path: str) -> Dict[str, Any]:
    if sample["key"] not in table:
        raise ValueError(f"sample {sample['key']!r} has no cluster assignment in {path}")
    ids, sims = table[sample["key"]]
    return {**sample, "cluster_ids": ids, "cluster_sims": sims}
