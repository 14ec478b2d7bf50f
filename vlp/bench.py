"""``vlp bench``: our code and the reference (open_clip) side by side, in one process.

``vlp bench step``: one training step (forward, loss, backward, AdamW step) of vlp's
trainer path (DeepSpeed engine + gradient-cache-ready Step + InfoNCE objective) against
a plain open_clip loop (CustomTextCLIP + ClipLoss + torch AdamW) on the same model
config and batch, fp32. Timings alternate between the two so that drift on a shared
machine hits both alike; the median over repeats is reported.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable, Dict

import torch

from vlp.engine.config import EngineConfig
from vlp.engine.optim import OptimConfig, build_optimizer
from vlp.models.factory import ModelConfig

BENCH_MODEL = ModelConfig(
    embed_dim=64,
    image={"name": "open_clip", "image_size": 32, "patch_size": 8, "width": 128, "layers": 3, "head_width": 32},
    text={"name": "open_clip", "context_length": 16, "width": 128, "heads": 4, "layers": 2},
)


def _batch(batch_size: int, context_length: int, image_size: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(batch_size, 3, image_size, image_size, generator=g),
        "text": torch.randint(1, 49407, (batch_size, context_length), generator=g),
    }


def _vlp_step(batch) -> Callable[[], None]:
    from vlp.engine import dist
    from vlp.engine.deepspeed_engine import build_engine, quiet_deepspeed
    from vlp.engine.step import Step
    from vlp.models import create_model
    from vlp.objectives import build_objective

    quiet_deepspeed()
    dist.init_distributed("gloo")
    torch.manual_seed(0)
    model = create_model(BENCH_MODEL)
    engine, _, _ = build_engine(model, EngineConfig(), OptimConfig(warmup_steps=0), len(batch["image"]))
    step = Step(engine, build_objective({"name": "infonce"}), torch.device("cpu"))
    return lambda: step(batch)


def _open_clip_step(batch) -> Callable[[], None]:
    import open_clip
    from open_clip.loss import ClipLoss

    from vlp.models.factory import open_clip_model_cfg

    torch.manual_seed(0)
    cfg = open_clip_model_cfg(BENCH_MODEL)
    cfg.pop("custom_text")
    model = open_clip.CustomTextCLIP(**cfg)
    opt_cfg = OptimConfig(warmup_steps=0)
    optimizer = build_optimizer(model, opt_cfg)
    loss_fn = ClipLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        img = model.encode_image(batch["image"], normalize=True)
        txt = model.encode_text(batch["text"], normalize=True)
        loss = loss_fn(img, txt, model.logit_scale.exp())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
        optimizer.step()

    return step


def _time(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_step(batch_size: int = 128, repeats: int = 20, warmup: int = 3) -> Dict[str, float]:
    txt_cfg, img_cfg = BENCH_MODEL.text, BENCH_MODEL.image
    batch = _batch(batch_size, txt_cfg["context_length"], img_cfg["image_size"])
    ours, ref = _vlp_step(batch), _open_clip_step(batch)
    for _ in range(warmup):
        ours(), ref()
    t_ours, t_ref = [], []
    for _ in range(repeats):
        t_ours.append(_time(ours))
        t_ref.append(_time(ref))
    vlp_s, ref_s = statistics.median(t_ours), statistics.median(t_ref)
    return {
        "batch_size": batch_size,
        "repeats": repeats,
        "vlp_step_s": round(vlp_s, 5),
        "open_clip_step_s": round(ref_s, 5),
        "vlp_samples_per_s": round(batch_size / vlp_s, 2),
        "open_clip_samples_per_s": round(batch_size / ref_s, 2),
        "ratio": round(ref_s / vlp_s, 4),
        "threads": torch.get_num_threads(),
    }


def _run_step(args) -> int:
    result = bench_step(args.batch_size, args.repeats)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"vlp {result['vlp_samples_per_s']:.1f} samples/s, open_clip {result['open_clip_samples_per_s']:.1f} "
            f"samples/s, ratio {result['ratio']:.3f} (batch {args.batch_size}, median of {args.repeats})"
        )
    return 0


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time vlp against open_clip in one process")
    bsub = p.add_subparsers(dest="bench", required=True)
    s = bsub.add_parser("step", help="one training step: vlp trainer vs a plain open_clip loop")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--repeats", type=int, default=20)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_run_step)
