"""Atomic, rank-aware, self-verifying checkpoints on top of DeepSpeed's (loading a finished run
for eval/export: ``vlp/runs.py``).

Layout of ``RUN_DIR/checkpoints``::

    step_00000100/            DeepSpeed files (sharded per rank at ZeRO>0),
                              rng_rank{r}.pt per rank, model.safetensors (full weights),
                              heads_rank{r}.pt per rank with sharded heads (vlp/engine/sharded.py),
                              vlp.json (world size, ZeRO stage, step, and every file's size and sha256)
    latest                    text file naming the newest *complete* tag

A checkpoint is written under ``step_N.tmp`` and renamed to ``step_N`` by rank 0 only
after every rank has finished writing (barrier) and ``vlp.json`` has been written last,
then ``latest`` is replaced atomically. A crash at any point leaves either the previous
complete checkpoint or the new one behind ``latest``, never a partial one; stale ``*.tmp``
folders are removed at the next start. A failed write on any rank (disk full, permission:
an OSError, torch.save's RuntimeError, safetensors' error) removes the partial folder and ends
the run on every rank with ``CheckpointWriteFailed``; ``latest`` still names the previous
checkpoint.

Verification: ``vlp.json`` records the size and sha256 of every file of the checkpoint
(hashed in parallel: the files are split over the ranks, several threads each). Loading
checks them first: a resume from a damaged ``latest`` warns in one line and falls back to the
newest intact checkpoint (``CheckpointDamaged`` when none is); eval, export and clustering
check the files they read (``verify``). A checkpoint without the record (written before it
existed, or a hand-made one) loads unverified.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import pickle
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as tdist
from safetensors import SafetensorError
from safetensors.torch import save_file

from vlp import dist, rng
from vlp.errors import CheckpointDamaged, CheckpointWriteFailed

MODEL_FILE = "model.safetensors"
META_FILE = "vlp.json"  # world size, ZeRO stage, step, and the files' sizes and checksums; written last
FILES_KEY = "files"  # in META_FILE: {relative path: {"size": bytes, "sha256": hex digest}}
HASH_THREADS = 4  # files hashed at once on each rank (hashlib releases the GIL)
_CHUNK = 8 << 20


def ckpt_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def tags(run_dir: str) -> List[str]:
    """The complete checkpoints of ``run_dir`` (``step_N`` folders), oldest first."""
    root = ckpt_dir(run_dir)
    if not os.path.isdir(root):
        return []
    return sorted(p for p in os.listdir(root)
                  if p.startswith("step_") and not p.endswith(".tmp") and os.path.isdir(os.path.join(root, p)))


def latest_tag(run_dir: str) -> Optional[str]:
    """The tag ``latest`` names; when that file is missing or names no folder, the newest ``step_N``
    folder (a folder is renamed to ``step_N`` only once complete); None without checkpoints."""
    path = os.path.join(ckpt_dir(run_dir), "latest")
    if os.path.isfile(path):
        with open(path, errors="replace") as f:  # a damaged `latest` names no folder
            tag = f.read().strip()
        if tag and os.path.isdir(os.path.join(ckpt_dir(run_dir), tag)):
            return tag
    found = tags(run_dir)
    return found[-1] if found else None


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


# ---- checksums -------------------------------------------------------------------------


def sha256(path: str) -> str:
    """The hex sha256 of the file at ``path``, read in 8 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _share(sizes: Dict[str, int], rank: int, world: int) -> List[str]:
    """The files rank ``rank`` hashes: the largest first, each to the least loaded rank (the same
    split on every rank)."""
    load, mine = [0] * world, []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = load.index(min(load))
        load[r] += sizes[name] or 1
        if r == rank:
            mine.append(name)
    return mine


def _hash_all(folder: str, names: Sequence[str]) -> List[str]:
    if not names:
        return []
    with ThreadPoolExecutor(min(HASH_THREADS, len(names))) as pool:
        return list(pool.map(lambda n: sha256(os.path.join(folder, n)), names))


def _listing(folder: str) -> Dict[str, int]:
    """{relative path: size} of every file under ``folder`` but META_FILE."""
    out = {}
    for top, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(top, name), folder)
            if rel != META_FILE:
                out[rel] = os.path.getsize(os.path.join(folder, rel))
    return out


def describe(folder: str) -> Dict[str, Dict[str, Any]]:
    """This rank's share of ``{file: {"size", "sha256"}}`` of ``folder`` (every rank together: all).
    A collective: rank 0 lists the folder for all (one listing, one split, on any file system);
    OSError on every rank when it cannot."""
    listing, problem = None, None
    if dist.rank() == 0:
        try:
            listing = _listing(folder)
        except OSError as e:
            problem = _one_line(e)
    listing, problem = dist.broadcast_object((listing, problem))
    if problem:
        raise OSError(problem)
    mine = _share(listing, dist.rank(), dist.world_size())
    digests = _hash_all(folder, mine)
    return {n: {"size": os.path.getsize(os.path.join(folder, n)), "sha256": d} for n, d in zip(mine, digests)}


def _read_record(folder: str) -> Tuple[Optional[Dict[str, Dict[str, Any]]], Optional[str]]:
    """(the files ``folder``'s META_FILE records or None without a record, what is wrong with the record)."""
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        return None, None
    try:
        with open(path) as f:
            files = json.load(f).get(FILES_KEY)
        if files is not None and not all(isinstance(v, dict) and {"size", "sha256"} <= set(v) for v in files.values()):
            raise ValueError(f"malformed {FILES_KEY!r}")
    except (OSError, ValueError, AttributeError) as e:
        return None, f"{META_FILE} is unreadable ({_one_line(e)})"
    return files, None


def recorded(folder: str) -> Optional[Dict[str, Dict[str, Any]]]:
    """The files ``folder``'s META_FILE records, or None for a checkpoint without a record."""
    files, problem = _read_record(folder)
    if problem:
        raise CheckpointDamaged(f"checkpoint {folder} is damaged: {problem}")
    return files


def _problem(folder: str, files: Dict[str, Dict[str, Any]], hashed: Sequence[str]) -> Optional[str]:
    """What is wrong with ``folder``: any recorded file missing or of another size, or one of ``hashed``
    with another checksum; None when nothing."""
    for name in sorted(files):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        size = os.path.getsize(path)
        if size != files[name]["size"]:
            return f"{name} is {size} bytes, {files[name]['size']} when saved"
    for name, digest in zip(hashed, _hash_all(folder, hashed)):
        if digest != files[name]["sha256"]:
            return f"{name} does not match the sha256 recorded when it was saved"
    return None


def verify(folder: str, names: Optional[Sequence[str]] = None) -> None:
    """Check the files ``names`` (default: all) of checkpoint ``folder`` against its record, in this
    process; ``CheckpointDamaged`` names the first bad file. No record: nothing to check."""
    files = recorded(folder)
    if files is None:
        return
    if names is not None:
        unknown = [n for n in names if n not in files]
        if unknown:
            raise CheckpointDamaged(f"checkpoint {folder} is damaged: {unknown[0]} is not in its {META_FILE}")
        files = {n: files[n] for n in names}
    problem = _problem(folder, files, sorted(files))
    if problem:
        raise CheckpointDamaged(f"checkpoint {folder} is damaged: {problem}")


def _damage(run_dir: str, tag: str) -> Optional[str]:
    """What is wrong with checkpoint ``tag``, the same answer on every rank (a collective: each rank
    hashes its share of the files); None when it is intact or has no record."""
    folder = os.path.join(ckpt_dir(run_dir), tag)
    files, problem = _read_record(folder)
    if files and not problem:
        try:
            problem = _problem(folder, files, _share({n: f["size"] for n, f in files.items()},
                                                     dist.rank(), dist.world_size()))
        except OSError as e:
            problem = _one_line(e)
    found = [p for p in dist.all_gather_object(problem) if p]
    return found[0] if found else None


# ---- save ----------------------------------------------------------------------------------


def _retrace(engine) -> None:
    """ZeRO-3 prefetches parameters along a trace of the module order recorded in the first steps. In a
    run resumed from a checkpoint, a save left that trace stale: the next backward failed with DeepSpeed's
    "tracing error ... expected the next N parameters in the parameter fetch queue" (2 ranks, tested in
    tests/test_exact_resume.py). Invalidated after every save, it is recorded again on the next step."""
    if engine.zero_optimization_stage() == 3:
        coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
        if not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()


def save(engine, run_dir: str, step: int, client_state: Dict[str, Any], keep: int = 2,
         rank_state: Optional[Dict[str, Any]] = None, sharded=None) -> str:
    """``client_state`` is saved once (rank 0's model file) and loaded on every rank;
    ``rank_state`` (e.g. a replay buffer filled from this rank's data) once per rank;
    ``sharded`` (``ShardedHeads``) each rank's rows, and whole in model.safetensors.
    ``CheckpointWriteFailed`` (every rank) when a write fails: the partial folder is removed."""
    root = ckpt_dir(run_dir)
    tag = f"step_{step:08d}"
    tmp = f"{tag}.tmp"
    folder = os.path.join(root, tmp)
    error = None
    if dist.rank() == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
        except OSError as e:
            error = e
    _agree(error, run_dir, tag, folder)  # also the barrier before DeepSpeed writes into the folder
    error = _deepspeed_save(engine, root, tmp, client_state)
    weights = full_state_dict(engine)  # a collective at ZeRO-3: every rank, failed or not
    _retrace(engine)
    if sharded is not None:
        weights.update(sharded.full_weights())  # a collective
    if error is None:
        try:
            torch.save(rng.state(), os.path.join(folder, f"rng_rank{dist.rank()}.pt"))
            if sharded is not None:
                sharded.save(folder)
            if rank_state is not None:
                torch.save(rank_state, os.path.join(folder, f"client_rank{dist.rank()}.pt"))
            if dist.rank() == 0:
                save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(folder, MODEL_FILE))
        except WRITE_ERRORS as e:
            error = _write_error(e)
    _agree(error, run_dir, tag, folder)  # every rank's files are on disk (or the save failed everywhere)
    files = {}
    try:
        files = describe(folder)
    except OSError as e:
        error = e
    _agree(error, run_dir, tag, folder)
    shares = dist.all_gather_object(files)
    error = None
    if dist.rank() == 0:
        meta = {"world_size": dist.world_size(), "zero_stage": engine.zero_optimization_stage(), "step": step,
                FILES_KEY: dict(sorted((k, v) for share in shares for k, v in share.items()))}
        try:
            _write_atomic(os.path.join(folder, META_FILE), json.dumps(meta, indent=1))  # last: the record
            shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
            os.replace(folder, os.path.join(root, tag))
            _write_atomic(os.path.join(root, "latest"), tag)
        except OSError as e:
            error = e
            if not os.path.isdir(folder):  # renamed already: only `latest` failed; the older one stays latest
                shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
        if error is None:
            _prune(root, keep, tag)
    _agree(error, run_dir, tag, folder)
    return tag


def _deepspeed_save(engine, root: str, tag: str, client_state: Dict[str, Any]) -> Optional[BaseException]:
    """``engine.save_checkpoint`` into ``root/tag``; the error of a failed write, or None.

    DeepSpeed's save has collectives between its writes (ZeRO-3 gathers state for its files) and
    ends with a barrier; a rank whose write raised would skip them and leave the others waiting.
    So each file write (DeepSpeed's checkpoint engine) that fails is recorded and the rank's later
    writes are skipped, while the save's collectives go on in step on every rank. A failure outside
    those writes (its recovery script, rank 0) can only skip the final barrier: taken here instead."""
    failed: List[BaseException] = []
    write = engine.checkpoint_engine.save

    def write_or_record(*args, **kwargs):
        if failed:
            return None
        try:
            return write(*args, **kwargs)
        except WRITE_ERRORS as e:
            failed.append(_write_error(e))
            return None

    ckpt_engine = engine.checkpoint_engine
    own = vars(ckpt_engine).get("save")  # None: the class's method
    ckpt_engine.save = write_or_record
    try:
        engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    except WRITE_ERRORS as e:
        failed.append(_write_error(e))
        dist.barrier()
    finally:
        if own is None:
            del ckpt_engine.save
        else:
            ckpt_engine.save = own
    return failed[0] if failed else None


def _agree(error: Optional[BaseException], run_dir: str, tag: str, folder: str) -> None:
    """A collective: when any rank's ``error`` is set, rank 0 removes ``folder`` and every rank raises
    CheckpointWriteFailed with the first one."""
    errors = [e for e in dist.all_gather_object(None if error is None else _one_line(error)) if e]
    if not errors:
        return
    if dist.rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)
    previous = latest_tag(run_dir)
    kept = f"{previous} is still the latest checkpoint" if previous else "the run has no checkpoint"
    raise CheckpointWriteFailed(f"could not write checkpoint {tag}: {errors[0]}; {kept}")


# what a failed write raises: OSError (open, fsync), torch.save's RuntimeError ("PytorchStreamWriter failed
# writing file ..." on a full disk, "cannot be opened" without permission), safetensors' SafetensorError
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def _write_error(e: BaseException) -> BaseException:
    """``e`` when it is a failed write; a failed collective is raised again (the trainer reports a dead peer)."""
    if _collective_failure(e):
        raise e
    return e


def _collective_failure(e: BaseException) -> bool:
    return isinstance(e, tdist.DistError) or any(s in str(e) for s in ("gloo", "NCCL", "Connection", "timed out"))


def _one_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _prune(root: str, keep: int, newest: str) -> None:
    """Keep the ``keep`` newest checkpoints up to ``newest``; later ones (of a timeline abandoned by a
    fallback or a fresh start) are left alone."""
    found = sorted(p for p in os.listdir(root) if p.startswith("step_") and not p.endswith(".tmp") and p <= newest)
    for tag in found[: max(0, len(found) - keep)]:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
        shutil.rmtree(os.path.join(root, f"universal_{tag}"), ignore_errors=True)


# ---- load ----------------------------------------------------------------------------------


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


def intact_tag(run_dir: str, tag: str) -> str:
    """``tag`` when intact; when it is ``run_dir``'s latest but damaged, the newest intact checkpoint
    before it, after a one-line warning on rank 0 (a collective). ``CheckpointDamaged`` when none is."""
    fallback = tag == latest_tag(run_dir)
    candidates = [tag] + ([t for t in reversed(tags(run_dir)) if t < tag] if fallback else [])
    damaged = []
    for candidate in candidates:
        problem = _damage(run_dir, candidate)
        if problem is None:
            if damaged and dist.rank() == 0:
                print(f"[vlp] warning: checkpoint {damaged[0][0]} is damaged ({damaged[0][1]})"
                      + (f", and so are {', '.join(t for t, _ in damaged[1:])}" if len(damaged) > 1 else "")
                      + f"; resuming from {candidate}, the newest intact checkpoint", file=sys.stderr, flush=True)
            return candidate
        damaged.append((candidate, problem))
    where = os.path.join(ckpt_dir(run_dir), tag)
    others = f"; no intact checkpoint before it ({len(damaged) - 1} damaged too)" if fallback else ""
    raise CheckpointDamaged(f"checkpoint {where} is damaged: {damaged[0][1]}{others}")


def load(engine, run_dir: str, tag: Optional[str] = None, sharded=None) -> Optional[Dict[str, Any]]:
    """Restore engine (model, optimizer, scheduler), ``sharded`` heads (re-sharded on another number
    of ranks) and RNG from ``tag`` (default ``latest``) of ``run_dir``, verified first (``intact_tag``:
    a damaged latest falls back to the newest intact checkpoint); its client state, or None when the
    run has no checkpoint."""
    tag = tag or latest_tag(run_dir)
    if tag is None:
        return None
    tag = intact_tag(run_dir, tag)
    folder = os.path.join(ckpt_dir(run_dir), tag)  # the universal copy below holds DeepSpeed's files only
    saved = _saved_world_size(run_dir, tag)
    universal = saved != dist.world_size() and engine.zero_optimization_stage() > 0
    if universal:  # ZeRO partitions the optimizer per rank: re-partition via DeepSpeed's universal format
        tag = _to_universal(run_dir, tag)
    engine._config.load_universal_checkpoint = universal  # DeepSpeed reads it at load time only
    try:
        path, client_state = engine.load_checkpoint(
            ckpt_dir(run_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {ckpt_dir(run_dir)}")
        if sharded is not None:
            sharded.load(folder)
        rng_file = os.path.join(ckpt_dir(run_dir), tag, f"rng_rank{dist.rank()}.pt")
        if os.path.isfile(rng_file):  # absent when resuming with more ranks than were saved
            rng.set_state(torch.load(rng_file, weights_only=False))
        own = os.path.join(ckpt_dir(run_dir), tag, f"client_rank{dist.rank()}.pt")
        if os.path.isfile(own):  # save(rank_state=...); absent like the RNG file above
            client_state = {**(client_state or {}), "rank_state": torch.load(own, weights_only=False)}
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        # an unrecorded checkpoint's damaged file, or one of another model: one line, not a traceback
        if _collective_failure(e):
            raise  # the trainer reports a dead peer
        raise ValueError(f"cannot resume from checkpoint {os.path.join(ckpt_dir(run_dir), tag)}: "
                         f"{_one_line(e)}") from None
    finally:
        engine._config.load_universal_checkpoint = False
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
