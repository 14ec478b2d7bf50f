"""``vlp eval zeroshot|retrieval|classify|caption``: evaluate a run's checkpoint on a folder of shards."""
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
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint: zero-shot, retrieval, caption, linear probe, classify, continual")
    tasks = parser.add_subparsers(dest="eval_task", required=True, metavar="{zeroshot,retrieval,classify,continual,caption,linear-probe}")

    zs = tasks.add_parser("zeroshot", help="zero-shot top-1/top-5/mean per-class recall on labelled shards")
    _add_common(zs)
    zs.add_argument(
        "--classnames", help="one class name per line, in label order (default: classnames.txt beside or above --data)"
    )
    zs.add_argument(
        "--templates", help="one prompt per line with {c} (default: zeroshot_classification_templates.txt there)"
    )
    zs.add_argument("--modality", choices=("image", "audio"),
                    help="what to classify (default: the run's eval.modality, else image if the model has it, else audio)")
    zs.set_defaults(func=_zeroshot)

    rt = tasks.add_parser("retrieval", help="image<->text recall@1/5/10, each sample's own caption as positive")
    _add_common(rt)
    rt.set_defaults(func=_retrieval)

    cl = tasks.add_parser("classify", help="accuracy of the model's classifier heads (image, text, fusion)")
    _add_common(cl)
    cl.set_defaults(func=_classify)

    ct = tasks.add_parser("continual", help="class-incremental accuracy and forgetting of a continual run's tasks")
    ct.add_argument("--checkpoint", required=True, help="RUN_DIR of a continual run (its tasks/ snapshots)")
    ct.add_argument("--data", help="shard folder or brace pattern (default: the run's data.val)")
    ct.add_argument("--classnames", help="one class name per line (default: classnames.txt beside or above --data)")
    ct.add_argument("--templates", help="zero-shot prompts with {c} (default: the file beside or above --data)")
    ct.add_argument("--batch-size", type=int, help="eval batch size (default: the run's eval.batch_size)")
    ct.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    ct.add_argument("--json", action="store_true", help="print one JSON object instead of readable lines")
    ct.set_defaults(func=_continual)

    from vlp.caption import add_eval_caption_parser

    add_eval_caption_parser(tasks, _add_common, _load)  # caption: loss, perplexity, captions naming the class

    from vlp.eval.probe import add_probe_parser

    add_probe_parser(tasks)  # linear-probe: logistic regression + kNN on frozen image features
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
        modality=args.modality,
    )
    _report("zeroshot", data, metrics, ZEROSHOT_KEYS, args.json)
    return 0


def _retrieval(args) -> int:
    from vlp.eval.retrieval import run_retrieval

    cfg, model, tokenizer, eval_transform, data, device = _load(args)
    metrics = run_retrieval(cfg, model, tokenizer, eval_transform, data, device=device, progress=sys.stderr.isatty())
    _report("retrieval", data, metrics, [k for k in metrics if "_R@" in k] or RETRIEVAL_KEYS, args.json)
    return 0


def _classify(args) -> int:
    from vlp.eval.classify import run_classify

    cfg, model, tokenizer, eval_transform, data, device = _load(args)
    metrics = run_classify(cfg, model, tokenizer, eval_transform, data, device=device, progress=sys.stderr.isatty())
    _report("classify", data, metrics, [k for k in metrics if k.endswith("_accuracy")], args.json)
    return 0


def _continual(args) -> int:
    import torch

    from vlp.eval.continual import METRICS, run_continual_eval

    if not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"run folder not found: {args.checkpoint}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = run_continual_eval(args.checkpoint, args.data, args.classnames, args.templates, args.batch_size,
                                 device=device, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"continual on {args.data or 'data.val'}: {metrics['tasks_done']} of {len(metrics['tasks'])} tasks "
          f"(n={metrics['num_samples']})")
    for name in (m for m in METRICS if m in metrics):
        m = metrics[name]
        per_task = " ".join(f"{a:.3f}" for a in m["accuracy"])
        print(f"  {name}: average_accuracy {m['average_accuracy']:.4f}  final_accuracy {m['final_accuracy']:.4f}  "
              f"average_forgetting {m['average_forgetting']:.4f}  (accuracy after each task: {per_task})")
    return 0
