"""Atomic, rank-aware checkpoints on top of DeepSpeed's (loading a finished run for eval/export: ``vlp/runs.py``).

Layout of ``RUN_DIR/checkpoints``::

    step_00000100/            DeepSpeed files (sharded per rank at ZeRO>0),
                              rng_rank{r}.pt per rank, model.safetensors (full weights)
    latest                    text file naming the newest *complete* tag

A checkpoint is written under ``step_N.tmp`` and renamed to ``step_N`` by rank 0 only
after every rank has finished writing (barrier), then ``latest`` is replaced
atomically. A crash at any point leaves either the previous complete checkpoint or the
new one behind ``latest``, never a partial one; stale ``*.tmp`` folders are removed at
the next start.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors.torch import save_file

from vlp import dist, rng

MODEL_FILE = "model.safetensors"
META_FILE = "vlp.json"  # world size and ZeRO stage the checkpoint was written with


def ckpt_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def latest_tag(run_dir: str) -> Optional[str]:
    path = os.path.join(ckpt_dir(run_dir), "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    return tag if os.path.isdir(os.path.join(ckpt_dir(run_dir), tag)) else None


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def clean_partial(run_dir: str) -> None:
    """Remove ``*.tmp`` checkpoint folders left by a crash (rank 0)."""
    if dist.rank() == 0:
        for path in glob.glob(os.path.join(ckpt_dir(run_dir), "*.tmp")):
            shutil.rmtree(path, ignore_errors=True)
    dist.barrier()


def full_state_dict(engine) -> Dict[str, torch.Tensor]:
    """The whole module state dict on every rank (gathers partitioned ZeRO-3 params)."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save(engine, run_dir: str, step: int, client_state: Dict[str, Any], keep: int = 2,
         rank_state: Optional[Dict[str, Any]] = None) -> str:
    """``client_state`` is saved once (rank 0's model file) and loaded on every rank;
    ``rank_state`` (e.g. a replay buffer filled from this rank's data) once per rank."""
    root = ckpt_dir(run_dir)
    tag = f"step_{step:08d}"
    tmp = f"{tag}.tmp"
    if dist.rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(os.path.join(root, tmp), ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(root, tag=tmp, client_state=client_state, save_latest=False)
    weights = full_state_dict(engine)
    torch.save(rng.state(), os.path.join(root, tmp, f"rng_rank{dist.rank()}.pt"))
    if rank_state is not None:
        torch.save(rank_state, os.path.join(root, tmp, f"client_rank{dist.rank()}.pt"))
    if dist.rank() == 0:
        meta = {"world_size": dist.world_size(), "zero_stage": engine.zero_optimization_stage(), "step": step}
        with open(os.path.join(root, tmp, META_FILE), "w") as f:
            json.dump(meta, f)
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(root, tmp, MODEL_FILE))
    dist.barrier()  # every rank's shard is on disk before the checkpoint becomes visible
    if dist.rank() == 0:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
        os.replace(os.path.join(root, tmp), os.path.join(root, tag))
        _write_atomic(os.path.join(root, "latest"), tag)
        _prune(root, keep)
    dist.barrier()
    return tag


def _prune(root: str, keep: int) -> None:
    tags = sorted(p for p in os.listdir(root) if p.startswith("step_") and not p.endswith(".tmp"))
    for tag in tags[: max(0, len(tags) - keep)]:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
        shutil.rmtree(os.path.join(root, f"universal_{tag}"), ignore_errors=True)


def source(path: str) -> Tuple[str, str]:
    """(run dir, tag) of a checkpoint given as a run dir (its ``latest``) or as one checkpoint
    folder (``RUN/checkpoints/step_N``)."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, META_FILE)) or os.path.isfile(os.path.join(path, MODEL_FILE)):
        return os.path.dirname(os.path.dirname(path)), os.path.basename(path)
    tag = latest_tag(path)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {path} (expected checkpoints/latest or a step_N folder)")
    return path, tag


def load(engine, run_dir: str, tag: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Restore engine (model, optimizer, scheduler) and RNG from ``tag`` (default ``latest``) of
    ``run_dir``; its client state, or None when the run has no checkpoint."""
    tag = tag or latest_tag(run_dir)
    if tag is None:
        return None
    saved = _saved_world_size(run_dir, tag)
    universal = saved != dist.world_size() and engine.zero_optimization_stage() > 0
    if universal:  # ZeRO partitions the optimizer per rank: re-partition via DeepSpeed's universal format
        tag = _to_universal(run_dir, tag)
    engine._config.load_universal_checkpoint = universal  # DeepSpeed reads it at load time only
    try:
        path, client_state = engine.load_checkpoint(
            ckpt_dir(run_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {ckpt_dir(run_dir)}")
    rng_file = os.path.join(ckpt_dir(run_dir), tag, f"rng_rank{dist.rank()}.pt")
    if os.path.isfile(rng_file):  # absent when resuming with more ranks than were saved
        rng.set_state(torch.load(rng_file, weights_only=False))
    own = os.path.join(ckpt_dir(run_dir), tag, f"client_rank{dist.rank()}.pt")
    if os.path.isfile(own):  # save(rank_state=...); absent like the RNG file above
        client_state = {**(client_state or {}), "rank_state": torch.load(own, weights_only=False)}
    return client_state


def _saved_world_size(run_dir: str, tag: str) -> int:
    path = os.path.join(ckpt_dir(run_dir), tag, META_FILE)
    if not os.path.isfile(path):
        return dist.world_size()
    with open(path) as f:
        return int(json.load(f)["world_size"])


def _to_universal(run_dir: str, tag: str) -> str:
    """Convert ``tag`` to DeepSpeed's universal checkpoint once (rank 0); its tag."""
    root = ckpt_dir(run_dir)
    out = f"universal_{tag}"
    if dist.rank() == 0 and not os.path.isdir(os.path.join(root, out)):
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = os.path.join(root, f"{out}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            ds_to_universal(argparse.Namespace(
                input_folder=os.path.join(root, tag), output_folder=tmp, num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
            ))
        except Exception as e:  # noqa: BLE001 - report DeepSpeed's reason in one line
            raise RuntimeError(
                f"cannot resume {tag} (saved with {_saved_world_size(run_dir, tag)} ranks) on "
                f"{dist.world_size()} ranks: DeepSpeed's universal conversion failed: {e}"
            ) from None
        os.replace(tmp, os.path.join(root, out))
    dist.barrier()
    return out
