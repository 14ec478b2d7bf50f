"""``vlp caption``: one caption per image from a CoCa checkpoint (``vlp eval caption`` scores
captions on shards: ``vlp/eval/caption.py``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from PIL import Image

from vlp.eval.common import image_dtype
from vlp.models.generate import GenerationConfig, decode, generate, special_ids
from vlp.runs import load_model_from_run

CHECKPOINT_HELP = "RUN_DIR (its latest checkpoint), a checkpoint tag dir or a model.safetensors"


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """--strategy and the decoding knobs (vlp.models.generate.GenerationConfig)."""
    g = p.add_argument_group("generation")
    g.add_argument("--strategy", default="beam", choices=["beam", "greedy", "top_k", "top_p"],
                   help="decoding: beam search (default), greedy, top-k or top-p (nucleus) sampling")
    g.add_argument("--beams", type=int, default=6, help="beam search width (default 6)")
    g.add_argument("--top-k", type=int, default=10, help="top_k: sample among the k likeliest tokens (default 10)")
    g.add_argument("--top-p", type=float, default=0.9, help="top_p: sample within probability mass p (default 0.9)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    g.add_argument("--min-length", type=int, default=1, help="tokens before the end token may come (default 1)")
    g.add_argument("--max-length", type=int, default=0, help="new tokens at most (default 0: the model's context)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")
    g.add_argument("--seed", type=int, help="sampling seed (default: unseeded)")
    g.add_argument("--no-cache", action="store_true",
                   help="recompute the whole prefix each step instead of the key/value cache (slower; for timing)")


def generation_config(args):
    return GenerationConfig(
        strategy=args.strategy, num_beams=args.beams, top_k=args.top_k, top_p=args.top_p,
        temperature=args.temperature, min_length=args.min_length, max_length=args.max_length,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )


def add_caption_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("caption", help="caption images with a CoCa checkpoint (one line per image)")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--images", nargs="+", required=True, help="image files")
    p.add_argument("--batch-size", type=int, default=32, help="images per generation batch (default 32)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--json", action="store_true", help="one JSON object per image: image, caption, tokens")
    add_generation_args(p)
    p.set_defaults(func=_caption)
    return p


def caption_images(model, tokenizer, transform, paths, gen, device="cpu", batch_size: int = 32,
                   use_cache: bool = True):
    """[(path, caption, token ids)] and the generation seconds, for image files ``paths``."""
    special = special_ids(tokenizer, pad_id=getattr(model, "pad_id", 0))
    rows, seconds = [], 0.0
    for i in range(0, len(paths), batch_size):
        chunk = paths[i : i + batch_size]
        images = torch.stack([transform(Image.open(p).convert("RGB")) for p in chunk])
        t0 = time.perf_counter()
        ids = generate(model, images.to(device, image_dtype(model)), special, gen, use_cache=use_cache)
        seconds += time.perf_counter() - t0
        rows += [(p, decode(tokenizer, r, special), r) for p, r in zip(chunk, ids.tolist())]
    return rows, seconds


def _caption(args) -> int:
    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"image not found: {missing[0]}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    gen = generation_config(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _, model, tokenizer, transform = load_model_from_run(args.checkpoint, device=device)
    if not hasattr(model, "text_decoder"):
        raise ValueError(f"{args.checkpoint} is not a captioning model (model.kind: coca)")
    rows, seconds = caption_images(model, tokenizer, transform, args.images, gen, device, args.batch_size,
                                   use_cache=not args.no_cache)
    for path, caption, ids in rows:
        print(json.dumps({"image": path, "caption": caption, "tokens": ids}) if args.json else f"{path}\t{caption}")
    print(f"[vlp] generated {len(rows)} captions in {seconds:.3f} s ({'no cache' if args.no_cache else 'KV cache'}, "
          f"{args.strategy})", file=sys.stderr)
    return 0
