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

from vlp.commands.eval import add_settings_options, settings_values
from vlp.eval.caption import CaptionSettings
from vlp.eval.common import image_dtype
from vlp.models.generate import decode, generate, special_ids
from vlp.runs import load_model_from_run

CHECKPOINT_HELP = "RUN_DIR (its latest checkpoint), a checkpoint tag dir or a model.safetensors"


def add_caption_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("caption", help="caption images with a CoCa checkpoint (one line per image)")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--images", nargs="+", required=True, help="image files")
    p.add_argument("--batch-size", type=int, default=32, help="images per generation batch (default 32)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--json", action="store_true", help="one JSON object per image: image, caption, tokens")
    # the decoding options of `vlp eval caption`, from the same settings dataclass
    add_settings_options(p, CaptionSettings, skip=("classnames",))
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
    settings = CaptionSettings(**settings_values(args))
    for path in args.images:  # an unreadable image before the model is loaded, not after
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"cannot read image {path}: {e}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _, model, tokenizer, transform = load_model_from_run(args.checkpoint, device=device)
    if not hasattr(model, "text_decoder"):
        raise ValueError(f"{args.checkpoint} is not a captioning model (model.kind: coca)")
    rows, seconds = caption_images(model, tokenizer, transform, args.images, settings.generation(), device,
                                   args.batch_size, use_cache=settings.use_cache)
    for path, caption, ids in rows:
        print(json.dumps({"image": path, "caption": caption, "tokens": ids}) if args.json else f"{path}\t{caption}")
    cache = "KV cache" if settings.use_cache else "no cache"
    print(f"[vlp] generated {len(rows)} captions in {seconds:.3f} s ({cache}, {settings.strategy})", file=sys.stderr)
    return 0
