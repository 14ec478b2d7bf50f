"""The training step: one pass, or gradient-cached over chunks (docs/design.md, "The step").

Cached step for a local batch of b samples split into K chunks:
1. each chunk: save RNG, encode without grad -> representations (b_k, D);
2. the objective's cross-sample loss on the cached representations (it gathers across
   ranks itself); its gradient w.r.t. local representations and per-step scalars
   (logit scale/bias) is kept;
3. each chunk: restore RNG (same dropout/drop-path masks), encode with grad and
   backpropagate <reps, cached grad> + the chunk's per-sample loss; the scalars'
   cached gradient is applied once (chunk 0), not once per chunk;
4. one optimizer step. A non-finite total loss (known after step 2, before any
   backward) skips the step on every rank. Gradient reduction across ranks happens once: under
   ``engine.no_sync()`` for ZeRO-0 and ``engine.coalesce_grad_reduction()`` for ZeRO 1-3.

Heads sharded over ranks (``vlp/engine/sharded.py``) are parameters outside the engine: the
plain step's backward reaches them as ordinary leaves, the cached step takes their gradient
with the representations' in step 2, and they take their own optimizer step after the engine's.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict, List

import torch

from vlp import dist, rng
from vlp.objectives.base import Objective, StepContext

Batch = Dict[str, object]
SKIPPED = {"loss": torch.tensor(float("nan")), "skipped_step": torch.tensor(1.0)}
MODEL_INPUTS = ("image", "text", "audio")


def model_inputs(batch: Batch, device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}


def _batch_len(batch: Batch) -> int:
    return len(next(batch[k] for k in (*MODEL_INPUTS, "label") if k in batch))


def split(batch: Batch, chunk_size: int) -> List[Batch]:
    n = _batch_len(batch)
    return [
        {k: v[i : i + chunk_size] for k, v in batch.items() if isinstance(v, (torch.Tensor, list))}
        for i in range(0, n, chunk_size)
    ]


def batch_fields(objective: Objective, batch: Batch, device) -> Dict[str, torch.Tensor]:
    """Batch fields the cross-sample part reads (labels), on the device, no grad."""
    fields = {k: batch[k].to(device) for k in objective.batch_keys}
    if "label" in fields and bool((fields["label"] < 0).any()):  # the stream's "no label"
        raise ValueError(f"objective {type(objective).__name__} needs a label on every sample "
                         "(data.label_key); this batch has samples without one")
    return fields


def objective_losses(objective: Objective, out, batch: Batch, n: int, device) -> Dict[str, torch.Tensor]:
    """The objective's losses of one forward ``out`` of a local batch of ``n`` rows: the
    cross-sample part plus each per-sample sum divided by ``n``, all added into ``loss``."""
    reps = {**{k: out[k] for k in objective.rep_keys}, **batch_fields(objective, batch, device)}
    losses = objective.cross_sample(reps, {k: out[k] for k in objective.scalar_keys if k in out})
    for name, value in objective.per_sample(out, batch).items():
        losses[name] = value / n
        losses["loss"] = losses.get("loss", 0.0) + losses[name]
    return losses


class Step:
    """Callable: ``step(batch) -> {name: float}``; does forward, backward and optimizer step."""

    def __init__(self, engine, objective: Objective, device: torch.device, chunk_size: int = 0,
                 total_steps: int = 1, seed: int = 0, sharded=None):
        self.engine = engine
        self.sharded = sharded  # ShardedHeads or None
        self.objective = objective
        self.device = device
        self.chunk_size = chunk_size
        self.total_steps = total_steps
        self.seed = seed
        self.calls = 0  # the step index when the caller passes none
        self._warned = False

    def __call__(self, batch: Batch, step: int = None) -> Dict[str, float]:
        """One optimizer step. A non-finite loss on any rank skips the step on every rank
        (no backward, no update) and returns ``{"loss": nan, "skipped_step": 1.0}``.
        ``step`` (optimizer steps done so far, the same on every rank) seeds the
        objective's shared draws; by default this Step's own call count."""
        step = self.calls if step is None else step
        self.calls += 1
        self.objective.begin_step(StepContext(step, self.total_steps, self.seed, self.engine.module, batch))
        n = _batch_len(batch)
        if self.chunk_size and self.chunk_size < n:
            losses = self._cached(batch, n)
        else:
            losses = self._plain(batch, n)
        return {k: float(v) for k, v in losses.items()}

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=loss.device)
        return float(dist.all_reduce_sum(bad)) == 0.0  # the same decision on every rank

    def _fields(self, batch: Batch) -> Dict[str, torch.Tensor]:
        return batch_fields(self.objective, batch, self.device)

    def _loss(self, out, batch, n: int) -> Dict[str, torch.Tensor]:
        return objective_losses(self.objective, out, batch, n, self.device)

    def _plain(self, batch: Batch, n: int) -> Dict[str, torch.Tensor]:
        out = self.engine(model_inputs(batch, self.device))
        losses = self._loss(out, batch, n)
        if not self._finite_everywhere(losses["loss"].detach()):
            return SKIPPED
        self.engine.backward(losses["loss"])
        self._optimizer_step()
        return {k: v.detach() for k, v in losses.items()}

    def _optimizer_step(self) -> None:
        self.engine.step()
        if self.sharded is not None:
            self.sharded.step()

    def _cached(self, batch: Batch, n: int) -> Dict[str, torch.Tensor]:
        obj = self.objective
        chunks = split(batch, self.chunk_size)
        rng_states, cache, scalars, losses = [], [], {}, {}
        with torch.no_grad():  # 1. encode every chunk without a graph
            for chunk in chunks:
                rng_states.append(rng.torch_state())
                out = self.engine(model_inputs(chunk, self.device))
                cache.append({k: out[k] for k in obj.rep_keys})
                scalars = scalars or {k: out[k] for k in obj.scalar_keys if k in out}
                for name, value in obj.per_sample(out, chunk).items():  # for the total only
                    losses[name] = losses.get(name, 0.0) + value / n
        # 2. cross-sample loss once, on leaves standing for the cached representations
        reps = {k: torch.cat([c[k] for c in cache]).requires_grad_(True) for k in obj.rep_keys}  # (b, D)
        scal = {k: v.detach().requires_grad_(True) for k, v in scalars.items()}
        with torch.enable_grad():
            cross = obj.cross_sample({**reps, **self._fields(batch)}, scal)
            total = cross["loss"].detach() + sum(losses.values())
            if not self._finite_everywhere(total):
                return SKIPPED
            own = self.sharded.parameters() if self.sharded is not None else []  # (K_r, D) rows
            leaves = list(reps.values()) + list(scal.values()) + own
            grads = torch.autograd.grad(cross["loss"], leaves, allow_unused=True)
        g_rep = dict(zip(reps, grads[: len(reps)]))
        g_scal = dict(zip(scal, grads[len(reps) : len(reps) + len(scal)]))
        for p, g in zip(own, grads[len(reps) + len(scal) :]):  # the cross-sample part is their whole loss
            p.grad = g
        # 3. re-encode each chunk with grad, replaying its RNG
        with self._one_reduction():
            start = 0
            for i, chunk in enumerate(chunks):
                rng.set_torch_state(rng_states[i])
                out = self.engine(model_inputs(chunk, self.device))
                b = len(out[obj.rep_keys[0]])
                surrogate = sum((out[k] * g[start : start + b]).sum() for k, g in g_rep.items() if g is not None)
                if i == 0:  # per-step scalars: their gradient counted once
                    surrogate = surrogate + sum((out[k] * g).sum() for k, g in g_scal.items() if g is not None)
                for value in obj.per_sample(out, chunk).values():
                    surrogate = surrogate + value / n
                self._backward(surrogate, last=i == len(chunks) - 1)
                start += b
        self._optimizer_step()
        return {**{k: v.detach() for k, v in cross.items()}, **losses, "loss": total}

    @contextlib.contextmanager
    def _one_reduction(self):
        stage = self.engine.zero_optimization_stage()
        if stage > 0 and hasattr(self.engine.optimizer, "_coalesce_grad_reduction"):
            with self.engine.coalesce_grad_reduction():
                yield
        else:
            if stage > 0 and not self._warned:
                # e.g. DeepSpeed's BF16_Optimizer (bf16 + fp32 grad accumulation): still exact,
                # but gradients are reduced once per chunk instead of once per step
                warnings.warn(f"{type(self.engine.optimizer).__name__} cannot coalesce gradient reduction; "
                              "reducing once per chunk")
                self._warned = True
            yield

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        # ZeRO-0: accumulate locally and all-reduce with the last chunk only
        if self.engine.zero_optimization_stage() == 0 and not last:
            with self.engine.no_sync():
                self.engine.backward(loss)
        else:
            self.engine.backward(loss)
