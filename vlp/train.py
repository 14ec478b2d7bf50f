"""The training loop, as named steps: setup, build, resume, then step / log / eval / save."""
from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from tqdm import tqdm

from vlp import dist, rng
from vlp.config import Config, save_config
from vlp.data.stream import TrainData, build_loader
from vlp.engine import checkpoint
from vlp.engine.deepspeed_engine import build_engine, quiet_deepspeed
from vlp.engine.sharded import ShardedHeads
from vlp.engine.step import Step
from vlp.errors import PeerFailure, TrainingDiverged
from vlp.eval import run_tasks
from vlp.metrics import MetricsLogger
from vlp.models import build_tokenizer, build_transforms, create_model
from vlp.objectives import build_objective
from vlp.runs import eval_context

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SLURM: sbatch --signal=USR1@120 (launch/slurm.sbatch)


class Preemption:
    """Catches SIGTERM / SIGUSR1 while training; ``Trainer._agree`` (a collective before every step)
    tells every rank at the same step once any rank got one, so all ranks save that step and stop."""

    def __init__(self):
        self.signum = 0
        self._saved = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            for sig in PREEMPT_SIGNALS:
                self._saved[sig] = signal.signal(sig, self._catch)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _catch(self, signum, frame) -> None:
        self.signum = signum

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a peer rank's signal"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0  # data epoch being read
    samples: int = 0  # global samples seen
    skipped: int = 0  # bad samples skipped by this rank's stream


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        quiet_deepspeed()
        self.info = dist.init_distributed(cfg.engine.backend, cfg.engine.timeout_s)
        self.device = dist.device_for(self.info)
        self.run_dir = cfg.run.dir
        self._setup_run_dir()
        self._build()
        if self.info.is_main:
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))  # with the steps a budget resolved to
        self.state = TrainState()
        self.log = MetricsLogger(self.run_dir, self.info.is_main, cfg.logging.tensorboard,
                                 wandb=cfg.logging.wandb, run_config=asdict(cfg))

    # --- setup ----------------------------------------------------------------------
    def _setup_run_dir(self) -> None:
        if self.info.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
        print(
            f"[vlp] host={socket.gethostname()} rank={self.info.rank} local_rank={self.info.local_rank} "
            f"world={self.info.world_size} device={self.device}",
            flush=True,
        )
        checkpoint.clean_partial(self.run_dir)

    def _build(self) -> None:
        cfg = self.cfg
        rng.seed_all(cfg.run.seed)  # identical initial weights on every rank
        model = create_model(cfg.model).to(self.device)
        self.tokenizer = build_tokenizer(cfg.model, model)
        self.train_transform, self.eval_transform = build_transforms(cfg.model, model, aug=cfg.data.aug)
        # uint8 per sample, float per batch (TrainTransform.split); no image tower: no transform
        self.train_image_parts = self.train_transform.split() if self.train_transform is not None else (None, None)
        per_sample, per_batch = self.train_image_parts
        self.data = TrainData(cfg.data.train, cfg.data, image_transform=per_sample, batch_transform=per_batch,
                              tokenizer=self.tokenizer, rank=self.info.rank, world_size=self.info.world_size,
                              seed=cfg.run.seed)
        self._resolve_budget()
        self.objective = build_objective(cfg.objective)
        # heads with sharded: true keep this rank's rows outside the engine (vlp/engine/sharded.py)
        self.sharded = ShardedHeads.split(model, cfg.optim, cfg.engine.precision)
        self.engine, self.optimizer, self.scheduler = build_engine(model, cfg.engine, cfg.optim, cfg.data.batch_size)
        self.step_fn = Step(self.engine, self.objective, self.device, cfg.engine.grad_cache.chunk_size,
                            total_steps=cfg.optim.steps, seed=cfg.run.seed, sharded=self.sharded)
        rng.seed_all(cfg.run.seed + 1000 * self.info.rank + 1)  # per-rank dropout and augmentation

    # --- data -----------------------------------------------------------------------
    def _resolve_budget(self) -> None:
        """``optim.samples`` or ``data.epochs``, when set, become ``optim.steps`` (the schedule spans them)."""
        cfg = self.cfg
        if cfg.optim.samples is not None and cfg.data.epochs is not None:
            raise ValueError("set a budget in optim.samples or in data.epochs, not both")
        if cfg.optim.samples is not None:
            cfg.optim.steps = math.ceil(cfg.optim.samples / (cfg.data.batch_size * self.info.world_size))
        elif cfg.data.epochs is not None:
            cfg.optim.steps = sum(self.data.batches_per_epoch(e) for e in range(cfg.data.epochs))
        if cfg.optim.steps < 1:
            raise ValueError(f"the budget comes to {cfg.optim.steps} steps: data.train holds too few samples for "
                             f"data.batch_size={cfg.data.batch_size} on {self.info.world_size} ranks")

    def next_batch(self) -> Optional[Dict[str, Any]]:
        """The next batch to train on, or None where this rank's epoch has ended."""
        return self.data.next()

    def _agree(self, ended: bool, preemption: Preemption) -> Tuple[bool, bool]:
        """One collective before every step: (some rank's epoch has ended, some rank was signalled).
        An epoch ends on every rank when the first runs out, so all take the same steps."""
        flags = torch.tensor([float(ended), float(bool(preemption.signum))], device=self.device)
        flags = dist.all_reduce_sum(flags).tolist()
        return flags[0] > 0, flags[1] > 0

    def _end_epoch(self) -> None:
        if not self.data.started():
            raise ValueError(
                f"data.train yielded no full batch of {self.cfg.data.batch_size} in epoch {self.data.epoch}; "
                "lower data.batch_size or add data"
            )
        self.data.next_epoch()
        self.state.epoch = self.data.epoch

    def train_loader(self, epoch: int, seed: Optional[int] = None):
        """One more pass over this rank's share of data.train (train transforms, shuffled by epoch),
        beside the training stream (a continual run fills its replay memory with it)."""
        per_sample, per_batch = self.train_image_parts
        return build_loader(
            self.cfg.data.train,
            self.cfg.data,
            image_transform=per_sample,
            batch_transform=per_batch,
            tokenizer=self.tokenizer,
            rank=self.info.rank,
            world_size=self.info.world_size,
            train=True,
            epoch=epoch,
            seed=self.cfg.run.seed if seed is None else seed,
        )

    # --- checkpoints ----------------------------------------------------------------
    def resume(self) -> None:
        """Continue from ``run.resume_from``, else (``run.resume``) this run's latest checkpoint;
        metrics.jsonl and TensorBoard drop what a dead run logged past the step resumed from."""
        run = self.cfg.run
        found = self.run_dir, checkpoint.latest_tag(self.run_dir)
        if run.resume_from:
            found = checkpoint.source(run.resume_from)
        elif not run.resume:
            if found[1] and self.info.is_main:
                print(f"[vlp] warning: run.resume=false: starting fresh although {self.run_dir} has checkpoint "
                      f"{found[1]} (a new checkpoint of the same step replaces it)", flush=True)
            found = None, None
        client = checkpoint.load(self.engine, *found, sharded=self.sharded) if found[1] else None
        if client is not None:
            self._follow_schedule()
            self.state = TrainState(**client["train_state"])
            self.data.restore(client.get("data"))
            self.state.epoch = self.data.epoch
            self.load_client_state(client)
            if self.info.is_main:
                print(f"[vlp] resumed from step {self.state.step} (epoch {self.state.epoch})"
                      + (f" of {run.resume_from}" if run.resume_from else ""), flush=True)
        self.log.resume_at(self.state.step)

    def _follow_schedule(self) -> None:
        """The restored optimizer holds the lr the saving run's schedule gave; a run resumed with other
        optim settings (more steps, another lr) continues on its own schedule from the first step."""
        for sched in [self.scheduler] + ([self.sharded.scheduler] if self.sharded else []):
            groups = sched.optimizer.param_groups
            sched.base_lrs = list(sched.fresh_base_lrs)  # each group's base lr under this config (vlp/engine/optim.py)
            for group, base, fn in zip(groups, sched.base_lrs, sched.lr_lambdas):
                group["initial_lr"], group["lr"] = base, base * fn(sched.last_epoch)
            sched._last_lr = [group["lr"] for group in groups]

    def save(self) -> None:
        checkpoint.save(
            self.engine,
            self.run_dir,
            self.state.step,
            {"train_state": asdict(self.state), "data": dist.all_gather_object(self.data.state()),
             **self.client_state()},
            keep=self.cfg.run.keep_checkpoints,
            rank_state=self.rank_state(),
            sharded=self.sharded,
        )

    # hooks for subclasses (vlp/continual.py): more checkpointed state, global and per rank
    def client_state(self) -> Dict[str, Any]:
        """Extra state saved once (rank 0's copy is loaded on every rank)."""
        return {}

    def rank_state(self) -> Optional[Dict[str, Any]]:
        """Extra state saved per rank (``checkpoint.load`` returns it as ``client["rank_state"]``)."""
        return None

    def load_client_state(self, client: Dict[str, Any]) -> None:
        """Restore what ``client_state`` / ``rank_state`` saved."""

    # --- eval -----------------------------------------------------------------------
    def evaluate(self) -> Dict[str, float]:
        """The evaluators of ``eval.tasks`` on data.val (vlp/eval): every rank evaluates its share of
        the shards and the evaluators combine the ranks' results, so every rank returns them."""
        cfg = self.cfg
        if not cfg.data.val or not cfg.eval.tasks:
            return {}
        model = self._eval_model()
        with torch.no_grad():
            ctx = eval_context(cfg, model, self.tokenizer, self.eval_transform, self.device,
                               objective=self.objective)
            return run_tasks(cfg.eval.tasks, ctx)

    def _eval_model(self) -> torch.nn.Module:
        """The model to evaluate. Below ZeRO-3 the engine's module (evaluators switch it to eval
        mode and back). At ZeRO-3 its parameters are partitioned and every forward through it is a
        collective, which ranks with different numbers of eval batches cannot keep in step: the
        full weights are gathered once on every rank, and each rank evaluates a plain copy."""
        if self.engine.zero_optimization_stage() < 3:
            return self.engine.module
        weights = checkpoint.full_state_dict(self.engine)  # a collective: every rank
        if self.sharded is not None:
            weights.update(self.sharded.full_weights())  # the sharded heads whole, as create_model builds them
        saved = rng.state()  # building the copy draws init weights: keep the training RNG stream
        model = create_model(self.cfg.model, load_weights=False)
        rng.set_state(saved)
        model.load_state_dict(weights, strict=True)
        return model.to(self.device)

    # --- the loop -------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        try:
            with Preemption() as preemption:
                return self._fit(preemption)
        finally:
            self.data.close()

    def _fit(self, preemption: Preemption) -> Dict[str, Any]:
        cfg = self.cfg
        self.resume()
        state = self.state
        global_batch = cfg.data.batch_size * self.info.world_size
        bar = self._progress(state.step)
        t0, last_saved, bad_steps = time.time(), state.step, 0
        while state.step < cfg.optim.steps and (cfg.data.epochs is None or state.epoch < cfg.data.epochs):
            batch = self.next_batch()
            ended, preempted = self._agree(batch is None, preemption)
            if preempted:  # the batch just read is not trained on: the checkpoint's data position is before it
                return self._stop_preempted(preemption, last_saved, bar)
            if ended:
                self._end_epoch()
                continue
            self.data.consume(batch)
            state.skipped += int(batch.get("n_skipped", 0))
            losses = self.step_fn(batch, step=state.step)
            if losses.get("skipped_step"):
                bad_steps = self._skipped_step(bad_steps)
                continue
            bad_steps = 0
            state.step += 1
            state.samples += global_batch
            if state.step % cfg.logging.every_steps == 0 or state.step == cfg.optim.steps:
                t0 = self._log_step(losses, bar, t0)
            if cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0 and state.step < cfg.optim.steps:
                self._log_eval()
            if cfg.run.checkpoint_every and state.step % cfg.run.checkpoint_every == 0:
                self.save()
                last_saved = state.step
            if bar is not None:
                bar.update(1)
        if last_saved != state.step:
            self.save()
        final = self._log_eval()
        if bar is not None:
            bar.close()
        self.log.close()
        return {"step": state.step, "samples": state.samples, "epoch": state.epoch, **final}

    def _stop_preempted(self, preemption: Preemption, last_saved: int, bar) -> Dict[str, Any]:
        """Save the step just finished (every rank) and end the run cleanly: the job resumes from it."""
        if last_saved != self.state.step:
            self.save()
        if bar is not None:
            bar.close()
        self.log.close()
        if self.info.is_main:
            print(f"[vlp] preempted by {preemption.name()} at step {self.state.step}: saved "
                  f"{checkpoint.latest_tag(self.run_dir)}; rerun the same command to resume", flush=True)
        return {"step": self.state.step, "samples": self.state.samples, "preempted": True}

    def _skipped_step(self, bad_steps: int) -> int:
        """Log a step skipped for a non-finite loss; stop after too many in a row."""
        bad_steps += 1
        step = self.state.step + 1
        self.log.log({"step": step, "skipped_step": True, "consecutive_skips": bad_steps}, step=None)
        if self.info.is_main:
            print(f"[vlp] step {step}: non-finite loss, step skipped ({bad_steps} in a row)", flush=True)
        if bad_steps >= self.cfg.run.max_skipped_steps:
            raise TrainingDiverged(
                f"loss was not finite for {bad_steps} consecutive steps at step {step}; "
                f"stopping (last complete checkpoint: {checkpoint.latest_tag(self.run_dir)})"
            )
        return bad_steps

    def _progress(self, start: int):
        if not (self.info.is_main and self.cfg.logging.progress):
            return None
        return tqdm(total=self.cfg.optim.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def _log_step(self, losses: Dict[str, float], bar, t0: float) -> float:
        now = time.time()
        steps = self.cfg.logging.every_steps
        skipped = int(dist.all_reduce_sum(torch.tensor([self.state.skipped], device=self.device)).item())
        samples_per_s = steps * self.cfg.data.batch_size * self.info.world_size / max(now - t0, 1e-9)
        record = {
            "step": self.state.step,
            **losses,
            "lr": self.scheduler.get_last_lr()[0],
            "logit_scale": float(self._logit_scale()),
            "samples": self.state.samples,
            "samples_per_s": round(samples_per_s, 2),
            "skipped_samples": skipped,
            "epoch": self.state.epoch,
        }
        self.log.log(record, step=self.state.step)
        if bar is not None:
            bar.set_postfix(loss=f"{losses['loss']:.4f}", sps=f"{samples_per_s:.0f}", skipped=skipped)
        return now

    def _logit_scale(self) -> float:
        p = self.engine.module.logit_scale
        return p.exp().item() if p.numel() else float("nan")  # partitioned at ZeRO-3

    def _log_eval(self) -> Dict[str, float]:
        results = self.evaluate()
        if results:
            self.log.log({"step": self.state.step, **results}, step=self.state.step)
            if self.info.is_main:
                shown = ", ".join(f"{k}={v:.4f}" for k, v in results.items() if isinstance(v, float))
                print(f"[vlp] step {self.state.step}: {shown}", flush=True)
        return results


def _collective_failed(e: RuntimeError) -> bool:
    # gloo raises plain RuntimeErrors ("...gloo/transport/tcp/pair.cc... Connection reset by peer")
    text = str(e)
    return isinstance(e, torch.distributed.DistError) or any(
        s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out")
    )


def run(trainer: Trainer) -> Dict[str, Any]:
    """``trainer.fit()``, leaving the process group together; a failed collective becomes a PeerFailure."""
    cfg = trainer.cfg
    try:
        result = trainer.fit()
        dist.shutdown()
        return result
    except RuntimeError as e:
        # a dead peer surfaces here (connection closed, or the engine.timeout_s deadline);
        # the last complete checkpoint is untouched and the restarted job resumes from it
        if not _collective_failed(e):
            raise
        raise PeerFailure(
            f"rank {trainer.info.rank}: a collective failed, another rank died or did not answer within "
            f"engine.timeout_s={cfg.engine.timeout_s}s ({str(e).splitlines()[0][:200]}); "
            f"restart the job to resume from {checkpoint.latest_tag(cfg.run.dir)}"
        ) from None
