"""Class-incremental training (COCONUT): vlp.train's Trainer, task after task, with experience replay.

Steps ``[t·S, (t+1)·S)`` (S = ``continual.steps_per_task``) learn task t. Each batch of
B rows holds ``B - k`` rows of the current task's classes (the training stream,
filtered) and, from the second task on, ``k = round(replay_fraction · B)`` rows drawn
from the replay memory. Batch fields added for the objective (``vlp/objectives/coconut.py``):

    rehearsal  long  (B,)    1 on rows drawn from the memory
    teacher    float (B, D)  the frozen teacher's unit-norm features of those rows, 0 elsewhere

When task t ends (the first batch of task t+1 is asked for, or training ends):
1. the model's weights are written to ``RUN_DIR/tasks/task_{t:03d}/model.safetensors``
   (``vlp eval continual`` reads them) and ``RUN_DIR/tasks/tasks.json`` is updated;
2. a frozen copy of the model becomes the teacher (runs with a replay memory only);
3. the memory is updated with one pass over task t's training rows (``buffer.py``):
   the stream is filtered to the task's classes after decoding, so the pass (and the
   training stream) decode every class's samples and keep 1/T of them on T equal tasks.

The lr (``continual.lr_schedule``): ``global`` runs optim's warmup and schedule once over the
whole sequence, so the last tasks learn at a small lr; ``per_task`` restarts them with every
task (``optim.warmup_steps`` of warmup, then the decay over ``steps_per_task``), so every task
learns at the peak lr.

Checkpoints add the number of finished tasks (global) and each rank's memory (per rank),
so a resumed run continues with the same memory and the teacher of its task (read back
from the task's snapshot). Resuming on a different number of ranks rebuilds the memory
from the finished tasks' data.
"""
from __future__ import annotations

import os
import random
import warnings
from dataclasses import replace
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from safetensors.torch import load_file, save_file

from vlp import dist
from vlp.config import Config
from vlp.data.continual import buffer_capacity
from vlp.data.replay import ReplayBuffer, batch_rows, collate_rows
from vlp.engine import checkpoint
from vlp.engine.optim import OptimConfig, lr_lambda
from vlp.engine.step import model_inputs
from vlp.models import create_model
from vlp.runs import task_weights, write_tasks
from vlp.train import Trainer


def per_task_lr(optim: OptimConfig, steps_per_task: int) -> Callable[[int], float]:
    """The lr multiplier of ``continual.lr_schedule: per_task``: optim's warmup and schedule over
    ``steps_per_task`` steps, restarted at the first step of every task (a warmup as long as a task
    never reaches the peak lr)."""
    fn = lr_lambda(replace(optim, steps=steps_per_task))
    return lambda step: fn(step % steps_per_task)


class ContinualTrainer(Trainer):
    def __init__(self, cfg: Config):
        cc = cfg.continual
        if cfg.optim.samples is not None or cfg.data.epochs is not None:
            raise ValueError("a continual run's budget is continual.steps_per_task (or optim.steps); "
                             "optim.samples and data.epochs do not apply")
        self.tasks: List[List[int]] = [list(t) for t in cc.tasks]
        n = len(self.tasks)
        if cc.steps_per_task:
            cfg.optim.steps = n * cc.steps_per_task  # the scheduler spans the whole sequence
        elif cfg.optim.steps < n:
            raise ValueError(f"optim.steps ({cfg.optim.steps}) must be >= the number of tasks ({n})")
        self.steps_per_task = cfg.optim.steps // n
        cfg.optim.steps = n * self.steps_per_task
        super().__init__(cfg)
        if cc.lr_schedule == "per_task":
            self._restart_schedule_per_task()
        modality = getattr(self.objective, "modality", cc.modality)
        if modality != cc.modality:
            raise ValueError(f"continual.modality ({cc.modality}) differs from the objective's modality ({modality})")
        self.modality = cc.modality
        capacity = buffer_capacity(cc, cfg.data.train, self.info.world_size)
        self.buffer = ReplayBuffer(capacity, cc.policy, seed=cfg.run.seed * 1_000_003 + self.info.rank)
        self.tasks_done = 0  # tasks whose end (snapshot, teacher, memory update) is behind us
        self.teacher: Optional[torch.nn.Module] = None
        self._composed: Optional[Iterator[Dict[str, Any]]] = None

    def _restart_schedule_per_task(self) -> None:
        # the engine steps this scheduler; swapping its multiplier and re-deriving the current lr
        # (as a resume does) is all it takes, and a resumed run rebuilds the same multiplier
        fn = per_task_lr(self.cfg.optim, self.steps_per_task)
        self.scheduler.lr_lambdas = [fn] * len(self.scheduler.lr_lambdas)
        self._follow_schedule()

    # --- tasks ------------------------------------------------------------------------
    def task_at(self, step: int) -> int:
        return min(step // self.steps_per_task, len(self.tasks) - 1)

    def seen_classes(self, task: int) -> List[int]:
        return [c for t in self.tasks[: task + 1] for c in t]

    def enter_task(self, task: int) -> None:
        """Finish every task before ``task`` not finished yet; the objective's classes."""
        while self.tasks_done < task:
            self._end_task(self.tasks_done)
        if task < len(self.tasks):
            self.objective.set_seen_classes(self.seen_classes(task))

    def _end_task(self, task: int) -> None:
        weights = checkpoint.full_state_dict(self.engine)  # every rank (ZeRO-3 gathers)
        self._write_snapshot(task, weights)
        last = task == len(self.tasks) - 1
        if self.buffer.capacity and not last:  # nothing replays after the last task; no memory, no teacher
            self.teacher = self._frozen(weights)
            self.buffer.add_task(self._task_rows(task), self.tasks[task])
        self.tasks_done = task + 1
        if self.info.is_main:
            counts = dict(sorted(self.buffer.class_counts().items()))
            print(f"[vlp] task {task} done at step {self.state.step}: replay memory {len(self.buffer)} rows "
                  f"on rank 0, per class {counts}", flush=True)

    def _write_snapshot(self, task: int, weights: Dict[str, torch.Tensor]) -> None:
        if self.info.is_main:
            path = task_weights(self.run_dir, task)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_file({k: v.contiguous() for k, v in weights.items()}, f"{path}.tmp")
            os.replace(f"{path}.tmp", path)
            write_tasks(self.run_dir, {"tasks": self.tasks, "done": task + 1, "steps_per_task": self.steps_per_task,
                                       "modality": self.modality})
        dist.barrier()

    def _frozen(self, weights: Dict[str, torch.Tensor]) -> torch.nn.Module:
        teacher = create_model(self.cfg.model, load_weights=False)
        teacher.load_state_dict(weights, strict=True)
        return teacher.to(self.device).eval().requires_grad_(False)

    def _task_rows(self, task: int) -> Iterator[Dict[str, Any]]:
        """One pass over this rank's rows of ``task``'s classes (train transforms, own shuffle)."""
        from tqdm import tqdm

        wanted = set(self.tasks[task])
        loader = self.train_loader(epoch=task, seed=self.cfg.run.seed + 7919 * (task + 1))
        bar = self.info.is_main and self.cfg.logging.progress
        for batch in tqdm(loader, desc=f"replay memory (task {task})", unit="batch", disable=not bar, leave=False):
            yield from batch_rows(batch, wanted)

    # --- data -------------------------------------------------------------------------
    def next_batch(self) -> Optional[Dict[str, Any]]:
        if self._composed is None:
            self._composed = self.batches()
        return next(self._composed)

    def _raw_batches(self) -> Iterator[Dict[str, Any]]:
        """This rank's stream batches, epoch after epoch (a rank moves on when its own epoch ends: the
        composed batches never run out, so ranks need not agree). The data position is that of the last
        batch read; rows read but not yet trained on are not saved, so a resume is not sample-exact."""
        while True:
            batch = self.data.next()
            if batch is None:
                self._end_epoch()
                continue
            self.data.consume(batch)
            yield batch

    def batches(self) -> Iterator[Dict[str, Any]]:
        """Endless batches of the current task's classes plus rehearsal rows (module docstring)."""
        source = self._raw_batches()  # every class, epoch after epoch
        pending: List[Dict[str, Any]] = []
        pending_task, skipped = -1, 0
        while True:
            task = self.task_at(self.state.step)
            self.enter_task(task)
            if task != pending_task:  # rows kept for the previous task are not this one's
                pending, pending_task = [], task
            k = self._replay_rows(task)
            size = self.cfg.data.batch_size - k
            wanted = set(self.tasks[task])
            while len(pending) < size:
                raw = next(source)
                skipped += int(raw.get("n_skipped", 0))
                pending += batch_rows(raw, wanted)
            new, pending = pending[:size], pending[size:]
            rng = random.Random(f"{self.cfg.run.seed}-{self.info.rank}-{self.state.step}")
            batch = self._compose(new, self.buffer.sample(k, rng))
            batch["n_skipped"], skipped = skipped, 0
            yield batch

    def _replay_rows(self, task: int) -> int:
        if task == 0 or not len(self.buffer):
            return 0
        b = self.cfg.data.batch_size
        return min(int(round(self.cfg.continual.replay_fraction * b)), b - 1)

    def _compose(self, new: List[Dict[str, Any]], old: List[Dict[str, Any]]) -> Dict[str, Any]:
        batch = collate_rows(new + old)
        n, k = len(new), len(old)
        batch["rehearsal"] = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(k, dtype=torch.long)])  # (B,)
        teacher = torch.zeros(n + k, self.cfg.model.embed_dim)  # (B, D)
        if k and self.teacher is not None:
            with torch.no_grad():
                inputs = model_inputs(collate_rows(old), self.device)
                feats = self.teacher({self.modality: inputs[self.modality]})[self.modality]  # (k, D)
            teacher[n:] = feats.float().cpu()
        batch["teacher"] = teacher
        return batch

    # --- checkpoints ------------------------------------------------------------------
    def client_state(self) -> Dict[str, Any]:
        return {"continual": {"tasks_done": self.tasks_done}}

    def rank_state(self) -> Optional[Dict[str, Any]]:
        return {"buffer": self.buffer.state_dict()}

    def load_client_state(self, client: Dict[str, Any]) -> None:
        self.tasks_done = int(client.get("continual", {}).get("tasks_done", 0))
        saved = (client.get("rank_state") or {}).get("buffer")
        if saved is not None:
            self.buffer.load_state_dict(saved)
        elif self.tasks_done and self.buffer.capacity:
            warnings.warn(f"rank {self.info.rank}: the checkpoint has no replay memory for this rank "
                          "(resumed on another number of ranks?); rebuilding it from the finished tasks' data")
            for task in range(min(self.tasks_done, len(self.tasks) - 1)):
                self.buffer.add_task(self._task_rows(task), self.tasks[task])
        if self.tasks_done and self.buffer.capacity:
            path = task_weights(self.run_dir, self.tasks_done - 1)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"cannot resume: the teacher's weights {path} are missing")
            self.teacher = self._frozen(load_file(path))
        if self.tasks_done < len(self.tasks):
            self.objective.set_seen_classes(self.seen_classes(self.task_at(self.state.step)))

    # --- the loop ---------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        result = super().fit()
        if result.get("preempted"):
            return {**result, "tasks_done": self.tasks_done}
        self.enter_task(len(self.tasks))  # the last task's snapshot
        return {**result, "tasks_done": self.tasks_done}
