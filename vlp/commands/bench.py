"""``vlp bench``: our code and the reference (open_clip) side by side, in one process.

``vlp bench step``: one training step (forward, loss, backward, AdamW step) of vlp's
trainer path (DeepSpeed engine + gradient-cache-ready Step + InfoNCE objective) against
a plain open_clip loop (CustomTextCLIP + ClipLoss + torch AdamW) on the same model
config and batch, fp32. Timings alternate between the two so that drift on a shared
machine hits both alike; the median over repeats is reported.

``vlp bench loss``: forward+backward of InfoNCE alone, vlp's tiled loss against
open_clip's ``ClipLoss`` on the same random unit-norm features (fp32), timed alternately
in one process; the peak memory of each is measured in a fresh child process.

``vlp bench loss --no-reference``: vlp's loss alone (time and peak), for batches where
ClipLoss's two B x B logits do not fit (B = 32768: 8 GiB of fp32 logits before its gradients).

``vlp bench gradcache``: the gradient-cached ``Step`` (DeepSpeed engine, tiny model) at
growing global batch with a fixed chunk: peak memory and step time per batch, plus the
time of a cached step relative to an uncached one at the same batch.

``vlp bench mlcd``: the MLCD cluster head (K x D) in training steps of the ``mlcd`` objective on
W = 1 and 2 gloo ranks (torchrun children), sharded (``sharded: true``, each rank's K/W rows and
their AdamW state outside DeepSpeed) against the replicated head partitioned by ZeRO-3; per
rank the peak memory over the timed steps (above the RSS before the model was built) and the
median step time. The model is the head over one linear layer on random features, so the head
is what is measured.

``vlp bench e2e``: the whole training job of a recipe (default the CLIP quickstart), built
in-process as ``vlp train`` builds it (real loader and workers, logging, checkpoints; eval
off unless ``--eval``), ``Trainer.fit()`` for ``--steps`` steps, then the same number of
``trainer.step_fn`` calls on one preloaded batch; the share of the job's wall time that is not
the model step, with the trainer's own phases timed (waiting for data, logging, checkpoints).

Memory method. On CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated bytes
before the call. On CPU: the process RSS high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) minus the RSS just before the call, in a child started with
glibc's mmap/trim thresholds fixed at 128 KiB: otherwise glibc keeps freed blocks and a
warmed-up process reuses them without RSS moving, so a later call would read ~0 MB.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence

import open_clip
import torch
from open_clip.loss import ClipLoss

from vlp import dist
from vlp.config import check_run, load_config
from vlp.data.digits import write_digits
from vlp.engine.config import EngineConfig, GradCacheConfig
from vlp.engine.deepspeed_engine import build_engine, quiet_deepspeed
from vlp.engine.optim import OptimConfig, build_optimizer
from vlp.engine.sharded import ShardedHeads
from vlp.engine.step import Step
from vlp.models import create_model
from vlp.models.cluster_head import ClusterHead, ClusterHeadConfig
from vlp.models.factory import ModelConfig, open_clip_model_cfg
from vlp.objectives import build_objective
from vlp.train import Trainer


def bench_model():
    """The quickstart's tiny CLIP."""
    return ModelConfig(
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


def _vlp_step(batch, chunk_size: int = 0) -> Callable[[], None]:
    quiet_deepspeed()
    dist.init_distributed("gloo")
    torch.manual_seed(0)
    model = create_model(bench_model())
    engine_cfg = EngineConfig(grad_cache=GradCacheConfig(chunk_size))
    engine, _, _ = build_engine(model, engine_cfg, OptimConfig(warmup_steps=0), len(batch["image"]))
    step = Step(engine, build_objective({"name": "infonce"}), torch.device("cpu"), chunk_size)
    return lambda: step(batch)


def open_clip_model(cfg: ModelConfig, device: torch.device = torch.device("cpu")) -> torch.nn.Module:
    """open_clip's own CLIP of ``cfg`` (its CustomTextCLIP, seed 0): the reference model."""
    torch.manual_seed(0)
    oc_cfg = open_clip_model_cfg(cfg)
    oc_cfg.pop("custom_text")
    return open_clip.CustomTextCLIP(**oc_cfg).to(device)


def open_clip_step(model: torch.nn.Module, batch: Dict[str, torch.Tensor],
                   autocast: Optional[torch.dtype] = None) -> Callable[[], torch.Tensor]:
    """A plain open_clip training step (ClipLoss, vlp's AdamW groups, clip 1.0; autocast to ``autocast``
    when given, as open_clip_train's amp): the loop vlp's step is compared with."""
    opt_cfg = OptimConfig(warmup_steps=0)
    optimizer = build_optimizer(model, opt_cfg)
    loss_fn = ClipLoss()
    device = batch["image"].device

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            img = model.encode_image(batch["image"], normalize=True)
            txt = model.encode_text(batch["text"], normalize=True)
            loss = loss_fn(img, txt, model.logit_scale.exp())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
        optimizer.step()
        return loss.detach()

    return step


def _time(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_step(batch_size: int = 128, repeats: int = 20, warmup: int = 3) -> Dict[str, float]:
    txt_cfg, img_cfg = bench_model().text, bench_model().image
    batch = _batch(batch_size, txt_cfg["context_length"], img_cfg["image_size"])
    ours, ref = _vlp_step(batch), open_clip_step(open_clip_model(bench_model()), batch)
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


def _at_least(args, low: int, *names: str) -> None:
    """Bad option values as one-line errors before any work (``--batch-size 0``)."""
    for name in names:
        value = getattr(args, name)
        if value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def _run_step(args) -> int:
    _at_least(args, 1, "batch_size", "repeats")
    result = bench_step(args.batch_size, args.repeats)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"vlp {result['vlp_samples_per_s']:.1f} samples/s, open_clip {result['open_clip_samples_per_s']:.1f} "
            f"samples/s, ratio {result['ratio']:.3f} (batch {args.batch_size}, median of {args.repeats})"
        )
    return 0


# ---- memory: one call's peak, in a fresh child process ----------------------------------

_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}  # see module doc
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def _peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Extra memory at the peak of ``fn()`` over what was live before it (module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:  # not Linux: the lifetime high-water mark, a lower bound if imports peaked higher
        import resource

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KiB on Linux
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / scale
    base = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - base) / 1024


def _in_child(spec: Dict) -> Dict:
    """Run ``_child(spec)`` in a fresh interpreter (own high-water mark) and return its dict."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}  # a 1-process child
    code = "import sys; from vlp.commands.bench import _child_main; _child_main(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env={**env, **_CHILD_ENV},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {spec} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _in_children(specs: List[Dict], workers: int = 3) -> List[Dict]:
    """Children run side by side: each measures its own high-water mark, so they may overlap."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(_in_child, specs))


def _child(spec: Dict) -> Dict:
    kind = spec.pop("kind")
    return {"loss": _loss_child, "gradcache": _gradcache_child}[kind](**spec)


def _child_main(spec_json: str) -> None:
    print(json.dumps(_child(json.loads(spec_json))), flush=True)
    os._exit(0)  # skip interpreter and process-group teardown (~2 s): the result is out


def _sync_time(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def _alternate(fns: Dict[str, Callable[[], object]], repeats: int, device: torch.device) -> Dict[str, float]:
    """Median seconds of each fn, timed in turn so that machine drift hits all alike."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_sync_time(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


# ---- bench loss: tiled InfoNCE vs open_clip's ClipLoss ------------------------------------


def _unit_inputs(batch: int, dim: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1) for _ in range(2))
    scale = torch.tensor([1 / 0.07])
    return tuple(t.to(device).requires_grad_(True) for t in (x, y, scale))  # (N, D), (N, D), (1,)


def _loss_fn(impl: str, tile_size: int, keep_mb: float = 0.0) -> Callable:
    if impl == "open_clip":
        return ClipLoss()
    ours = build_objective({"name": "infonce", "tile_above": 0, "tile_size": tile_size,  # always tiled
                            "tile_keep_mb": keep_mb})
    return lambda x, y, s: ours.cross_sample({"image": x, "text": y}, {"logit_scale": s})["loss"]


def _fwd_bwd(loss_fn: Callable, x, y, scale):
    loss = loss_fn(x, y, scale)
    return (loss.detach(), *torch.autograd.grad(loss, (x, y, scale)))  # loss, dx, dy, ds


def _loss_child(impl: str, batch: int, dim: int, tile_size: int, device: str, keep_mb: float = 0.0) -> Dict:
    dev = torch.device(device)
    fn = _loss_fn(impl, tile_size, keep_mb)
    # libraries' one-time buffers (and the tiled loss's compiled tile kernels) outside the measurement
    _fwd_bwd(fn, *_unit_inputs(batch if impl == "vlp" else 64, dim, dev))
    inputs = _unit_inputs(batch, dim, dev)
    return {"peak_mb": _peak_mb(lambda: _fwd_bwd(fn, *inputs), dev)}


def bench_loss(batch: int = 8192, dim: int = 512, repeats: int = 5, tile_size: int = 2048,
               device: str = "", reference: bool = True, keep_mb: float = 0.0) -> Dict[str, float]:
    """``reference=False``: vlp's time and peak only (ClipLoss's two B x B logits do not fit at large B).
    ``keep_mb``: the tiled loss's ``tile_keep_mb`` (logit tiles kept for the backward)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not reference:
        return _bench_loss_alone(batch, dim, repeats, tile_size, dev, keep_mb)
    inputs = _unit_inputs(batch, dim, dev)
    fns = {k: _loss_fn(k, tile_size, keep_mb) for k in ("vlp", "open_clip")}
    outs = {k: _fwd_bwd(fn, *inputs) for k, fn in fns.items()}  # also the warm-up
    diffs = [float((a - b).abs().max()) for a, b in zip(outs["vlp"], outs["open_clip"])]  # loss, dx, dy, ds
    scale_rel = diffs[3] / float(outs["open_clip"][3].abs().max())
    del outs
    secs = _alternate({k: (lambda fn=fn, inputs=inputs: _fwd_bwd(fn, *inputs)) for k, fn in fns.items()}, repeats, dev)
    del inputs
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the children need the memory ClipLoss's logits left cached here
    spec = {"kind": "loss", "batch": batch, "dim": dim, "tile_size": tile_size, "device": str(dev), "keep_mb": keep_mb}
    peak = dict(zip(fns, (r["peak_mb"] for r in _in_children([{**spec, "impl": k} for k in fns]))))
    return {
        "vlp_s": round(secs["vlp"], 4),
        "open_clip_s": round(secs["open_clip"], 4),
        "speedup": round(secs["open_clip"] / secs["vlp"], 3),
        "vlp_peak_mb": round(peak["vlp"], 1),
        "open_clip_peak_mb": round(peak["open_clip"], 1),
        "memory_ratio": round(peak["vlp"] / peak["open_clip"], 4),
        "max_abs_diff": max(diffs[:3]),  # loss, d image, d text
        "scale_grad_rel_diff": scale_rel,
        "batch": batch, "dim": dim, "tile_size": tile_size, "tile_keep_mb": keep_mb, "repeats": repeats,
        "device": str(dev), "threads": torch.get_num_threads(),
    }


def _bench_loss_alone(batch: int, dim: int, repeats: int, tile_size: int, dev: torch.device,
                      keep_mb: float = 0.0) -> Dict:
    inputs = _unit_inputs(batch, dim, dev)
    fn = _loss_fn("vlp", tile_size, keep_mb)
    loss = _fwd_bwd(fn, *inputs)[0]  # also the warm-up (compiles the tile kernels)
    secs = _alternate({"vlp": lambda: _fwd_bwd(fn, *inputs)}, repeats, dev)["vlp"]
    spec = {"kind": "loss", "impl": "vlp", "batch": batch, "dim": dim, "tile_size": tile_size, "device": str(dev),
            "keep_mb": keep_mb}
    peak = _in_child(spec)["peak_mb"]
    return {
        "vlp_s": round(secs, 4), "vlp_peak_mb": round(peak, 1), "loss": float(loss),
        "open_clip_s": None, "open_clip_peak_mb": None, "speedup": None, "memory_ratio": None,
        "open_clip_logits_mb": round(2 * batch * batch * 4 / 2**20, 1),  # its two B x B fp32 logits alone
        "batch": batch, "dim": dim, "tile_size": tile_size, "tile_keep_mb": keep_mb, "repeats": repeats,
        "device": str(dev), "threads": torch.get_num_threads(),
    }


def _run_loss(args) -> int:
    _at_least(args, 1, "batch", "dim", "repeats", "tile_size")
    _at_least(args, 0, "tile_keep_mb")
    r = bench_loss(args.batch, args.dim, args.repeats, args.tile_size, args.device, not args.no_reference,
                   args.tile_keep_mb)
    if args.json:
        print(json.dumps(r))
    elif args.no_reference:
        print(f"InfoNCE fwd+bwd, batch {r['batch']} dim {r['dim']}: vlp {r['vlp_s']:.3f} s, peak "
              f"{r['vlp_peak_mb']:.0f} MB (open_clip's logits alone would be {r['open_clip_logits_mb']:.0f} MB)")
    else:
        print(
            f"InfoNCE fwd+bwd, batch {r['batch']} dim {r['dim']}: vlp {r['vlp_s']:.3f} s, open_clip "
            f"{r['open_clip_s']:.3f} s (x{r['speedup']:.2f}); peak {r['vlp_peak_mb']:.0f} vs "
            f"{r['open_clip_peak_mb']:.0f} MB (ratio {r['memory_ratio']:.3f}); max |diff| {r['max_abs_diff']:.2e}"
        )
    return 0


def _add_loss_parser(bsub) -> None:
    p = bsub.add_parser("loss", help="InfoNCE forward+backward: vlp's tiled loss vs open_clip's ClipLoss")
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tile-size", type=int, default=2048)
    p.add_argument("--tile-keep-mb", type=float, default=0.0,
                   help="logit tiles kept for the backward, in MB (objective.tile_keep_mb; all: B*B*4 bytes)")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-reference", action="store_true",
                   help="time vlp's loss alone (for batches where ClipLoss's B x B logits do not fit)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_loss)


# ---- bench gradcache: memory and time of the cached step as the batch grows --------------


def _gradcache_child(batch: int, chunk: int) -> Dict:
    data = _batch(batch, bench_model().text["context_length"], bench_model().image["image_size"])
    step = _vlp_step(data, chunk)
    step()  # warm-up: optimizer state and gradient buffers exist before the measurement
    return {"peak_mb": _peak_mb(step, torch.device("cpu"))}


def _repeats_for(batch: int, budget: int = 2048) -> int:
    return max(3, min(10, budget // batch))  # fewer repeats for large batches keeps the bench short


def _step_seconds(batch: int, chunks: Dict[str, int], repeats: int = 0) -> Dict[str, float]:
    """Median step time at ``batch`` for each named chunk size, timed alternately."""
    data = _batch(batch, bench_model().text["context_length"], bench_model().image["image_size"])
    steps = {k: _vlp_step(data, c) for k, c in chunks.items()}  # same init (seed 0)
    for step in steps.values():
        step()  # warm-up
    return _alternate(steps, repeats or _repeats_for(batch), torch.device("cpu"))


def bench_gradcache(batches=(64, 128, 256, 512, 1024), chunk: int = 64, overhead_batch: int = 512,
                    repeats: int = 0) -> Dict:
    """Peak memory (fresh child each) and step time per batch at a fixed chunk; repeats 0 = by batch."""
    for n in (*batches, overhead_batch):
        if n % chunk:
            raise ValueError(f"chunk size {chunk} must divide every batch, got batch {n}")
    specs = [{"kind": "gradcache", "batch": n, "chunk": c} for n, c in [*((n, chunk) for n in batches),
                                                                        (overhead_batch, 0)]]
    peaks = [r["peak_mb"] for r in _in_children(specs)]  # memory first: timing runs alone
    rows = [{"global_batch": n, "chunk_size": chunk, "peak_mb": round(peak, 1),
             "step_s": round(_step_seconds(n, {"cached": chunk}, repeats)["cached"], 4)}
            for n, peak in zip(batches, peaks)]
    ov = _step_seconds(overhead_batch, {"cached": chunk, "uncached": 0}, 2 * repeats)
    return {
        "rows": rows,
        "memory_growth": round(rows[-1]["peak_mb"] / rows[0]["peak_mb"], 3),  # largest / smallest batch
        "time_overhead": round(ov["cached"] / ov["uncached"], 3),
        "overhead_batch": overhead_batch,
        "cached_step_s": round(ov["cached"], 4),
        "uncached_step_s": round(ov["uncached"], 4),
        "uncached_peak_mb": round(peaks[-1], 1),
        "threads": torch.get_num_threads(),
    }


def _run_gradcache(args) -> int:
    _at_least(args, 1, "chunk_size", "overhead_batch")
    _at_least(args, 0, "repeats")
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        raise ValueError(f"--batches must be comma-separated integers, got {args.batches!r}") from None
    if min(batches) < 1:
        raise ValueError(f"--batches must all be >= 1, got {args.batches!r}")
    r = bench_gradcache(batches, args.chunk_size, args.overhead_batch, args.repeats)
    if args.json:
        print(json.dumps(r))
        return 0
    for row in r["rows"]:
        print(f"batch {row['global_batch']:>5} chunk {row['chunk_size']}: peak {row['peak_mb']:.1f} MB, "
              f"step {row['step_s']:.3f} s")
    print(f"memory growth x{r['memory_growth']:.2f}; cached/uncached step time at batch "
          f"{r['overhead_batch']}: x{r['time_overhead']:.2f}")
    return 0


def _add_gradcache_parser(bsub) -> None:
    p = bsub.add_parser("gradcache", help="gradient-cached step: peak memory and time as the batch grows")
    p.add_argument("--batches", default="64,128,256,512,1024", help="comma-separated global batch sizes")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--overhead-batch", type=int, default=512, help="batch of the cached/uncached time ratio")
    p.add_argument("--repeats", type=int, default=0, help="timed steps per batch (0: 3-10, fewer for big batches)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_gradcache)


# ---- bench e2e: the whole training job against its model steps alone -------------------

E2E_CONFIG = "configs/quickstart/clip_digits.yaml"


class _Clock:
    """Wraps a callable and adds up the seconds spent in it (a Trainer's bound methods, its Step)."""

    def __init__(self, fn: Callable):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1


def _e2e_config(config: str, data: str, run_dir: str, steps: int, workers: int, evaluate: bool,
                overrides: List[str]):
    settings = [f"run.dir={run_dir}", f"data.train={os.path.join(data, 'train')}",
                f"data.val={os.path.join(data, 'val')}", f"optim.steps={steps}", f"data.workers={workers}",
                "logging.progress=false", "run.resume=false"]
    if not evaluate:
        settings += ["eval.every_steps=0", "eval.tasks=[]"]
    return load_config(config, [*settings, *overrides])


def bench_e2e(steps: int = 300, data: str = "", workers: int = 2, config: str = E2E_CONFIG,
              evaluate: bool = False, overrides: Sequence[str] = ()) -> Dict:
    """``Trainer.fit()`` of ``config`` for ``steps`` steps (real loader, logging, checkpoints; the eval
    tasks too with ``evaluate``) next to ``steps`` calls of its ``Step`` on one preloaded batch.

    ``overhead_share`` = 1 - (model-only seconds / fit seconds): the share of the job's wall time
    that is not the model step. The breakdown times the trainer's own methods during the fit
    (waiting for a batch, logging, checkpoints, eval); what remains is the loop itself.
    ``data``: a folder with train/ and val/ (empty: ``vlp data digits`` into a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="vlp-bench-e2e-") as tmp:
        if not data:
            data = os.path.join(tmp, "digits")
            write_digits(data)
        cfg = _e2e_config(config, data, os.path.join(tmp, "run"), steps, workers, evaluate,
                          list(overrides))
        check_run(cfg)
        trainer = Trainer(cfg)
        step_fn = trainer.step_fn
        clocks = {name: _Clock(getattr(trainer, name)) for name in ("next_batch", "_log_step", "save", "_log_eval")}
        for name, clock in clocks.items():
            setattr(trainer, name, clock)  # instance attributes shadow the methods for this trainer
        trainer.step_fn = in_fit = _Clock(step_fn)
        t = time.perf_counter()
        result = trainer.fit()
        fit_s = time.perf_counter() - t
        trainer.step_fn = step_fn
        loader = trainer.train_loader(epoch=0)
        batch = next(iter(loader))  # preloaded: the model steps below read no data
        del loader
        device = trainer.device
        t = time.perf_counter()
        for i in range(steps):
            step_fn(batch, step=i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        model_s = time.perf_counter() - t
    samples = steps * cfg.data.batch_size * trainer.info.world_size
    return {
        "steps": steps, "batch_size": cfg.data.batch_size, "workers": workers, "eval": evaluate,
        "fit_s": round(fit_s, 3),
        "model_steps_s": round(model_s, 3),
        "fit_samples_per_s": round(samples / fit_s, 2),
        "model_samples_per_s": round(samples / model_s, 2),
        "overhead_share": round(1.0 - model_s / fit_s, 4),
        "steps_trained": result["step"],
        "breakdown_s": {
            "step_in_fit": round(in_fit.seconds, 3),
            "data_wait": round(clocks["next_batch"].seconds, 3),
            "logging": round(clocks["_log_step"].seconds, 3),
            "checkpoints": round(clocks["save"].seconds, 3),
            "eval": round(clocks["_log_eval"].seconds, 3),
            "rest": round(fit_s - in_fit.seconds - sum(c.seconds for c in clocks.values()), 3),
        },
        "checkpoints_saved": clocks["save"].calls,
        "threads": torch.get_num_threads(),
    }


def _run_e2e(args) -> int:
    _at_least(args, 1, "steps")
    _at_least(args, 0, "workers")
    if args.data and not os.path.isdir(os.path.join(args.data, "train")):
        raise FileNotFoundError(f"--data {args.data}: no train/ folder (write one with `vlp data digits --out DIR`)")
    r = bench_e2e(args.steps, args.data, args.workers, args.config, args.eval, args.overrides)
    if args.json:
        print(json.dumps(r))
        return 0
    b = r["breakdown_s"]
    print(f"{r['steps']} steps at batch {r['batch_size']}: fit {r['fit_s']:.2f} s ({r['fit_samples_per_s']:.1f} "
          f"samples/s), model steps alone {r['model_steps_s']:.2f} s ({r['model_samples_per_s']:.1f} samples/s); "
          f"not the model step: {100 * r['overhead_share']:.1f} % (data wait {b['data_wait']:.2f} s, logging "
          f"{b['logging']:.2f} s, checkpoints {b['checkpoints']:.2f} s, eval {b['eval']:.2f} s)")
    return 0


def _add_e2e_parser(bsub) -> None:
    p = bsub.add_parser("e2e", help="the quickstart job (loader, logging, checkpoints) vs its model steps alone")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--data", default="", help="folder with train/ and val/ (default: vlp data digits, temporary)")
    p.add_argument("--workers", type=int, default=2, help="data.workers")
    p.add_argument("--config", default=E2E_CONFIG, help="recipe (default: the CLIP quickstart)")
    p.add_argument("--eval", action="store_true", help="keep the recipe's eval tasks in the job")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the recipe, e.g. model.embed_dim=32")
    p.set_defaults(func=_run_e2e)


# ---- bench mlcd: the sharded cluster head vs the ZeRO-3-partitioned one --------------------


class _HeadModel(torch.nn.Module):
    """Random features (b, D) -> one linear layer -> unit-norm ``image`` -> the cluster head."""

    def __init__(self, k: int, dim: int, sharded: bool):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)
        self.heads = torch.nn.ModuleDict({"cluster": ClusterHead(ClusterHeadConfig(k, sharded=sharded), dim)})

    def forward(self, inputs):
        out = {"image": torch.nn.functional.normalize(self.proj(inputs["image"]), dim=-1)}
        out.update(self.heads["cluster"](out, inputs))
        return out


def _mlcd_rank(k: int, dim: int, sharded: bool, batch: int, steps: int, ratio: float) -> Dict:
    """One rank of a ``vlp bench mlcd`` child: this rank's peak MB and median step seconds."""
    quiet_deepspeed()
    info = dist.init_distributed("gloo")
    base = _status_kb("VmRSS")
    torch.manual_seed(0)
    model = _HeadModel(k, dim, sharded)
    optim = OptimConfig(lr=1e-3, warmup_steps=0, steps=steps + 1)
    heads = ShardedHeads.split(model, optim)
    engine, _, _ = build_engine(model, EngineConfig(zero_stage=0 if sharded else 3), optim, batch)
    step = Step(engine, build_objective({"name": "mlcd", "sample_ratio": ratio}), torch.device("cpu"),
                total_steps=steps + 1, sharded=heads)
    g = torch.Generator().manual_seed(info.rank)
    data = {"image": torch.randn(batch, dim, generator=g), "cluster_ids": torch.randint(0, k, (batch, 1), generator=g)}
    step(data)  # warm-up: optimizer states exist from here
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (module doc)
    times = [_sync_time(lambda: step(data), torch.device("cpu")) for _ in range(steps)]
    return {"rank": info.rank, "peak_mb": (_status_kb("VmHWM") - base) / 1024, "step_s": statistics.median(times)}


def _mlcd_child(spec: Dict) -> None:
    """A torchrun rank: rank 0 prints every rank's result as one JSON line."""
    rows = dist.all_gather_object(_mlcd_rank(**spec))
    if dist.rank() == 0:
        print(json.dumps(rows), flush=True)
    os._exit(0)  # no teardown (see _child_main)


def bench_mlcd(k: int, dim: int, batch: int = 32, steps: int = 3, ratio: float = 0.1,
               worlds: Sequence[int] = (1, 2), heads: Sequence[str] = ("sharded", "zero3")) -> Dict:
    """Per-rank peak memory and step time of each (head, W), each in its own torchrun launch."""
    rows = []
    for world in worlds:
        for sharded in (h == "sharded" for h in heads):
            spec = {"k": k, "dim": dim, "sharded": sharded, "batch": batch, "steps": steps, "ratio": ratio}
            env = {**{n: v for n, v in os.environ.items() if n not in _LAUNCH_VARS}, **_CHILD_ENV}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                   "--master_port", str(29820 + world), "-m", "vlp.commands.bench", json.dumps(spec)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"bench mlcd W={world} sharded={sharded} failed: {proc.stderr.strip()[-2000:]}")
            ranks = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"head": "sharded" if sharded else "zero3", "world": world,
                         "peak_mb": [r["peak_mb"] for r in ranks], "step_s": [r["step_s"] for r in ranks]})
    return {"k": k, "dim": dim, "batch_per_rank": batch, "sample_ratio": ratio, "head_mb": k * dim * 4 / 2**20,
            "rows": rows}


def _run_mlcd(args) -> int:
    _at_least(args, 1, "k", "dim", "batch", "steps")
    if not 0 < args.sample_ratio <= 1:
        raise ValueError(f"--sample-ratio must be in (0, 1], got {args.sample_ratio}")
    if args.k < 2:
        raise ValueError(f"--k must be >= 2 (one center per rank at W = 2), got {args.k}")
    heads = args.heads.split(",")
    if not heads or set(heads) - {"sharded", "zero3"}:
        raise ValueError(f"--heads must be a comma-separated subset of sharded,zero3, got {args.heads!r}")
    r = bench_mlcd(args.k, args.dim, args.batch, args.steps, args.sample_ratio, heads=heads)
    if args.json:
        print(json.dumps(r))
        return 0
    for row in r["rows"]:
        print(f"{row['head']:>7} W={row['world']}: peak/rank " + ", ".join(f"{m:.0f}" for m in row["peak_mb"])
              + " MB, step " + ", ".join(f"{t:.3f}" for t in row["step_s"]) + " s")
    return 0


def _add_mlcd_parser(bsub) -> None:
    p = bsub.add_parser("mlcd", help="MLCD cluster head: sharded over ranks vs ZeRO-3-partitioned, W = 1 and 2")
    p.add_argument("--k", type=int, default=100_000, help="number of centers K")
    p.add_argument("--dim", type=int, default=512, help="embedding dim D")
    p.add_argument("--batch", type=int, default=32, help="samples per rank")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--sample-ratio", type=float, default=0.1, help="PartialFC share of the negatives scored")
    p.add_argument("--heads", default="sharded,zero3", help="which heads to run (ZeRO-3 needs K·D·4 bytes x ~4.5)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_mlcd)


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time vlp against open_clip in one process")
    bsub = p.add_subparsers(dest="bench", required=True)
    s = bsub.add_parser("step", help="one training step: vlp trainer vs a plain open_clip loop")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--repeats", type=int, default=20)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_run_step)
    _add_loss_parser(bsub)
    _add_gradcache_parser(bsub)
    _add_e2e_parser(bsub)
    _add_mlcd_parser(bsub)


if __name__ == "__main__":  # a `vlp bench mlcd` rank under torchrun
    _mlcd_child(json.loads(sys.argv[1]))
