"""One training step on this rank's slice of a fixed global batch, for ZeRO stages 0-3.

Run with 1 process (reference) or under a launcher with 2; rank 0 writes the mean loss
and the full updated weights of every (stage, chunk) case to OUT.
    python tests/dist_worker.py OUT            |  torchrun --nproc_per_node 2 tests/dist_worker.py OUT
VLP_DIST_CASES=infonce:2:0[,siglip:0:0...] runs only those (objective:stage:chunk) cases and
also saves, under "ranks", what each process saw (rank, world, launcher variables, host, pid).
VLP_DIST_TEACHER=RUN_DIR adds the ``distill`` variant (InfoNCE + KL to that teacher) for such cases.
"""
import os
import socket
import sys

import torch
import torch.distributed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.tiny import tiny_batch, tiny_model_cfg  # noqa: E402
from vlp import dist  # noqa: E402
from vlp.engine.checkpoint import full_state_dict  # noqa: E402
from vlp.engine.config import EngineConfig, GradCacheConfig  # noqa: E402
from vlp.engine.deepspeed_engine import build_engine, quiet_deepspeed  # noqa: E402
from vlp.engine.optim import OptimConfig  # noqa: E402
from vlp.engine.step import Step  # noqa: E402
from vlp.models import create_model  # noqa: E402
from vlp.objectives import build_objective  # noqa: E402

GLOBAL_BATCH = 16
FULL = [(0, 0), (1, 0), (2, 0), (3, 0), (2, 4), (3, 4)]  # (zero stage, chunk size): CLIP and SigLIP
SHORT = [(0, 0), (2, 0), (3, 4)]  # every other registered objective


# named objective specs beyond registry defaults: the tiled InfoNCE path at a tiny size
VARIANTS = {"infonce_tiled": {"name": "infonce", "tile_above": 0, "tile_size": 3}}
if os.environ.get("VLP_DIST_TEACHER"):
    VARIANTS["distill"] = {"name": "distill", "teacher": os.environ["VLP_DIST_TEACHER"], "base": {"name": "infonce"},
                           "weight": 0.5}


def cases():
    picked = os.environ.get("VLP_DIST_CASES")
    if picked:
        for case in picked.split(","):
            name, stage, chunk = case.split(":")
            yield name, int(stage), int(chunk)
        return
    from tests.tiny import OWN_MODEL_OBJECTIVES
    from vlp.objectives import OBJECTIVES

    for name in [*(n for n in OBJECTIVES.list() if n not in OWN_MODEL_OBJECTIVES), *VARIANTS]:
        for stage, chunk in FULL if name in ("infonce", "siglip") else SHORT:
            yield name, stage, chunk


def one_step(stage: int, chunk: int, objective: str):
    info = dist.init_distributed("gloo")
    obj = build_objective(VARIANTS.get(objective, {"name": objective}))
    kw = {"init_logit_bias": -10.0} if "logit_bias" in obj.scalar_keys else {}
    cfg = tiny_model_cfg(**kw)
    torch.manual_seed(0)
    model = create_model(cfg)
    b = GLOBAL_BATCH // info.world_size
    full = tiny_batch(GLOBAL_BATCH, cfg)
    local = {k: v[info.rank * b : (info.rank + 1) * b] for k, v in full.items()}
    optim = OptimConfig(name="sgd", lr=0.1, warmup_steps=0, weight_decay=0.0, grad_clip=0.0)
    engine, _, _ = build_engine(model, EngineConfig(zero_stage=stage, grad_cache=GradCacheConfig(chunk)), optim, b)
    losses = Step(engine, obj, torch.device("cpu"), chunk)(local)
    loss = dist.all_reduce_sum(torch.tensor([losses["loss"]], dtype=torch.float64)) / info.world_size
    return float(loss), full_state_dict(engine)


def launch_info() -> dict:
    """What the launcher gave this process, read before init_distributed normalises it."""
    seen = dist.env_info()
    rank_vars = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
    return {"env_rank": seen.rank, "env_local_rank": seen.local_rank, "env_world": seen.world_size,
            "rank_vars": [v for v in rank_vars if v in os.environ], "host": socket.gethostname(), "pid": os.getpid()}


def main(out: str) -> None:
    quiet_deepspeed()
    torch.manual_seed(0)
    seen = launch_info()
    results = {"init": create_model(tiny_model_cfg()).state_dict()}
    for objective, stage, chunk in cases():
        results[(objective, stage, chunk)] = one_step(stage, chunk, objective)
    if os.environ.get("VLP_DIST_CASES"):
        seen.update(rank=dist.rank(), world=dist.world_size())
        ranks = [None] * dist.world_size()
        torch.distributed.all_gather_object(ranks, seen)
        results["ranks"] = ranks
    if dist.rank() == 0:
        torch.save(results, out)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
