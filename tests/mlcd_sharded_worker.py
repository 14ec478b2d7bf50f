"""The MLCD head sharded over ranks in training vs the unsharded head in one process (fp32).

    main(OUT, "one")                                           # in the test process: the reference
    torchrun --nproc_per_node 2 tests/mlcd_sharded_worker.py OUT two
    main(OUT, "back")                                          # resumes OUT.two's checkpoint on 1 rank

Every case trains STEPS optimizer steps (DeepSpeed engine + Step, AdamW) on fixed global
batches of N rows, each rank taking its N/W rows. ``one`` trains each case with the
unsharded head; ``two`` with ``sharded: true`` (K = 23: shards of 11 and 12 rows). Each
writes OUT.<mode>.<rank>.pt: per case the losses (mean over ranks) and the whole weights
(towers and every head row). The resume flow (``RESUME_CASE``) saves a checkpoint after
SAVE_AT steps with the sharded head (``one``: on 1 rank, ``two``: on 2), and ``two`` /
``back`` continue the other mode's checkpoint to STEPS (1 -> 2 and 2 -> 1 ranks), ``two``
its own too (same ranks); the test compares those with the uninterrupted runs.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.tiny import tiny_batch, tiny_model_cfg  # noqa: E402
from vlp import dist  # noqa: E402
from vlp.config import load_config, save_config  # noqa: E402
from vlp.engine import checkpoint  # noqa: E402
from vlp.engine.config import EngineConfig, GradCacheConfig  # noqa: E402
from vlp.engine.deepspeed_engine import build_engine, quiet_deepspeed  # noqa: E402
from vlp.engine.optim import OptimConfig  # noqa: E402
from vlp.engine.sharded import ShardedHeads  # noqa: E402
from vlp.engine.step import Step  # noqa: E402
from vlp.models import create_model  # noqa: E402
from vlp.objectives import build_objective  # noqa: E402

N, K, L, STEPS, SAVE_AT = 8, 23, 2, 5, 3
CASES = [("mlcd", 0, 0), ("mlcd", 3, 2), ("mlc", 2, 0), ("mlc", 1, 2)]  # (objective, ZeRO stage, chunk)
RESUME_CASE = ("mlcd", 0, 2)


def model_cfg(sharded: bool):
    return tiny_model_cfg(heads={"cluster": {"name": "mlcd_cluster", "num_centers": K, "sharded": sharded}})


def global_batch(step: int):
    batch = tiny_batch(N, model_cfg(False), seed=100 + step)
    g = torch.Generator().manual_seed(step)
    batch["cluster_ids"] = torch.stack([torch.randperm(K, generator=g)[:L] for _ in range(N)])  # (N, l)
    return batch


def build(case, sharded: bool):
    name, stage, chunk = case
    cfg = model_cfg(sharded)
    torch.manual_seed(0)
    model = create_model(cfg)
    model.text.requires_grad_(False)  # no gradient without the CLIP term: DeepSpeed would decay zero grads on 2 ranks
    # eps: Adam turns the rounding noise of zero-gradient entries (attention key biases) into eps-sized steps
    optim = OptimConfig(lr=1e-2, weight_decay=0.1, eps=1e-4, warmup_steps=2, steps=STEPS, grad_clip=0.0)
    heads = ShardedHeads.split(model, optim)
    b = N // dist.world_size()
    engine, _, _ = build_engine(model, EngineConfig(zero_stage=stage, grad_cache=GradCacheConfig(chunk)), optim, b)
    obj = build_objective({"name": name, "scale": 8.0, "margin": 0.1, "sample_ratio": 0.4})
    return engine, heads, Step(engine, obj, torch.device("cpu"), chunk, total_steps=STEPS, sharded=heads)


def train(engine, heads, step_fn, start: int, stop: int, save_dir: str = None):
    losses = []
    b = N // dist.world_size()
    for step in range(start, stop):
        local = {k: v[dist.rank() * b : (dist.rank() + 1) * b] for k, v in global_batch(step).items()}
        loss = step_fn(local, step=step)["loss"]
        losses.append(float(dist.all_reduce_sum(torch.tensor([loss], dtype=torch.float64))) / dist.world_size())
        if save_dir and step + 1 == SAVE_AT:
            checkpoint.save(engine, save_dir, SAVE_AT, {}, sharded=heads)
    weights = checkpoint.full_state_dict(engine)
    if heads is not None:
        weights.update(heads.full_weights())
    return {"losses": losses, "weights": weights}


def resumed(run_dir: str):
    engine, heads, step_fn = build(RESUME_CASE, sharded=True)
    checkpoint.load(engine, run_dir, sharded=heads)
    return train(engine, heads, step_fn, SAVE_AT, STEPS)


def write_run(run_dir: str) -> None:
    """A run folder around the checkpoints (eval, export and `vlp cluster` read its config.yaml)."""
    if dist.rank() == 0:
        cfg = load_config(None, [f"run.dir={run_dir}", "data.workers=0"])
        cfg.model = model_cfg(True)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))


def main(out: str, mode: str) -> None:
    quiet_deepspeed()
    dist.init_distributed("gloo")
    results = {}
    if mode in ("one", "two"):
        for case in CASES:
            results[case] = train(*build(case, sharded=mode == "two"), 0, STEPS)
        run_dir = f"{out}.{mode}_run"
        results["uninterrupted"] = train(*build(RESUME_CASE, sharded=True), 0, STEPS, save_dir=run_dir)
        write_run(run_dir)
    if mode == "two":
        results["same_ranks"] = resumed(f"{out}.two_run")
        results["from_one"] = resumed(f"{out}.one_run")
    if mode == "back":
        results["from_two"] = resumed(f"{out}.two_run")
    torch.save(results, f"{out}.{mode}.{dist.rank()}.pt")
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
