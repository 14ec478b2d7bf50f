"""One-GPU check of the claims CPU tests cannot make (run through ``tools/gpu_check.sh``).

1. ViT-B/32 CLIP (open_clip's ``ViT-B-32`` config, random init, no download), bf16 weights, the
   vlp Step with the gradient cache at global batch 4096, under DeepSpeed ZeRO-1 and ZeRO-3 on one
   GPU: samples/s and peak memory over ``--steps`` timed steps after ``--warmup`` untimed ones.
2. The same model and batch in a plain open_clip loop (``torch.autocast`` bf16, ClipLoss, AdamW,
   clipping): samples/s. Should its batch not fit (no gradient cache there), it is halved until it
   does, and the batch it ran at is reported.
3. Tiled InfoNCE vs open_clip's ClipLoss at B = 65536 (``vlp bench loss``: time, peak memory,
   max |diff|).

Prints one JSON object; exits non-zero (with the error) when any part fails or a check is off.
``--dry-run``: the same code path on CPU (gloo, fp32) with the quickstart's tiny model, a few
steps at a small batch, and the loss at B = 1024: for the test suite.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from typing import Any, Callable, Dict

import torch

from vlp import dist
from vlp.commands.bench import bench_loss, bench_model, open_clip_model, open_clip_step
from vlp.engine.config import EngineConfig, GradCacheConfig
from vlp.engine.deepspeed_engine import build_engine, quiet_deepspeed
from vlp.engine.optim import OptimConfig
from vlp.engine.step import Step
from vlp.models import create_model
from vlp.models.factory import ModelConfig
from vlp.objectives import build_objective

GPU = {"model": "ViT-B-32", "batch": 4096, "chunk": 512, "steps": 20, "warmup": 3, "precision": "bf16",
       "loss_batch": 65536, "loss_dim": 512, "loss_tile": 4096, "loss_repeats": 3}
DRY = {"model": "tiny", "batch": 32, "chunk": 16, "steps": 2, "warmup": 1, "precision": "fp32",
       "loss_batch": 1024, "loss_dim": 64, "loss_tile": 256, "loss_repeats": 1}


def model_config(name: str) -> ModelConfig:
    return bench_model() if name == "tiny" else ModelConfig(open_clip=name)


def make_batch(cfg: ModelConfig, model: torch.nn.Module, n: int, device: torch.device, dtype: torch.dtype):
    """Random images and token ids at the model's input sizes (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    side = model.visual.image_size
    side = side[0] if isinstance(side, (tuple, list)) else side
    ctx = model.text.context_length if hasattr(model.text, "context_length") else model.context_length
    return {
        "image": torch.randn(n, 3, side, side, generator=g).to(device, dtype),
        "text": torch.randint(1, 49407, (n, ctx), generator=g).to(device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> Dict[str, float]:
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"step_s": round(seconds / steps, 4), "peak_gib": None if peak is None else round(peak, 2)}


def vlp_part(p: Dict, zero_stage: int, device: torch.device) -> Dict[str, Any]:
    """vlp's trainer path: DeepSpeed engine at ``zero_stage`` + gradient-cached Step + InfoNCE."""
    torch.manual_seed(0)
    cfg = model_config(p["model"])
    model = create_model(cfg).to(device)
    engine_cfg = EngineConfig(zero_stage=zero_stage, precision=p["precision"],
                              grad_cache=GradCacheConfig(p["chunk"]))
    engine, _, _ = build_engine(model, engine_cfg, OptimConfig(warmup_steps=0), p["batch"])
    dtype = torch.bfloat16 if p["precision"] == "bf16" else torch.float32
    batch = make_batch(cfg, engine.module, p["batch"], device, dtype)
    step = Step(engine, build_objective({"name": "infonce"}), device, p["chunk"])
    losses = []
    r = _timed(lambda: losses.append(step(batch)["loss"]), p["steps"], p["warmup"], device)
    if not all(torch.isfinite(torch.tensor(losses)).tolist()):
        raise RuntimeError(f"ZeRO-{zero_stage}: non-finite loss {losses}")
    if hasattr(engine, "destroy"):
        engine.destroy()  # ZeRO-3 hooks off before the next part
    return {**r, "samples_per_s": round(p["batch"] / r["step_s"], 1), "first_loss": round(losses[0], 4),
            "last_loss": round(losses[-1], 4), "zero_stage": zero_stage, "chunk": p["chunk"]}


def _open_clip_step(p: Dict, batch_size: int, device: torch.device) -> Callable[[], torch.Tensor]:
    model = open_clip_model(model_config(p["model"]), device)
    batch = make_batch(model_config(p["model"]), model, batch_size, device, torch.float32)
    return open_clip_step(model, batch, torch.bfloat16 if p["precision"] == "bf16" else None)


def open_clip_part(p: Dict, device: torch.device) -> Dict[str, Any]:
    """A plain open_clip loop on the same model and batch (halved while it does not fit)."""
    batch_size = p["batch"]
    while True:
        try:
            r = _timed(_open_clip_step(p, batch_size, device), p["steps"], p["warmup"], device)
            break
        except torch.OutOfMemoryError:
            pass
        gc.collect()  # outside the except block: its traceback no longer holds the tensors
        torch.cuda.empty_cache()
        if batch_size <= 64:
            raise RuntimeError(f"open_clip loop: out of memory even at batch {batch_size}")
        batch_size //= 2
    return {**r, "samples_per_s": round(batch_size / r["step_s"], 1), "batch": batch_size,
            "autocast_bf16": p["precision"] == "bf16"}


def loss_part(p: Dict, device: torch.device) -> Dict[str, Any]:
    return bench_loss(p["loss_batch"], p["loss_dim"], p["loss_repeats"], p["loss_tile"], str(device))


def check(p: Dict, dry_run: bool) -> Dict[str, Any]:
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (use --dry-run for the CPU path)")
    quiet_deepspeed()
    dist.init_distributed("gloo" if dry_run else "auto")
    device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
    t0 = time.perf_counter()
    out: Dict[str, Any] = {"dry_run": dry_run, "device": str(device), "settings": p,
                           "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}
    parts = out["part_s"] = {}

    def part(name: str, fn: Callable[[], Dict[str, Any]]) -> None:
        t = time.perf_counter()
        out[name] = fn()
        parts[name] = round(time.perf_counter() - t, 1)
        gc.collect()  # the part's engine and model (DeepSpeed holds reference cycles)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    part("zero1", lambda: vlp_part(p, 1, device))
    part("zero3", lambda: vlp_part(p, 3, device))
    part("open_clip", lambda: open_clip_part(p, device))
    out["speed_ratio_zero1"] = round(out["zero1"]["samples_per_s"] / out["open_clip"]["samples_per_s"], 3)
    out["speed_ratio_zero3"] = round(out["zero3"]["samples_per_s"] / out["open_clip"]["samples_per_s"], 3)
    part("loss", lambda: loss_part(p, device))
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def failures(r: Dict[str, Any]) -> list:
    """The checks a GPU run must pass (loud: each failing one is named)."""
    bad = []
    if r["loss"]["max_abs_diff"] > 1e-4:
        bad.append(f"tiled InfoNCE max |diff| {r['loss']['max_abs_diff']} > 1e-4")
    if r["loss"]["memory_ratio"] > 0.25:
        bad.append(f"tiled InfoNCE memory ratio {r['loss']['memory_ratio']} > 0.25")
    for k in ("zero1", "zero3"):
        if not r[k]["samples_per_s"] > 0:
            bad.append(f"{k}: no throughput")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, gloo, fp32, tiny model, few steps, small batch")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default 20; dry run 2)")
    ap.add_argument("--batch", type=int, default=0, help="global batch (default 4096; dry run 32)")
    ap.add_argument("--chunk", type=int, default=0, help="gradient-cache chunk (default 512; dry run 16)")
    ap.add_argument("--loss-batch", type=int, default=0, help="InfoNCE benchmark rows (default 65536; dry run 1024)")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args(argv)
    p = dict(DRY if args.dry_run else GPU)
    for key in ("steps", "batch", "chunk", "loss_batch"):
        if getattr(args, key):
            p[key] = getattr(args, key)
    try:
        r = check(p, args.dry_run)
    except Exception:  # loud: the whole traceback, exit 1
        traceback.print_exc()
        print("gpu_check: FAILED", file=sys.stderr)
        return 1
    r["failures"] = failures(r)
    text = json.dumps(r)
    print(text, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if r["failures"]:
        print("gpu_check: FAILED: " + "; ".join(r["failures"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
