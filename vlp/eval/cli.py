"""``vlp eval zeroshot|retrieval``: evaluate a run's checkpoint on a folder of shards."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict

CHECKPOINT_HELP = "RUN_DIR (its latest checkpoint), a checkpoint tag dir or a model.safetensors"
ZEROSHOT_KEYS = ("top1", "top5", "mean_per_class_recall")
RETRIEVAL_KEYS = tuple(f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("eval", help="zero-shot classification or retrieval of a checkpoint")
    tasks = parser.add_subparsers(dest="eval_task", required=True, metavar="{zeroshot,retrieval}")

    zs = tasks.add_parser("zeroshot", help="zero-shot top-1/top-5/mean per-class recall on labelled shards")
    _add_common(zs)
    zs.add_argument(
        "--classnames", help="one class name per line, in label order (default: classnames.txt beside or above --data)"
    )
    zs.add_argument(
        "--templates", help="one prompt per line with {c} (default: zeroshot_classification_templates.txt there)"
    )
    zs.set_defaults(func=_zeroshot)

    rt = tasks.add_parser("retrieval", help="image<->text recall@1/5/10, each sample's own caption as positive")
    _add_common(rt)
    rt.set_defaults(func=_retrieval)
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data", help="shard folder or brace pattern (default: the run's data.val)")
    p.add_argument("--batch-size", type=int, help="eval batch size (default: the run's eval.batch_size)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a readable line")


def _load(args):
    """(cfg, model, tokenizer, eval_transform, data_spec, device) from the parsed options."""
    import torch

    from vlp.engine.checkpoint import load_model_from_run

    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model, tokenizer, eval_transform = load_model_from_run(args.checkpoint, device=device)
    if args.batch_size is not None:
        cfg.eval.batch_size = args.batch_size
    data = args.data if args.data is not None else cfg.data.val
    if not data:
        raise ValueError("no eval data: pass --data (the run's data.val is empty)")
    return cfg, model, tokenizer, eval_transform, data, device


def _report(task: str, data: Any, metrics: Dict[str, Any], keys, as_json: bool) -> None:
    if as_json:
        print(json.dumps(metrics))
        return
    values = "  ".join(f"{k} {metrics[k]:.4f}" for k in keys)
    print(f"{task} on {data}: {values}  (n={metrics['num_samples']})")


def _zeroshot(args) -> int:
    from vlp.eval.zeroshot import run_zeroshot

    cfg, model, tokenizer, eval_transform, data, device = _load(args)
    metrics = run_zeroshot(
        cfg, model, tokenizer, eval_transform, data,
        classnames=args.classnames, templates=args.templates, device=device, progress=sys.stderr.isatty(),
    )
    _report("zeroshot", data, metrics, ZEROSHOT_KEYS, args.json)
    return 0


def _retrieval(args) -> int:
    from vlp.eval.retrieval import run_retrieval

    cfg, model, tokenizer, eval_transform, data, device = _load(args)
    metrics = run_retrieval(cfg, model, tokenizer, eval_transform, data, device=device, progress=sys.stderr.isatty())
    _report("retrieval", data, metrics, RETRIEVAL_KEYS, args.json)
    return 0
