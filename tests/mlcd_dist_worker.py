"""Sharded MLCD centers on W ranks vs the unsharded loss in one process (float64).

    torchrun --nproc_per_node 2 tests/mlcd_dist_worker.py OUT_PREFIX

Every rank builds the same global batch (features X (N, D), positives (N, l)) and centers
(K, D); the reference is the unsharded head + loss on all N rows (no collectives). The
sharded run gives each rank its N/W rows and K/W centers. Each rank writes
OUT_PREFIX.<rank>.pt with both losses and gradients, per case (mlcd/mlc, all centers or a
sampled active set); and, under "engine", one DeepSpeed step of the mlcd objective with
the replicated head (ZeRO 0, 2, 3; with and without the gradient cache), to compare with
the same script run as one process.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlp import dist  # noqa: E402
from vlp.models.cluster_head import ShardedClusterHead  # noqa: E402
from vlp.objectives.mlcd import mlc_rows, mlcd_rows, positive_mask, sample_active, sharded_rows  # noqa: E402

N, D, K, L, SCALE, MARGIN = 8, 6, 24, 2, 8.0, 0.2


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    centers = torch.randn(K, D, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(K, generator=g)[:L] for _ in range(N)])  # (N, l) distinct per row
    return x, centers, ids


def reference(x, centers, ids, active, coupled):
    x, centers = x.clone().requires_grad_(True), centers.clone().requires_grad_(True)
    columns = torch.full((K,), -1, dtype=torch.long)
    columns[active] = torch.arange(len(active))
    cos = x @ torch.nn.functional.normalize(centers[active], dim=-1).T  # (N, S)
    rows = (mlc_rows if coupled else mlcd_rows)(cos, positive_mask(ids, columns, len(active)), SCALE, MARGIN)
    loss = rows.mean()
    loss.backward()
    return float(loss.detach()), x.grad, centers.grad


def sharded(x, centers, ids, active, coupled):
    r, w = dist.rank(), dist.world_size()
    b = N // w
    local = x[r * b : (r + 1) * b].clone().requires_grad_(True)
    head = ShardedClusterHead(centers)
    head.set_active(active)
    cos, shard_ids = head(local)  # (N, S_r)
    rows = sharded_rows(cos, shard_ids, ids[r * b : (r + 1) * b], SCALE, MARGIN, coupled)  # (b,)
    loss = rows.mean()
    loss.backward()
    # the engine averages replicated gradients over ranks; a shard's own gradient is divided by W
    grad_x = dist.all_gather_no_grad(local.grad / w)  # (N, D)
    mean_loss = float(dist.all_reduce_sum(loss.detach().clone())) / w
    return mean_loss, grad_x, (head.lo, head.hi, head.weight.grad / w)


ENGINE_CASES = [(0, 0), (2, 4), (3, 4)]  # (ZeRO stage, gradient-cache chunk) with the replicated head


def engine_step(stage: int, chunk: int):
    """One SGD step of the mlcd objective on this rank's slice of a fixed global batch of 16."""
    from tests.tiny import tiny_batch, tiny_model_cfg
    from vlp.engine.checkpoint import full_state_dict
    from vlp.engine.config import EngineConfig, GradCacheConfig
    from vlp.engine.deepspeed_engine import build_engine
    from vlp.engine.optim import OptimConfig
    from vlp.engine.step import Step
    from vlp.models import create_model
    from vlp.objectives import build_objective

    cfg = tiny_model_cfg(heads={"cluster": {"name": "mlcd_cluster", "num_centers": K}})
    torch.manual_seed(0)
    model = create_model(cfg)
    full = tiny_batch(16, cfg)
    g = torch.Generator().manual_seed(2)
    full["cluster_ids"] = torch.stack([torch.randperm(K, generator=g)[:L] for _ in range(16)])
    b = 16 // dist.world_size()
    local = {k: v[dist.rank() * b : (dist.rank() + 1) * b] for k, v in full.items()}
    obj = build_objective({"name": "mlcd", "scale": SCALE, "margin": MARGIN, "sample_ratio": 0.3})
    optim = OptimConfig(name="sgd", lr=0.1, warmup_steps=0, weight_decay=0.0, grad_clip=0.0)
    engine, _, _ = build_engine(model, EngineConfig(zero_stage=stage, grad_cache=GradCacheConfig(chunk)), optim, b)
    losses = Step(engine, obj, torch.device("cpu"), chunk)(local)
    loss = dist.all_reduce_sum(torch.tensor([losses["loss"]], dtype=torch.float64)) / dist.world_size()
    return float(loss), full_state_dict(engine)


def main(prefix: str) -> None:
    from vlp.engine.deepspeed_engine import quiet_deepspeed

    quiet_deepspeed()
    dist.init_distributed("gloo")
    x, centers, ids = data()
    results = {"engine": {case: engine_step(*case) for case in ENGINE_CASES}}
    for coupled in (False, True):
        sampled = sample_active(ids, K, 0.3, torch.Generator().manual_seed(1))
        for name, active in (("all", torch.arange(K)), ("sampled", sampled)):
            results[(coupled, name)] = {"ref": reference(x, centers, ids, active, coupled),
                                        "sharded": sharded(x, centers, ids, active, coupled), "active": active}
    torch.save(results, f"{prefix}.{dist.rank()}.pt")
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
