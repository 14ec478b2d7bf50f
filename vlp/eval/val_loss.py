"""The run's objective on held-out data, without gradients: ``val_loss``.

Each eval batch (``eval.batch_size`` rows, the last one may be smaller) goes through the
model and the objective as in a training step (``vlp.engine.step.objective_losses``),
with the objective's shared draws seeded by the batch index, and collectives local to
this process (``vlp.dist.local``): the contrastive negatives are the eval batch's own rows,
so the figure depends on the eval batch size as the training loss does on the global one.
Every loss the objective reports (``loss`` and its parts) is averaged over samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from tqdm import tqdm

from vlp import dist
from vlp.engine.step import model_inputs, objective_losses
from vlp.eval.common import eval_mode, image_dtype
from vlp.eval.registry import EVALUATORS, EvalContext
from vlp.objectives.base import StepContext


def _combine(parts):
    sums: Dict[str, float] = {}
    for part, _ in parts:
        for name, total in part.items():
            sums[name] = sums.get(name, 0.0) + total
    return sums, sum(n for _, n in parts)


@dataclass
class ValLossSettings:
    data: Any = None  # shards; default: the run's data.val (training) or --data


@EVALUATORS.register("val_loss", ValLossSettings)
def val_loss(settings: ValLossSettings, ctx: EvalContext) -> Dict[str, Any]:
    """Sample-weighted mean of every loss term over the eval data, plus num_samples."""
    if ctx.objective is None:
        raise ValueError("val_loss needs the run's objective")
    model, objective = ctx.model, ctx.objective
    loader = ctx.loader(ctx.data_for(settings))
    sums: Dict[str, float] = {}
    n = 0
    with eval_mode(model), dist.local():
        for i, batch in enumerate(tqdm(loader, desc="val loss", unit="batch", disable=not ctx.progress)):
            inputs = model_inputs(batch, ctx.device)
            if "image" in inputs:
                inputs["image"] = inputs["image"].to(image_dtype(model))
            b = len(batch["key"])
            objective.begin_step(StepContext(step=i, total_steps=1, seed=0, model=model, batch=batch))
            losses = objective_losses(objective, model(inputs), batch, b, ctx.device)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value) * b
            n += b
    sums, n = _combine(dist.all_gather_object((sums, n)))  # every rank summed its own shards
    if not n:
        raise ValueError("no samples in the eval data")
    return {**{name: total / n for name, total in sums.items()}, "num_samples": n}
