"""One m3col step per case on this rank's slice of a fixed global batch (float64, no DeepSpeed).

    torchrun --nproc_per_node 2 tests/m3col_dist_worker.py OUT

Rank 0 writes, per case, the loss averaged over ranks, the parameter gradients averaged
over ranks (what the engine's all-reduce gives) and every rank's mix draws to OUT;
``tests/test_m3col.py`` compares them with one process on the concatenated batch.
"""
import os
import sys

import torch
import torch.distributed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.tiny import PlainEngine, tiny_batch, tiny_model_cfg  # noqa: E402
from vlp import dist  # noqa: E402
from vlp.engine.step import Step  # noqa: E402
from vlp.models import create_model  # noqa: E402
from vlp.objectives import build_objective  # noqa: E402

GLOBAL_BATCH = 16
TOTAL_STEPS = 3  # step 0: mixup loss; step 2 (progress 2/3): SoftCLIP
SEED = 7
# (chunk size, step, mix_both)
CASES = [(0, 0, False), (4, 0, False), (0, 0, True), (4, 2, False)]
HEADS = {
    "ci": {"name": "classifier", "modality": "image", "num_classes": 4, "hidden_dim": 16},
    "ct": {"name": "classifier", "modality": "text", "num_classes": 4, "hidden_dim": 16},
    "cf": {"name": "fusion_classifier", "num_classes": 4, "hidden_dim": 16},
}


def model_and_batch(dropout: float = 0.0):
    cfg = tiny_model_cfg(heads={k: {**v, "dropout": dropout} for k, v in HEADS.items()})
    torch.manual_seed(0)
    model = create_model(cfg).double().train()
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in tiny_batch(GLOBAL_BATCH, cfg).items()}
    return model, batch


def one_step(model, batch, chunk: int, step: int, mix_both: bool):
    """(losses, grads, draws) of one Step on ``batch`` (this process's rows)."""
    objective = build_objective({"name": "m3col", "mix_both": mix_both})
    model.zero_grad(set_to_none=True)
    losses = Step(PlainEngine(model), objective, torch.device("cpu"), chunk, total_steps=TOTAL_STEPS, seed=SEED)(
        batch, step=step)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    draws = [(d.perm, d.lam) for d in objective.draws(GLOBAL_BATCH)]
    return losses, grads, draws


def main(out: str) -> None:
    info = dist.init_distributed("gloo")
    b = GLOBAL_BATCH // info.world_size
    results = {}
    for chunk, step, mix_both in CASES:
        model, full = model_and_batch()
        local = {k: v[info.rank * b : (info.rank + 1) * b] for k, v in full.items()}
        losses, grads, draws = one_step(model, local, chunk, step, mix_both)
        loss = dist.all_reduce_sum(torch.tensor([losses["loss"]], dtype=torch.float64)) / info.world_size
        for g in grads.values():
            dist.all_reduce_sum(g).div_(info.world_size)
        every = [None] * info.world_size
        torch.distributed.all_gather_object(every, draws)
        results[(chunk, step, mix_both)] = {"loss": float(loss), "grads": grads, "draws": every,
                                            "keys": sorted(losses)}
    if info.rank == 0:
        torch.save(results, out)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
